"""``llama-offload finetune``: train a LoRA adapter on a frozen base model, or (``--full``) every weight, with the
model's blocks paged through a GPU budget.

    flags -> checked (data read and packed, adapter shape or host memory plan, --out) before any weight is loaded
          -> base model loaded; the trainer for the mode: lora_trainer.LoraTrainer (adapters on the device, torch's
             AdamW) or full_trainer.FullTrainer (every weight, fp32 masters and AdamW on the host)
          -> per optimizer step: batch_size x grad_accum rows per rank (schedule.py), each micro-batch forward and
             backward through paged.py, gradients summed over ranks (data parallel), the update
          -> saved atomically to --out every --save_every steps, at the end, and when interrupted (an adapter, or
             a Meta checkpoint with the optimizer state beside it); --resume picks the run up at the step it saved
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from llama_offload.model.args import ModelArgs
from llama_offload.text.chat_format import chat_format_name, get_chat_format
from llama_offload.checkpoint.load import checkpoint_context_length, load_model
from llama_offload.checkpoint.meta import read_checkpoint_meta
from llama_offload.checkpoint.output_dir import check_out_dir, existing_ancestor
from llama_offload.checkpoint.quant_load import read_quantization
from llama_offload.checkpoint.record import find_shards, open_shard
from llama_offload.checkpoint.trained import checkpoint_bytes, state_file
from llama_offload.files.cleanup import new_temp_dir, remove_tree
from llama_offload.convert.default_model import resolve_paths
from llama_offload.generate.run_options import flag
from llama_offload.model.dtypes import dtype_name, parse_dtype
from llama_offload.text.tokenizer import check_vocab_size, load_tokenizer, tokenizer_copy_files
from llama_offload.train import budget, data
from llama_offload.train.host_adamw import STATES
from llama_offload.train.lora_trainer import LoraTrainer, lora_parameter_count, stored_bytes
from llama_offload.train.full_trainer import FullTrainer
from llama_offload.train.schedule import start_data_parallel, world as _world
from llama_offload.train.trainer import Trainer
from llama_offload.checkpoint import adapter
from llama_offload.model import lora
from llama_offload.train.progress import Progress

STATE_VERSION = 1
LORA_DEFAULTS = {"lora_rank": 16, "lora_alpha": 32.0, "lora_targets": "wq,wk,wv,wo,w1,w2,w3"}


@dataclass
class FinetuneOptions:
    """The flags of ``llama-offload finetune`` (and ``scripts/finetune.py``): each field is one flag, with its
    help (train/command.py builds the command's parameters and help from these fields)."""

    data: Optional[str] = flag(None, 'a JSONL file, one {"text": ...} or {"messages": [{"role": ..., "content": ...}, '
                                     "...]} per line; chat examples are rendered in the checkpoint's chat format and "
                                     "only the assistant replies are learned.")
    out: Optional[str] = flag(None, "the directory to write: the adapter (adapter_config.json, adapter.safetensors, "
                                    "trainer_state.pt), or with --full a Meta checkpoint with its optimizer state; "
                                    "must be new or empty unless --resume (or --force with --full).")
    ckpt_dir: Optional[str] = flag(None, "the base checkpoint (default: the default model); 16-bit or quantized (a "
                                         "quantized base trains QLoRA-style; --full needs a 16-bit one).")
    full: bool = flag(False, "train every weight (blocks, embedding, norm, output head) instead of a LoRA adapter: "
                             "fp32 master weights and AdamW moments in host memory, the update on the CPU overlapped "
                             "with the backward pass; --out becomes a Meta checkpoint.")
    tokenizer_path: Optional[str] = flag(None, "its tokenizer (default: the one found in or beside ckpt_dir).")
    steps: Optional[int] = flag(None, "optimizer steps to run in all (not with --epochs).")
    epochs: Optional[float] = flag(None, "passes over the packed data (default 1; not with --steps).")
    lr: float = flag(1e-4, "AdamW learning rate (constant).")
    lora_rank: int = flag(16, "the rank r of every update B @ A.")
    lora_alpha: float = flag(32.0, "updates are scaled by alpha / r.")
    lora_targets: str = flag("wq,wk,wv,wo,w1,w2,w3", "which matrices of every block get an adapter, comma-separated, "
                                                     "among wq,wk,wv,wo,w1,w2,w3.")
    seq_len: int = flag(1024, "tokens per packed row (examples are concatenated and cut into rows).")
    batch_size: int = flag(1, "rows per forward pass (per process).")
    grad_accum: int = flag(1, "forward passes per optimizer step.")
    gpu_memory_gb: Optional[float] = flag(None, "GPU budget in GiB: as many blocks as fit stay resident, the rest are "
                                                "paged from pinned memory in the forward and again in the backward "
                                                "pass (default: every block paged, the least memory).")
    seed: int = flag(1, "seeds the adapter's initialisation and the data order.")
    eval_data: Optional[str] = flag(None, "a JSONL file like --data whose mean loss is reported every --eval_every "
                                          "steps and at the end.")
    eval_every: int = flag(100, "steps between evaluations.")
    save_every: int = flag(100, "steps between saves of the adapter and the trainer state (and always at the end, "
                                "and on Ctrl-C).")
    resume: bool = flag(False, "continue the run saved in --out, at the step it saved (same data and flags; --steps "
                               "may grow).")
    offload_activations: Optional[bool] = flag(None, "keep each block's checkpointed input in pinned CPU memory "
                                                     "instead of on the GPU (default: on with a GPU).")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    max_grad_norm: Optional[float] = flag(None, "clip the gradients by their global norm to this (as "
                                                "torch.nn.utils.clip_grad_norm_); default: no clipping.")
    optim_state: str = flag("fp32", "--full: how AdamW's moments are stored on the host: fp32, bf16 (half the memory) "
                                    "or int8 (a quarter; block-quantized). The plan says when fp32 does not fit.")
    host_memory_gb: Optional[float] = flag(None, "--full: host memory this process may use, in GiB (default: what "
                                                 "the host has available, less a margin).")
    force: bool = flag(False, "--full: replace an --out that holds a checkpoint llama_offload wrote.")
    device: Optional[str] = flag(None, "cuda, cuda:N or cpu (default: cuda if available).")
    dtype: Optional[str] = flag(None, "bfloat16, float16 or float32: the base weights' and autocast's dtype "
                                      "(default: bf16 on a GPU, fp32 on the CPU); the LoRA weights are always fp32.")
    chat_format: Optional[str] = flag(None, "llama2, llama3 or chatml: overrides the checkpoint's.")
    allow_long_context: bool = flag(False, "allow --seq_len above the context the model was trained for.")
    pp: int = flag(1, "pipeline stages: under torchrun the processes form (processes / pp) data-parallel replicas "
                      "of pp stages, each stage building and loading only its own layers (torch.distributed."
                      "pipelining; LoRA).")
    pp_layers: Optional[Any] = flag(None, "--pp: layers per stage by hand, e.g. 10,11,11 (default: balanced by "
                                          "compute, the output head counted on the last stage).")
    microbatches: Optional[int] = flag(None, "--pp: microbatches each pass's --batch_size rows are split into "
                                             "(default: --pp); must divide --batch_size.")
    schedule: str = flag("1f1b", "--pp: the pipeline schedule: gpipe or 1f1b.")
    dry_run: bool = flag(False, "check the flags, the data and --out, print the memory plan (GPU and, with --full, "
                                "host), and stop before any weight is read.")

    def check(self) -> None:
        def whole(name: str, low: int, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be a whole number >= {low}, found {value!r}.")

        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"--{name} must be a positive number, found {value!r}.")

        if not self.data:
            raise ValueError("--data is required: a JSONL file with one {\"text\": ...} or {\"messages\": [...]} per line.")
        if not self.out:
            raise ValueError("--out is required: the directory the adapter is written to (llama-offload finetune "
                             "--data train.jsonl --out adapters/mine).")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"Give --steps or --epochs, not both (found --steps {self.steps} --epochs {self.epochs}).")
        if self.steps is not None:
            whole("steps", 1, self.steps)
        if self.epochs is not None:
            positive("epochs", self.epochs)
        for name in ("lora_rank", "seq_len", "batch_size", "grad_accum", "eval_every", "save_every"):
            whole(name, 1, getattr(self, name))
        whole("seed", 0, self.seed)
        for name in ("lr", "lora_alpha"):
            positive(name, getattr(self, name))
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"--weight_decay must be 0 or more, found {self.weight_decay!r}.")
        if self.gpu_memory_gb is not None:
            positive("gpu_memory_gb", self.gpu_memory_gb)
        whole("pp", 1, self.pp)
        if self.microbatches is not None:
            whole("microbatches", 1, self.microbatches)
        if self.pp > 1:
            unsupported = [name for name, on in (("--eval_data", self.eval_data is not None),
                                                 ("--gpu_memory_gb", self.gpu_memory_gb is not None)) if on]
            if unsupported:
                raise ValueError(f"--pp {self.pp} trains with every stage's layers and optimizer on its device; "
                                 f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not available "
                                 "with pipeline stages yet. Drop them, or train in one pipeline (--pp 1).")
        elif self.pp_layers is not None or self.microbatches is not None:
            raise ValueError("--pp_layers and --microbatches split a model into pipeline stages: add --pp S (S > 1), "
                             "or drop them.")
        for name in ("max_grad_norm", "host_memory_gb"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if self.optim_state not in STATES:
            raise ValueError(f"--optim_state must be one of {', '.join(STATES)}, found {self.optim_state!r}.")
        if self.full:
            given = [f"--{k} {getattr(self, k)}" for k, v in LORA_DEFAULTS.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"--full trains every weight, so it takes no LoRA flags (found {', '.join(given)}). "
                                 "Drop them, or drop --full to train an adapter.")
        else:
            extra = [f"--{k}" for k, off in (("optim_state", "fp32"), ("host_memory_gb", None), ("force", False))
                     if getattr(self, k) != off]
            if extra:
                one = len(extra) == 1
                raise ValueError(f"{', '.join(extra)} belong{'s' if one else ''} to full fine-tuning; add --full to "
                                 f"train every weight, or drop {'it' if one else 'them'} to train a LoRA adapter.")
            lora.parse_targets(self.lora_targets)

    def identity(self) -> dict[str, Any]:
        """What must not change when a run resumes: the rows, their order and what trains."""
        keys = ("seq_len", "batch_size", "grad_accum", "seed", "full", "optim_state") if self.full else (
            "seq_len", "batch_size", "grad_accum", "seed", "lora_rank", "lora_alpha", "lora_targets")
        if self.pp > 1:
            keys += ("pp", "pp_layers", "microbatches", "schedule")
        return {k: getattr(self, k) for k in keys}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Prepared:
    """Everything checked and read before the weights: the run can still be refused cheaply here."""

    opts: FinetuneOptions
    ckpt_dir: Path
    tokenizer_path: Path
    params: ModelArgs
    config: Optional[lora.LoRAConfig]  # None with --full
    inputs: torch.Tensor  # (rows, seq_len) int64
    targets: torch.Tensor  # (rows, seq_len) int64, -100 where no loss is counted
    eval_inputs: Optional[torch.Tensor]
    eval_targets: Optional[torch.Tensor]
    data_sha256: str
    total_steps: int
    start_step: int
    state: Optional[dict]
    device: torch.device
    dtype: torch.dtype
    offload_activations: bool = False
    plan: Any = None  # budget.TrainingPlan (LoRA) or budget.FullTrainingPlan (--full)
    # --full: what the output checkpoint takes from its source
    source_meta: dict = dataclasses.field(default_factory=dict)
    source_dtype: torch.dtype = torch.float32
    source_dtype_name: str = "float32"
    num_shards: int = 1
    tokenizer_name: str = ""
    tokenizer_files: dict = dataclasses.field(default_factory=dict)
    sources: list = dataclasses.field(default_factory=list)
    n_rows: int = 0  # packed rows of --data (pipeline stages that read no data learn it from rank 0)


def _saved_state_path(out: Path, full: bool, rank: int, world: int, pp: int = 1) -> Path:
    if full and pp > 1:
        return out / f"trainer_state.stage{rank % pp}.pt"  # pipeline_trainer.py: each stage's own optimizer
    return out / (state_file(rank, world) if full else adapter.STATE_FILE)


def prepare(opts: FinetuneOptions, device: torch.device) -> Prepared:
    opts.check()
    rank, world = _world()
    if opts.pp > 1 and opts.microbatches is None:
        opts = dataclasses.replace(opts, microbatches=opts.pp)
    data_path = Path(opts.data).expanduser()
    if not data_path.is_file():
        raise FileNotFoundError(f"--data {data_path} does not exist. Pass a JSONL file with one example per line.")
    out = Path(opts.out).expanduser()
    state = None
    if opts.resume:
        saved = _saved_state_path(out, opts.full, rank, world, opts.pp)
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no saved {'full fine-tuning ' if opts.full else ''}run "
                                    f"({saved.name} is missing). Start the run without --resume, or point --out at "
                                    "the directory of the run to resume" + ("" if opts.full else
                                    " (a run saved with --full resumes with --full)") + ".")
        if not opts.full:
            adapter.read_config(out)  # the saved adapter's config and weights file, whole
        state = _read_state(saved, full=opts.full)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not (opts.full and opts.force):
        raise FileExistsError(f"--out {out} already exists and is not empty; nothing in it is overwritten. Pass "
                              "--resume to continue the run saved there, or choose another --out"
                              + (" (or --force to replace a checkpoint llama_offload wrote)." if opts.full else "."))
    ckpt_dir, tokenizer_path = resolve_paths(opts.ckpt_dir, opts.tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    params = ModelArgs.from_json(ckpt_dir / "params.json", max_seq_len=opts.seq_len, max_batch_size=opts.batch_size)
    if params.vocab_size == -1:
        params = dataclasses.replace(params, vocab_size=tokenizer.n_words)
    check_vocab_size(tokenizer, params.vocab_size, source=str(ckpt_dir / "params.json"))
    context, source = checkpoint_context_length(ckpt_dir, params)
    if context is not None and opts.seq_len > context and not opts.allow_long_context:
        raise ValueError(f"--seq_len {opts.seq_len} is above the {context} tokens this model was trained for "
                         f"({source}). Lower --seq_len, or pass --allow_long_context to train past it anyway.")
    meta = read_checkpoint_meta(ckpt_dir)
    dtype = parse_dtype(opts.dtype, flag="--dtype") if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    offload_activations = opts.offload_activations if opts.offload_activations is not None else device.type == "cuda"
    config = None
    extra: dict[str, Any] = {}
    if opts.full:
        extra = _prepare_full(opts, ckpt_dir, tokenizer_path, params, meta, data_path, out, dtype, device, world,
                              resuming=state is not None)
        offload_activations = extra["plan"].checkpoints_on_host if extra["plan"] is not None else False
    else:
        config = lora.LoRAConfig(int(opts.lora_rank), float(opts.lora_alpha), lora.parse_targets(opts.lora_targets),
                                 lora.ModelShape.of(params))
        config.check()
        check_out_room(out, config, resuming=state is not None)
    chat_format = get_chat_format(chat_format_name(opts.chat_format, meta, tokenizer), tokenizer)
    pad_id = tokenizer.eos_id

    def packed(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return data.pack(data.read_examples(path, tokenizer, chat_format), opts.seq_len, pad_id)

    def read() -> tuple[torch.Tensor, torch.Tensor, str]:
        inputs, targets = packed(data_path)
        if not bool((targets != -100).any()):
            raise ValueError(f"--data {data_path} has no token to learn: every example's trained part is empty.")
        return inputs, targets, _sha256(data_path)

    if opts.pp > 1:
        from llama_offload.train.pipeline_trainer import check_pipeline

        check_pipeline(opts.pp, world, params.n_layers, opts.schedule, opts.microbatches, opts.batch_size)
        inputs, targets, sha, n_rows = _pipeline_data(read, rank, opts.pp)
    else:
        inputs, targets, sha = read()
        n_rows = inputs.shape[0]
    eval_inputs = eval_targets = None
    if opts.eval_data is not None:
        eval_path = Path(opts.eval_data).expanduser()
        if not eval_path.is_file():
            raise FileNotFoundError(f"--eval_data {eval_path} does not exist. Pass a JSONL file like --data's.")
        eval_inputs, eval_targets = packed(eval_path)
    replicas = world // opts.pp
    rows_per_step = opts.batch_size * opts.grad_accum * replicas
    if opts.steps is not None:
        total = int(opts.steps)
    else:
        total = max(1, math.ceil(float(opts.epochs if opts.epochs is not None else 1) * n_rows / rows_per_step))
    start = 0
    if state is not None:
        mismatch = {k: (v, opts.identity().get(k)) for k, v in state["identity"].items() if opts.identity().get(k) != v}
        if state["world_size"] != world:
            mismatch["processes"] = (state["world_size"], world)
        if state["data_sha256"] != sha:
            mismatch["data"] = ("the saved run's file", f"a changed {data_path}")
        if mismatch:
            shown = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in mismatch.items())
            raise ValueError(f"--resume: this run differs from the one saved in {out}: {shown}. Resume with the "
                             "saved run's flags and data, or start a new run with another --out.")
        start = int(state["step"])
        if start >= total:
            raise ValueError(f"--resume: the run in {out} already did {start} steps and this one asks for {total}. "
                             "Raise --steps (or --epochs) to train further.")
    if not opts.full:
        block, fixed = stored_bytes(params, dtype)
        extra["plan"] = budget.plan_training(
            params, block_bytes=block, fixed_weight_bytes=fixed, lora_params=lora_parameter_count(config, params.n_layers),
            seq_len=opts.seq_len, batch_size=opts.batch_size, itemsize=dtype.itemsize, lora_rank=config.rank,
            offload_activations=bool(offload_activations), gpu_memory_gb=opts.gpu_memory_gb)
    return Prepared(opts, ckpt_dir, tokenizer_path, params, config, inputs, targets, eval_inputs, eval_targets, sha,
                    total, start, state, device, dtype, bool(offload_activations), n_rows=n_rows, **extra)


def _pipeline_data(read: Any, rank: int, pp: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], str, int]:
    """Pipeline stages: only the first and the last stage of each replica read and tokenise the data (the first
    feeds the token ids, the last the targets). Rank 0's outcome, the row count or the error, goes to every rank,
    so a bad file is one line everywhere and no rank waits for another that has stopped."""
    stage = rank % pp
    inputs = targets = None
    outcome: list[Any] = [None]
    if stage in (0, pp - 1):
        try:
            inputs, targets, sha = read()
            outcome[0] = ("ok", int(inputs.shape[0]), sha)
        except (ValueError, OSError) as e:
            outcome[0] = ("error", type(e).__name__, str(e))
    dist.broadcast_object_list(outcome, src=0)
    kind, a, b = outcome[0]
    if kind == "error":
        raise {"FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError}.get(a, ValueError)(b)
    return inputs, targets, b, a


def _prepare_full(opts: FinetuneOptions, ckpt_dir: Path, tokenizer_path: Path, params: ModelArgs, meta: dict,
                  data_path: Path, out: Path, dtype: torch.dtype, device: torch.device, world: int, *,
                  resuming: bool) -> dict[str, Any]:
    """--full's checks and plan, before any weight is read: a 16-bit source, the memory plan, --out and its disk."""
    if read_quantization(ckpt_dir) is not None:
        raise ValueError(f"--full trains every weight, and {ckpt_dir} is quantized: its weights cannot be trained "
                         "directly. Fine-tune the 16-bit checkpoint it was made from, or train a LoRA adapter on "
                         "this one (drop --full).")
    shards = find_shards(ckpt_dir)
    first = open_shard(shards[0])  # memory-mapped: only the header is read
    sample = first.get("tok_embeddings.weight", next(iter(first.values())))
    source_dtype = sample.dtype
    del first, sample
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"--dtype {dtype_name(dtype)}: full fine-tuning computes in bfloat16, float16 or float32.")
    plan = None if opts.pp > 1 else budget.plan_full_training(  # pipeline stages: every stage's optimizer on its device
        params, seq_len=opts.seq_len, batch_size=opts.batch_size, itemsize=dtype.itemsize, world=world,
        optim_state=opts.optim_state, keep_grads=opts.grad_accum > 1 or opts.max_grad_norm is not None,
        offload_activations=opts.offload_activations, on_gpu=device.type == "cuda",
        gpu_memory_gb=opts.gpu_memory_gb, host_memory_gb=opts.host_memory_gb)
    tokenizer_name, tokenizer_files = tokenizer_copy_files(tokenizer_path)
    sources = [ckpt_dir, data_path, *tokenizer_files.values()]
    # A save: the weights, every rank's master weights and moments, and (while it replaces the last) the last one.
    owned = budget.param_counts(params)["held"]
    one = checkpoint_bytes(params, source_dtype.itemsize) + int((4 + budget.MOMENT_BYTES[opts.optim_state]) * owned)
    check_out_dir(out, force=bool(opts.force) or resuming, sources=sources, needed_bytes=one if resuming else 2 * one)
    return dict(plan=plan, source_meta=meta, source_dtype=source_dtype, source_dtype_name=dtype_name(source_dtype),
                num_shards=len(shards), tokenizer_name=tokenizer_name, tokenizer_files=tokenizer_files,
                sources=sources)


