"""Everything about a run that can be checked before a weight is read.

``check_before_load`` needs only params.json, the tokenizer, the shard files' names and sizes, and the plan:
the device, the tokenizer's vocabulary, the chat format, the context length, the slices, the GPU budget and
host memory are all refused here, in a second, instead of after a load that takes minutes on a large model.
``Llama.build`` runs it first; ``info`` shows what it found.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.model import parallel
from llama_offload.model.args import ModelArgs
from llama_offload.text.chat_format import default_chat_format_name, get_chat_format
from llama_offload.checkpoint.load import (
    already_quantized_message, check_shard_sizes, checkpoint_context_length, find_shards,
)
from llama_offload.checkpoint.meta import read_checkpoint_meta
from llama_offload.generate.drafts import draft_gpu_bytes
from llama_offload.offload.lanes import choose_host_kernel, lanes_for_run, stored_block_format
from llama_offload.model.lora import lora_cpu_blocks
from llama_offload.checkpoint.lora_merge import check_lora
from llama_offload.offload.plan import (
    GiB, HostKernel, HostPlan, OffloadPlan, WeightBytes, linear_shapes, check_host_memory, plan_host, plan_offload,
    weight_bytes,
)
from llama_offload.model.quant import LINEAR_NAMES, QuantSpec, format_name
from llama_offload.checkpoint.quant_load import quantized_prefixes, read_quantization
from llama_offload.generate.run_options import RunOptions, check_device_name
from llama_offload.text.tokenizer import Tokenizer, check_vocab_size, load_tokenizer

__all__ = ["Preflight", "check_before_load", "check_context_length", "resolve_device", "stored_weight_bytes"]


@dataclass(frozen=True)
class Preflight:
    args: ModelArgs  # vocab_size filled from the tokenizer, run sizes set
    tokenizer: Tokenizer
    chat_format: str
    device: torch.device
    dtype: torch.dtype  # the dtype the plans are made for
    stored_itemsize: int  # bytes per weight in the shard files
    n_shards: int
    context_length: Optional[int]
    context_source: str
    plan: OffloadPlan
    host: HostPlan
    cpu_threads: Optional[int] = None  # the CPU lane's threads, when the plan has one
    lora: Optional[Any] = None  # --lora's config (train.lora.LoRAConfig), checked against the checkpoint


def resolve_device(device: Optional[str]) -> torch.device:
    """``--device`` (None: cuda if available, else cpu) as a device this machine has."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(check_device_name(str(device)))
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU. Leave --device "
                               "unset (or give cpu) to run on the CPU, or install a CUDA build of torch.")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"numbered 0..{torch.cuda.device_count() - 1}.")
    return target


def check_context_length(max_seq_len: int, context: Optional[int], source: str, allow: bool) -> None:
    if context is None or max_seq_len <= context or allow:
        return
    raise ValueError(
        f"--max_seq_len {max_seq_len} is above the {context} tokens this model was trained for ({source}). "
        f"Use --max_seq_len {context} or less, or pass --allow_long_context to run it anyway: the model was not "
        "trained for longer sequences, and its output degrades past that length."
    )


