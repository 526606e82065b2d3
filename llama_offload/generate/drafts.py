"""Building the draft that ``--draft`` names: its weights, where they live, and the checks made before loading.

- ``ngram``: prompt lookup (speculative.NgramDraft), no weights.
- ``int4`` / ``int8``: the target checkpoint loaded again and quantized, kept whole on the run's device. It is the
  same model in fewer bits, so most drafts are kept, and it costs a quarter / half of the 16-bit bytes. With
  ``--lora`` the adapter is merged into it too, before it is quantized: it stays the adapted model's copy.
- a directory: a separate, smaller checkpoint (Llama 3.2 1B for Llama 3.1 8B, TinyLlama for Llama 2). Its tokenizer
  must give the target's ids, checked before any weight is read.

A model draft's cache holds ``num_draft_tokens + 1`` positions more than the target's: it writes its proposals
past the target's last position. On a GPU its bytes come out of ``--gpu_memory_gb`` (``Llama.build`` measures
them and gives the target what is left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path
from typing import Optional

import torch

from llama_offload.checkpoint.record import CheckpointInfo, as_checkpoint
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import load_model
from llama_offload.model.quant import QuantSpec
from llama_offload.generate.run_options import AUTO_DRAFT, RunOptions
from llama_offload.generate.speculative import Draft, ModelDraft, NgramDraft
from llama_offload.text.tokenizer import BUNDLED_CORPUS_PATH, Tokenizer, load_tokenizer
from llama_offload.convert.default_model import resolve_paths
from llama_offload.checkpoint.quant_load import read_quantization
from llama_offload.offload.plan import weight_bytes
from llama_offload.model.step import cache_len
from llama_offload.offload.offloaded import offload

SELF_DRAFT_SPECS = {"int4": QuantSpec(4, 64), "int8": QuantSpec(8)}
_WHERE_NOTE = "llama_offload: no CUDA device, so the packed blocks run"  # offload()'s note, printed by the model


def tokenizer_mismatch(target: Tokenizer, draft: Tokenizer) -> Optional[str]:
    """Why ``draft`` does not give ``target``'s ids (None: it does): the vocabulary size, the special ids, and the
    ids of a probe text (the corpus the package ships) and of every 97th token decoded back."""
    for what in ("n_words", "bos_id", "eos_id"):
        a, b = getattr(target, what), getattr(draft, what)
        if a != b:
            return f"{what} is {b} in the draft's tokenizer and {a} in the model's"
    if set(target.stop_ids) != set(draft.stop_ids):
        return f"the stop ids differ ({sorted(draft.stop_ids)} against {sorted(target.stop_ids)})"
    probe = BUNDLED_CORPUS_PATH.read_text(encoding="utf-8")[:4000]
    if target.encode(probe, bos=True, eos=False) != draft.encode(probe, bos=True, eos=False):
        return "they encode the same text to different ids"
    for i in range(0, target.n_words, 97):
        if target.decode([i]) != draft.decode([i]):
            return f"token {i} decodes to {draft.decode([i])!r} in the draft and {target.decode([i])!r} in the model"
    return None


def check_draft_tokenizer(draft_dir: Path, target: Tokenizer) -> Path:
    """The draft checkpoint's tokenizer path, once it is known to give the target's ids; else a ValueError."""
    _, path = resolve_paths(draft_dir, None)
    reason = tokenizer_mismatch(target, load_tokenizer(path))
    if reason is not None:
        raise ValueError(f"--draft {draft_dir}: its tokenizer ({path}) is not the model's: {reason}. A draft must "
                         "share the model's tokenizer (e.g. Llama 3.2 1B for Llama 3.1 8B, TinyLlama for Llama 2); "
                         "or use --draft ngram, int4 or int8, which need none.")
    return path


# Why ``--draft auto`` drafts nothing on the CPU, and an explicit draft there gets a note. On a GPU a paged pass is
# bound by streaming the weights, so it scores K + 1 positions for the price of one, and a resident draft costs a
# fraction of it: 2.70x with the int8 self-draft on the paged default model (README, Speculative decoding). On the
# CPU the model is already in memory and each pass is bound by the cores reading it once per tile of a few tokens:
# a pass over K + 1 positions costs several single passes, and a model draft costs about as much as the model.
# BENCHMARKS.md, "The first minutes", gives the CPU's figures (scripts/bench_cpu_default.py).
CPU_DRAFT_NOTE = ("on the CPU, drafts measured slower than plain decoding (a pass over K + 1 positions costs several "
                  "single passes there, and a model draft about as much as the model; BENCHMARKS.md, \"The first "
                  "minutes\"). Drop --draft, or give --draft auto to let the run choose.")


def choose_draft(opts: RunOptions, ckpt_dir: CheckpointInfo | str | Path, device: torch.device) -> RunOptions:
    """``opts`` with ``--draft auto`` resolved for a run on ``device``, saying once what it chose and why; an
    explicit draft on the CPU is kept, with a note that it measured slower there; a self-draft of a quantized
    checkpoint is refused here, before anything is loaded. On a GPU that pages the model
    (``--offload``, the default) the int8 self-draft, which measured fastest (2.70x on the paged default model),
    where the checkpoint is unquantized and the draft leaves at least half of a ``--gpu_memory_gb`` budget to the
    model, else ngram; on the CPU, or with every block resident, none."""
    ckpt_dir = as_checkpoint(ckpt_dir)
    if opts.draft in SELF_DRAFT_SPECS and read_quantization(ckpt_dir) is not None:
        raise ValueError(f"--draft {opts.draft}: {ckpt_dir} is already quantized, so its quantized copy would be the "
                         "model itself. Use --draft ngram, auto or a draft checkpoint directory.")
    if opts.draft != AUTO_DRAFT:
        if opts.draft is not None and device.type == "cpu":
            print(f"llama_offload: note: --draft {opts.draft} {CPU_DRAFT_NOTE}", file=sys.stderr)
        return opts
    if device.type == "cpu":
        chosen, why = None, "plain decoding: on the CPU drafts measured slower than plain decoding"
    elif not opts.offload:
        chosen, why = None, "plain decoding: with every block resident a pass is cheap, and drafts were not measured faster"
    elif read_quantization(ckpt_dir) is not None:
        chosen, why = "ngram", "ngram: the checkpoint is already quantized, so it has no cheaper self-draft"
    else:
        chosen, why = "int8", "int8: the model's own int8 copy measured fastest on a paged model"
        args = as_checkpoint(ckpt_dir).model_args(max_seq_len=opts.max_seq_len, max_batch_size=opts.max_batch_size)
        if args.vocab_size > 0 and opts.gpu_memory_gb is not None:
            held = draft_gpu_bytes(dataclasses.replace(opts, draft="int8"), ckpt_dir, args,
                                   opts.torch_dtype or torch.float16)
            if held > opts.gpu_memory_gb * 2**30 / 2:
                chosen, why = "ngram", (f"ngram: the int8 self-draft would take {held / 2**30:.2f} GiB, more than half "
                                        f"of --gpu_memory_gb {opts.gpu_memory_gb:g}")
    print(f"llama_offload: --draft auto chose {why}.", file=sys.stderr)
    return dataclasses.replace(opts, draft=chosen, num_draft_tokens=opts.num_draft_tokens if chosen else None)


def draft_gpu_bytes(opts: RunOptions, ckpt_dir: CheckpointInfo | str | Path, args: ModelArgs,
                    dtype: torch.dtype) -> int:
    """What a model draft will hold on the GPU (weights, dequantization scratch, KV caches), from params.json
    alone: the run plan (run_plan.py) takes it out of the budget before anything is loaded. 0 for no draft or ngram."""
    if opts.draft in (None, "ngram"):
        return 0
    spec = SELF_DRAFT_SPECS.get(opts.draft)
    if spec is None:
        draft_dir = Path(opts.draft).expanduser()
        if not (draft_dir / "params.json").is_file():
            raise FileNotFoundError(f"--draft {draft_dir} has no params.json: a draft directory is a checkpoint "
                                    "(params.json, consolidated.NN.pth, its tokenizer), as --ckpt_dir is.")
        draft_args = ModelArgs.from_json(draft_dir / "params.json", max_seq_len=args.max_seq_len,
                                         max_batch_size=args.max_batch_size)
        if draft_args.vocab_size == -1:
            draft_args = dataclasses.replace(draft_args, vocab_size=args.vocab_size)
    else:
        draft_args = args
    w = weight_bytes(draft_args, dtype, 1, spec)
    kv = (2 * draft_args.n_layers * opts.max_batch_size * cache_len(opts.max_seq_len + opts.draft_tokens + 1)
          * draft_args.kv_heads * draft_args.head_dim * dtype.itemsize)
    return draft_args.n_layers * w.block + w.embedding + w.head + w.scratch + kv


def build_draft(opts: RunOptions, ckpt_dir: CheckpointInfo | str | Path, tokenizer: Tokenizer,
                device: torch.device, lora: Optional[object] = None) -> tuple[Optional[Draft], int]:
    """The draft ``opts.draft`` names (None without ``--draft``), its model loaded and placed on ``device``, and
    the GPU bytes it took (measured: ``draft_gpu_bytes`` is the estimate made before loading).

    ``lora``: the adapter (``--lora``) the model merges; an int4/int8 self-draft merges it too before it is
    quantized, so that it stays the model's own copy and its drafts keep being accepted. A draft directory is
    another model: the adapter is not for it, and it is loaded as it is (the output is the model's either way)."""
    if opts.draft is None:
        return None, 0
    if opts.draft == "ngram":
        return NgramDraft(), 0

    max_seq_len = opts.max_seq_len + opts.draft_tokens + 1
    if opts.draft in SELF_DRAFT_SPECS:
        # A fresh record: the model's load has released its shard mappings, and the draft quantizes its own copy.
        source, quantize = Path(ckpt_dir), SELF_DRAFT_SPECS[opts.draft]
    else:
        source, quantize, lora = Path(opts.draft).expanduser(), None, None
    dtype = opts.torch_dtype or (torch.float32 if device.type == "cpu" else None)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = load_model(source, max_seq_len=max_seq_len, max_batch_size=opts.max_batch_size, dtype=dtype,
                       vocab_size=tokenizer.n_words, show_progress=False, model_parallel_size=1,
                       quantize=quantize, quantize_device=device if device.type == "cuda" else None, lora=lora)
    # offload() says once per call where the blocks run; the model's own call says it for the run, so the draft's
    # copy of that note is dropped (anything else it prints still reaches stderr).
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        packed = offload(model, max_batch_size=opts.max_batch_size, max_seq_len=max_seq_len, device=device,
                         resident=device.type == "cuda", cuda_graphs=opts.cuda_graphs)
    for line in said.getvalue().splitlines():
        if not line.startswith(_WHERE_NOTE):
            print(line, file=sys.stderr)
    held = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else 0
    return ModelDraft(packed, prefill_chunk=opts.chunk()), held