_STATE_KEYS = ("version", "step", "identity", "world_size", "data_sha256", "optimizer", "history")


def _read_state(path: Path, *, full: bool) -> dict:
    """The trainer state a run saved, read whole and checked for its keys: a damaged file is one line."""
    try:
        # mmap: a full fine-tuning state holds the master weights and moments, several times the model
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch.load raises many types on a truncated or foreign file
        detail = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"--resume: {path} could not be read ({detail}): it is truncated or damaged. Start a new run "
                         "with another --out; " + ("the checkpoint saved beside it is still usable." if full else
                         "the adapter saved beside it is still usable with --lora.")) from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} was written by another version of llama_offload; start a new run.")
    missing = [k for k in (*_STATE_KEYS, *(() if full else ("adapter",))) if k not in state]
    if missing:
        raise ValueError(f"--resume: {path} lacks {', '.join(missing)}: it is damaged. Start a new run with another "
                         "--out.")
    if (state.get("kind") == "full") != bool(full):
        raise ValueError(f"--resume: the run saved in {path.parent} trained {'every weight (--full)' if full is False else 'a LoRA adapter'}; "
                         f"resume it {'with' if not full else 'without'} --full.")
    return state


def check_out_room(out: Path, config: lora.LoRAConfig, *, resuming: bool) -> int:
    """Refuse, before any weight is read, an --out that cannot be written or whose disk cannot hold the saves;
    return the bytes asked for.

    Every save writes the adapter and the trainer state into a temporary sibling of --out, then swaps it in
    for the previous save: at the moment of the swap both are on disk, so the disk must hold two saves (one
    more when resuming, the run's own save being there already). Leftovers of killed runs beside --out are
    removed by the probe (cleanup.remove_stale), before the free space is measured."""
    one = adapter.save_bytes(config)
    need = one if resuming else 2 * one
    where = existing_ancestor(out)
    try:
        remove_tree(new_temp_dir(where, out.name))  # a real write: permissions, a read-only mount, root or not
    except OSError as e:
        raise PermissionError(f"--out {out} cannot be written: {where} is not writable ({e.strerror or e}). Choose an "
                              "--out in a directory you can write to.") from None
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(f"Not enough free disk space for --out {out}: its saves (adapter and trainer "
                      f"state, {one / 2**20:.1f} MiB each, {'one more' if resuming else 'two'} on disk while a save "
                      f"replaces the previous one) need about {need / 2**20:.1f} MiB, and the disk of {where} has "
                      f"{free / 2**20:.1f} MiB free. Free some space, choose an --out on another disk, or lower "
                      "--lora_rank.")
    return need