def check_before_load(ckpt_dir: str | Path, tokenizer_path: str | Path, options: RunOptions, *,
                      model_parallel_size: int = 1, check_memory: bool = True) -> Preflight:
    """Check a run of ``options`` on the checkpoint without reading a weight; what was found, planned.

    ``model_parallel_size``: the plan is one rank's of that many. ``check_memory``: refuse a host plan
    larger than the available RAM (``info`` shows it instead)."""
    opts = options.checked()
    device = resolve_device(opts.device)
    ckpt_dir = Path(ckpt_dir)
    shards = find_shards(ckpt_dir)  # names only: a missing directory or shard is reported first
    args = ModelArgs.from_json(ckpt_dir / "params.json", max_seq_len=opts.max_seq_len,
                               max_batch_size=opts.max_batch_size)
    # The adapter's config, its shape against params.json, an unquantized checkpoint, one process.
    lora = (check_lora(opts.lora, ckpt_dir, args, model_parallel_size=model_parallel_size, merging=False)
            if opts.lora is not None else None)
    cpu_blocks = opts.cpu_blocks
    if lora is not None and read_quantization(ckpt_dir) is not None:
        cpu_blocks = lora_cpu_blocks(cpu_blocks)
    tokenizer = load_tokenizer(tokenizer_path)
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    else:
        check_vocab_size(tokenizer, args.vocab_size, source=str(ckpt_dir / "params.json"))
    meta = read_checkpoint_meta(ckpt_dir)
    chat_format = opts.chat_format or meta.get("chat_format") or default_chat_format_name(tokenizer)
    get_chat_format(chat_format, tokenizer)  # the format's special tokens must be in this vocabulary
    context, source = checkpoint_context_length(ckpt_dir, args)
    check_context_length(opts.max_seq_len, context, source, opts.allow_long_context)
    on_cpu = device.type == "cpu"
    itemsize, sizes = stored_weight_bytes(ckpt_dir, args, opts.quant_spec, opts.torch_dtype or
                                          (torch.float32 if on_cpu else None), model_parallel_size)
    stored = {2: torch.float16, 4: torch.float32}[itemsize]  # a stand-in of the stored width
    dtype = opts.torch_dtype or (torch.float32 if on_cpu else stored)
    # A model draft stays on the GPU: the model's blocks are planned in what it leaves of the budget.
    budget = opts.gpu_memory_gb
    draft = draft_gpu_bytes(opts, ckpt_dir, args, dtype) if not on_cpu else 0
    if budget is not None and draft:
        if budget <= draft / GiB:
            raise ValueError(f"--draft {opts.draft} needs about {draft / GiB:.2f} GiB of the GPU, all of "
                             f"--gpu_memory_gb {budget:g}. Raise --gpu_memory_gb, or use --draft ngram.")
        budget -= draft / GiB
    # The CPU lane's calibration (cached per machine) sizes the split between streamed and CPU-computed blocks.
    lanes, threads = lanes_for_run(cpu_blocks, opts.cpu_threads, args, dtype, device, offload=opts.offload,
                                   spec=stored_spec(ckpt_dir, opts.quant_spec), model_parallel_size=model_parallel_size,
                                   processes=_local_processes(model_parallel_size))
    # The plan offload() makes for these flags (it refuses slices and budgets the same way, after the load).
    plan = plan_offload(args, dtype, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len,
                        gpu_memory_gb=budget, num_slices=opts.num_slices,
                        model_parallel_size=model_parallel_size, prefill_chunk=opts.prefill_chunk,
                        all_resident=not opts.offload and not on_cpu, sizes=sizes,
                        cpu_blocks=0 if on_cpu else cpu_blocks, lanes=lanes)
    if on_cpu:
        # How the matrices multiply on this CPU: timed once per machine and format (a quantized checkpoint's
        # blocks read through their codes are several times faster than dequantized every step).
        plan = dataclasses.replace(plan, host_kernel=host_kernel(ckpt_dir, shards[0], args, dtype, opts.quant_spec))
        cpu_plan = plan_offload(args, dtype, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len,
                                model_parallel_size=model_parallel_size, prefill_chunk=opts.prefill_chunk,
                                all_resident=True, sizes=sizes)
        host = plan_host(cpu_plan, on_cpu=True, processes=_local_processes(model_parallel_size))
    else:
        # Merged matrices are new tensors: count the weights as a copy, as for a dtype change.
        load_copy = dtype.itemsize != itemsize or len(shards) > 1 or lora is not None
        host = plan_host(plan, on_cpu=False, load_copy=load_copy, processes=_local_processes(model_parallel_size))
    if check_memory:
        check_host_memory(host)
    return Preflight(args, tokenizer, chat_format, device, dtype, itemsize, len(shards), context, source, plan, host,
                     threads if plan.cpu_blocks else None, lora)