def make_trainer(prep: Prepared, *, show_progress: bool = True) -> Trainer:
    """The base model loaded in the training dtype, and the trainer of the run's mode around it."""
    rank, _ = _world()
    model = load_model(prep.ckpt_dir, max_seq_len=prep.opts.seq_len, max_batch_size=prep.opts.batch_size,
                       dtype=prep.dtype, vocab_size=prep.params.vocab_size, model_parallel_size=1,
                       show_progress=show_progress and rank == 0)
    return FullTrainer(prep, model) if prep.opts.full else LoraTrainer(prep, model)


def _describe(prep: Prepared, world: int) -> str:
    opts = prep.opts
    what = ("every weight" if opts.full else
            f"LoRA rank {prep.config.rank} on {','.join(prep.config.targets)}")
    show = prep.plan is not None and (prep.device.type == "cuda" or opts.full or opts.dry_run)
    plan = prep.plan.describe() if show else f"on {prep.device}"
    stages = f" ({world // opts.pp} replicas of {opts.pp} pipeline stages, {opts.schedule})" if opts.pp > 1 else ""
    return (f"llama_offload finetune: {prep.n_rows} rows of {opts.seq_len} tokens; {world} "
            f"process{'es' if world > 1 else ''}{stages}; {what}; {prep.total_steps} steps"
            + (f" (resuming after step {prep.start_step})" if prep.start_step else "") + f"; {plan}")