def host_kernel(ckpt_dir: str | Path, shard: Path, args: ModelArgs, dtype: torch.dtype,
                spec: Optional[QuantSpec]) -> Optional[HostKernel]:
    """How a run on the CPU multiplies its matrices (lanes.choose_host_kernel): timed on a random block in the
    format the run computes with, a quantized checkpoint's own read from ``shard``'s tensor headers."""
    stored = None
    if spec is None and read_quantization(ckpt_dir) is not None:
        from llama_offload.checkpoint.load import _load_shard

        stored = stored_block_format(_load_shard(shard))
    return choose_host_kernel(args, dtype, spec=spec, stored=stored, verbose=parallel.is_rank0())


def stored_spec(ckpt_dir: str | Path, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
    """The blocks' format a run computes with: ``--quantize``'s, else a quantized checkpoint's own."""
    if spec is not None:
        return spec
    stored = read_quantization(ckpt_dir)
    if not stored or stored.get("bits") not in (4, 8):
        return None
    return QuantSpec(int(stored["bits"]), stored.get("group_size") if stored["bits"] == 4 else None)


def stored_weight_bytes(ckpt_dir: str | Path, args: ModelArgs, spec: Optional[QuantSpec], dtype: Optional[torch.dtype],
                        model_parallel_size: int = 1) -> tuple[int, WeightBytes]:
    """(bytes per element the 16/32-bit tensors are stored with, the weight bytes a run holds) without reading a
    weight: shard sizes must fit params.json; a quantized checkpoint is measured from its tensors' headers; a
    ``--quantize`` spec must fit the model's shapes (and is refused on an already quantized checkpoint).
    ``dtype``: the run's (None: as stored)."""
    if read_quantization(ckpt_dir) is not None:
        if spec is not None:
            raise ValueError(already_quantized_message(ckpt_dir, spec))
        return _quantized_sizes(find_shards(ckpt_dir), args, dtype, model_parallel_size)
    itemsize = check_shard_sizes(ckpt_dir, args)
    if spec is not None:
        shapes = {f"layers.N.{name}": shape for name, shape in zip(LINEAR_NAMES, linear_shapes(args, 1))}
        spec.check_shapes(shapes)  # a group size that does not divide is refused before any weight is read
    run_dtype = dtype or {2: torch.float16, 4: torch.float32}[itemsize]
    return itemsize, weight_bytes(args, run_dtype, model_parallel_size, spec)


def _quantized_sizes(shards: list[Path], args: ModelArgs, dtype: Optional[torch.dtype],
                     model_parallel_size: int) -> tuple[int, WeightBytes]:
    from llama_offload.checkpoint.load import _load_shard, expected_shapes
    from llama_offload.checkpoint.quant_load import check_quantized_state_dict, quantized_weight_bytes

    state_dict = _load_shard(shards[0])
    check_quantized_state_dict(state_dict, expected_shapes(args), str(shards[0]))
    stored = state_dict["norm.weight"].dtype
    block, embedding, head, scratch = quantized_weight_bytes(state_dict, args, dtype or stored)
    n = model_parallel_size
    kinds = sorted({format_name(state_dict[f"{p}.weight"], state_dict[f"{p}.scales"])
                    for p in quantized_prefixes(state_dict) if p.startswith("layers.")})
    return stored.itemsize, WeightBytes(block // n, embedding // n, head // n, scratch, "/".join(kinds) + ", as stored")


def _local_processes(model_parallel_size: int) -> int:
    """Ranks sharing this host's RAM: torchrun's LOCAL_WORLD_SIZE, else all of them."""
    try:
        return min(model_parallel_size, int(os.environ.get("LOCAL_WORLD_SIZE", model_parallel_size)))
    except ValueError:
        return model_parallel_size