def finetune(opts: FinetuneOptions, *, show_progress: bool = True) -> Path:
    """Run (or resume) a fine-tuning job; returns the directory written (the adapter, or the checkpoint)."""
    # A dry run plans a GPU run on any machine: --device cuda is taken at its word, and nothing runs on it.
    device = torch.device(opts.device) if opts.dry_run and opts.device else start_data_parallel(opts.device)
    prep = prepare(opts, device)
    rank, world = _world()
    if opts.dry_run:
        if rank == 0:
            print(_describe(prep, world) + "; dry run: nothing was loaded or written", file=sys.stderr)
        return Path(opts.out).expanduser()
    if opts.pp > 1:
        from llama_offload.train.pipeline_trainer import PipelineTrainer

        trainer: Any = PipelineTrainer(prep, show_progress=show_progress)
    else:
        trainer = make_trainer(prep, show_progress=show_progress)
    try:
        if rank == 0:
            print(_describe(prep, world), file=sys.stderr)
        return _train(trainer, prep, show_progress=show_progress)
    finally:
        trainer.close()


def _train(trainer: Trainer, prep: Prepared, *, show_progress: bool) -> Path:
    opts, device = prep.opts, prep.device
    rank, world = _world()
    progress = Progress(prep.total_steps, prep.start_step, device, enabled=show_progress and rank == 0)
    step = prep.start_step
    try:
        while step < prep.total_steps:
            start = time.perf_counter()
            loss, tokens = trainer.train_step(step)
            step += 1
            eval_loss = trainer.eval_loss() if step % opts.eval_every == 0 or step == prep.total_steps else None
            record = {"step": step, "loss": loss, "seconds": time.perf_counter() - start}
            if eval_loss is not None:
                record["eval_loss"] = eval_loss
            if trainer.grad_norm is not None:
                record["grad_norm"] = trainer.grad_norm
            trainer.history.append(record)
            progress.update(step, loss, tokens, eval_loss)
            if step % opts.save_every == 0 and step < prep.total_steps:
                _save(trainer, step, rank)
    except KeyboardInterrupt:
        if step > prep.start_step:
            try:
                _save(trainer, step, rank)
                if rank == 0:
                    print(f"\nllama_offload finetune: interrupted; saved step {step} in {opts.out}; continue with "
                          "--resume", file=sys.stderr)
            except (adapter.SaveError, OSError) as e:  # the signal still decides the exit; the reason is shown
                if rank == 0:
                    print(f"\nllama_offload finetune: interrupted; step {step} was not saved: {e}", file=sys.stderr)
        raise
    out = _save(trainer, step, rank)
    if world > 1:
        dist.barrier()
    return out


def _save(trainer: Trainer, step: int, rank: int) -> Path:
    """LoRA: rank 0 holds the whole (replicated) state. Full: every rank holds its share, so every rank saves."""
    if isinstance(trainer, FullTrainer) or trainer.prep.opts.pp > 1 or rank == 0:
        return trainer.save(step)
    return Path(trainer.prep.opts.out)
