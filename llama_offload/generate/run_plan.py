"""One plan per run, made before a weight is read: what ``info`` prints and what ``Llama.build`` carries out.

``plan_run`` takes the checkpoint record (read once, checkpoint/record.py) and the run options, and decides
everything that needs no weights: the device, the tokenizer and its vocabulary, the chat format, the context
length, the draft (``--draft auto`` resolved) and its share of the GPU budget, the stored format, the blocks'
placement (resident, paged, CPU lane), the CPU kernel, and the GPU and host memory. Every refusal before loading
comes from here, in a second, instead of after a load that takes minutes on a large model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.checkpoint.load import already_quantized_message, check_shard_sizes, describe_quantization_record, \
    expected_shapes
from llama_offload.checkpoint.lora_merge import check_lora, describe as describe_lora
from llama_offload.checkpoint.meta import describe_source
from llama_offload.model.dtypes import dtype_name
from llama_offload.checkpoint.quant_load import check_quantized_state_dict, quantized_prefixes, \
    quantized_weight_bytes, read_quantization
from llama_offload.checkpoint.record import CheckpointInfo, as_checkpoint, context_length
from llama_offload.generate.drafts import choose_draft, draft_gpu_bytes
from llama_offload.generate.run_options import RunOptions, check_device_name
from llama_offload.model import parallel
from llama_offload.model.args import ModelArgs, param_counts
from llama_offload.model.lora import lora_cpu_blocks
from llama_offload.model.quant import LINEAR_NAMES, QuantSpec, format_name
from llama_offload.offload.lanes import choose_host_kernel, lanes_for_run, stored_block_format
from llama_offload.offload.plan import (
    GiB, HostKernel, HostPlan, OffloadPlan, WeightBytes, available_host_bytes, check_host_memory, linear_shapes,
    plan_host, plan_offload, weight_bytes,
)
from llama_offload.text.chat_format import chat_format_name, get_chat_format
from llama_offload.text.tokenizer import Tokenizer, check_vocab_size, load_tokenizer

__all__ = ["RunPlan", "check_context_length", "plan_run", "resolve_device", "stored_weight_bytes"]


@dataclass(frozen=True)
class RunPlan:
    checkpoint: CheckpointInfo
    options: RunOptions  # checked, with --draft auto resolved
    args: ModelArgs  # vocab_size filled from the tokenizer, run sizes set
    tokenizer: Tokenizer
    tokenizer_path: Path
    chat_format: str
    device: torch.device
    dtype: torch.dtype  # the dtype the model computes in
    stored_itemsize: int  # bytes per 16/32-bit weight in the shard files
    context_length: Optional[int]
    context_source: str
    offload: OffloadPlan  # the blocks' placement and the GPU memory: what offload() carries out
    host: HostPlan
    cpu_threads: Optional[int] = None  # the CPU lane's threads, when the plan has one
    lora: Optional[Any] = None  # --lora's config (model.lora.LoRAConfig), checked against the checkpoint
    lora_attached: bool = False  # beside a quantized checkpoint's codes (resident, no CPU lane), not merged
    draft_bytes: int = 0  # what a model draft holds on the GPU, taken out of --gpu_memory_gb

    @property
    def load_dtype(self) -> Optional[torch.dtype]:
        """What the loader converts the weights to (None: as stored; on the CPU float32 is both faster and closer
        to the reference than bf16)."""
        return self.options.torch_dtype or (torch.float32 if self.device.type == "cpu" else None)

    @property
    def quantization(self) -> Optional[dict[str, Any]]:
        return read_quantization(self.checkpoint)

    def describe(self) -> str:
        """The plan as ``info`` prints it."""
        return "\n".join(_describe(self))


def resolve_device(device: Optional[str], *, planning_only: bool = False) -> torch.device:
    """``--device`` (None: cuda if available, else cpu) as a device this machine has. ``planning_only``: a GPU
    this machine lacks may still be planned for (``info --device cuda``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(check_device_name(str(device)))
    if target.type == "cuda" and not planning_only:
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


def plan_run(ckpt: CheckpointInfo | str | Path, tokenizer_path: str | Path, options: RunOptions, *,
             model_parallel_size: int = 1, check_memory: bool = True, planning_only: bool = False) -> RunPlan:
    """The plan of a run of ``options`` on the checkpoint, made without reading a weight; every refusal before
    loading is raised here.

    ``model_parallel_size``: the plan is one rank's of that many. ``check_memory``: refuse a host plan larger
    than the available RAM. ``planning_only`` (``info``): plan for ``--device cuda`` on a machine without one, and
    leave the context length and host memory to the caller to show as warnings."""
    opts = options.checked()
    device = resolve_device(opts.device, planning_only=planning_only)
    ckpt = as_checkpoint(ckpt)
    opts = choose_draft(opts, ckpt, device)  # --draft auto, and a self-draft of a quantized checkpoint refused
    args = ckpt.model_args(max_seq_len=opts.max_seq_len, max_batch_size=opts.max_batch_size)
    quantized = read_quantization(ckpt) is not None
    # The adapter's config, its shape against params.json, one process. Beside a quantized checkpoint's codes it
    # is attached, not merged: it stays on the GPU, out of the CPU lane's reach (model.lora.lora_cpu_blocks).
    lora = (check_lora(opts.lora, ckpt, args, model_parallel_size=model_parallel_size, merging=False)
            if opts.lora is not None else None)
    attached = lora is not None and quantized
    cpu_blocks = lora_cpu_blocks(opts.cpu_blocks) if attached else opts.cpu_blocks
    tokenizer = load_tokenizer(tokenizer_path)
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    else:
        check_vocab_size(tokenizer, args.vocab_size, source=str(ckpt.params_path))
    chat_format = chat_format_name(opts.chat_format, ckpt.meta, tokenizer)
    get_chat_format(chat_format, tokenizer)  # the format's special tokens must be in this vocabulary
    context, source = context_length(ckpt, args)
    if not planning_only:
        check_context_length(opts.max_seq_len, context, source, opts.allow_long_context)
    on_cpu = device.type == "cpu"
    itemsize, sizes = stored_weight_bytes(ckpt, args, opts.quant_spec, opts.torch_dtype or
                                          (torch.float32 if on_cpu else None), model_parallel_size)
    stored = _stored_dtype(ckpt, itemsize)
    dtype = opts.torch_dtype or (torch.float32 if on_cpu else stored)
    # A model draft stays on the GPU: the model's blocks are planned in what it leaves of the budget.
    budget = opts.gpu_memory_gb
    draft = draft_gpu_bytes(opts, ckpt, args, dtype) if not on_cpu else 0
    if budget is not None and draft:
        if budget <= draft / GiB:
            raise ValueError(f"--draft {opts.draft} needs about {draft / GiB:.2f} GiB of the GPU, all of "
                             f"--gpu_memory_gb {budget:g}. Raise --gpu_memory_gb, or use --draft ngram.")
        budget -= draft / GiB
    processes = _local_processes(model_parallel_size)
    # The CPU lane's calibration (cached per machine) sizes the split between streamed and CPU-computed blocks;
    # it is measured on the GPU, so a plan for a GPU this machine lacks has no lane unless --cpu_blocks says.
    lanes, threads = (None, None)
    if on_cpu or torch.cuda.is_available():
        lanes, threads = lanes_for_run(cpu_blocks, opts.cpu_threads, args, dtype, device, offload=opts.offload,
                                       spec=stored_spec(ckpt, opts.quant_spec),
                                       model_parallel_size=model_parallel_size, processes=processes)
    plan = plan_offload(args, dtype, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len,
                        gpu_memory_gb=budget, num_slices=opts.num_slices,
                        model_parallel_size=model_parallel_size, prefill_chunk=opts.prefill_chunk,
                        all_resident=not opts.offload and not on_cpu, sizes=sizes,
                        cpu_blocks=0 if on_cpu else cpu_blocks, lanes=lanes)
    if on_cpu:
        # How the matrices multiply on this CPU: timed once per machine and format (a quantized checkpoint's
        # blocks read through their codes are several times faster than dequantized every step).
        plan = dataclasses.replace(plan, host_kernel=host_kernel(ckpt, args, dtype, opts.quant_spec))
        cpu_plan = plan_offload(args, dtype, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len,
                                model_parallel_size=model_parallel_size, prefill_chunk=opts.prefill_chunk,
                                all_resident=True, sizes=sizes)
        host = plan_host(cpu_plan, on_cpu=True, processes=processes)
    else:
        # Merged matrices are new tensors: count the weights as a copy, as for a dtype change.
        load_copy = dtype.itemsize != itemsize or len(ckpt.shards) > 1 or lora is not None
        host = plan_host(plan, on_cpu=False, load_copy=load_copy, processes=processes)
    if check_memory and not planning_only:
        check_host_memory(host)
    return RunPlan(ckpt, opts, args, tokenizer, Path(tokenizer_path), chat_format, device, dtype, itemsize, context,
                   source, plan, host, threads if plan.cpu_blocks else None, lora, attached, draft)


def _stored_dtype(ckpt: CheckpointInfo, itemsize: int) -> torch.dtype:
    """The dtype the checkpoint's 16/32-bit tensors are stored in: the final norm's, from shard 00's index (the
    mapping the loader reads from next), else a stand-in of the stored width."""
    norm = ckpt.shard(0).get("norm.weight")
    if norm is not None and norm.is_floating_point():
        return norm.dtype
    return {2: torch.float16, 4: torch.float32}[itemsize]


def host_kernel(ckpt: CheckpointInfo, args: ModelArgs, dtype: torch.dtype,
                spec: Optional[QuantSpec]) -> Optional[HostKernel]:
    """How a run on the CPU multiplies its matrices (lanes.choose_host_kernel): timed on a random block in the
    format the run computes with, a quantized checkpoint's own read from shard 00's tensor headers."""
    stored = None
    if spec is None and read_quantization(ckpt) is not None:
        stored = stored_block_format(ckpt.shard(0))
    return choose_host_kernel(args, dtype, spec=spec, stored=stored, verbose=parallel.is_rank0())


def stored_spec(ckpt: CheckpointInfo | str | Path, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
    """The blocks' format a run computes with: ``--quantize``'s, else a quantized checkpoint's own."""
    if spec is not None:
        return spec
    stored = read_quantization(ckpt)
    if not stored or stored.get("bits") not in (4, 8):
        return None
    return QuantSpec(int(stored["bits"]), stored.get("group_size") if stored["bits"] == 4 else None)


def stored_weight_bytes(ckpt: CheckpointInfo | str | Path, args: ModelArgs, spec: Optional[QuantSpec],
                        dtype: Optional[torch.dtype], model_parallel_size: int = 1) -> tuple[int, WeightBytes]:
    """(bytes per element the 16/32-bit tensors are stored with, the weight bytes a run holds) without reading a
    weight: shard sizes must fit params.json; a quantized checkpoint is measured from its tensors' headers; a
    ``--quantize`` spec must fit the model's shapes (and is refused on an already quantized checkpoint).
    ``dtype``: the run's (None: as stored)."""
    ckpt = as_checkpoint(ckpt)
    if read_quantization(ckpt) is not None:
        if spec is not None:
            raise ValueError(already_quantized_message(ckpt.path, spec))
        return _quantized_sizes(ckpt, args, dtype, model_parallel_size)
    itemsize = check_shard_sizes(ckpt, args)
    if spec is not None:
        shapes = {f"layers.N.{name}": shape for name, shape in zip(LINEAR_NAMES, linear_shapes(args, 1))}
        spec.check_shapes(shapes)  # a group size that does not divide is refused before any weight is read
    run_dtype = dtype or {2: torch.float16, 4: torch.float32}[itemsize]
    return itemsize, weight_bytes(args, run_dtype, model_parallel_size, spec)


def _quantized_sizes(ckpt: CheckpointInfo, args: ModelArgs, dtype: Optional[torch.dtype],
                     model_parallel_size: int) -> tuple[int, WeightBytes]:
    state_dict = ckpt.shard(0)
    check_quantized_state_dict(state_dict, expected_shapes(args), str(ckpt.shards[0]))
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


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def _describe(run: RunPlan) -> list[str]:
    ckpt, opts, args, plan = run.checkpoint, run.options, run.args, run.offload
    meta, quantization, n_layers = ckpt.meta, run.quantization, args.n_layers
    counts = param_counts(args, tied=bool(meta.get("tied_embeddings")))
    out = [f"checkpoint     {ckpt.path}"]
    if meta:
        out.append(f"converted from {describe_source(meta.get('source'))}; chat format "
                   f"{meta.get('chat_format') or 'none recorded'}")
    for merged in meta.get("lora_merged") or []:
        if isinstance(merged, dict):
            out.append(f"merged adapter LoRA rank {merged.get('rank', '?')}, targets "
                       f"{','.join(map(str, merged.get('targets') or [])) or '?'}, from {merged.get('path', '?')}")
    if run.lora is not None:
        how = ("attached beside the quantized matrices (resident on the GPU; no CPU lane)" if run.lora_attached else
               "merged into the weights while loading" + (", before --quantize" if opts.quant_spec is not None else ""))
        out.append(f"adapter        {opts.lora}: {describe_lora(run.lora)}; {how}")
    if quantization is not None:
        # The blocks' own bytes, measured from the shard's tensors: the storage a run reads, not the compute dtype.
        measured = n_layers * plan.block_bytes * 8 / max(1, n_layers * counts["per_block"])
        out.append(f"storage        {describe_quantization_record(quantization)}; {measured:.2f} bits/weight over the "
                   "blocks, measured")
        source = "from --dtype" if opts.torch_dtype is not None else "the dtype its norms are stored in"
        codes = run.device.type == "cpu" and plan.host_kernel is not None and plan.host_kernel.kernel == "gemv"
        how = ("multiplied through their codes (the gemv kernel below)" if codes
               else "dequantized to it as they are used")
        out.append(f"dtype          compute {dtype_name(run.dtype)} ({source}); the quantized matrices are {how}")
    elif opts.torch_dtype is not None:
        out.append(f"dtype          {dtype_name(run.dtype)} (from --dtype)")
    else:
        how = "on the CPU, float32" if run.device.type == "cpu" else "as stored"
        out.append(f"dtype          {dtype_name(run.dtype)} ({how}; stored as "
                   f"{dtype_name(_stored_dtype(ckpt, run.stored_itemsize))} in {len(ckpt.shards)} shard(s))")
    vocab_note = " (params.json says -1: taken from the tokenizer)" if ckpt.params.get("vocab_size", -1) == -1 else ""
    out.append(f"model          dim {args.dim}, {n_layers} layers, {args.n_heads} heads, {args.kv_heads} kv heads, "
               f"head_dim {args.head_dim}, ffn hidden {args.ffn_hidden_dim}, vocab {args.vocab_size}{vocab_note}, "
               f"rope_theta {args.rope_theta:g}{', scaled RoPE' if args.use_scaled_rope else ''}")
    out.append(f"parameters     {_fmt_count(counts['total'])}: {_fmt_count(counts['per_block'])} per block, "
               f"{_fmt_count(counts['resident'])} in embedding + norm + output head")
    held = (counts["held"] * run.dtype.itemsize if plan.quantization is None
            else n_layers * plan.block_bytes + plan.fixed_bytes["embedding"] + plan.fixed_bytes["output head + norm"])
    quantized = f" ({plan.quantization})" if plan.quantization else ""
    out.append(f"weights        {_fmt_bytes(plan.block_bytes)} per block{quantized}, "
               f"{_fmt_bytes(n_layers * plan.block_bytes)} for all {n_layers} blocks, {_fmt_bytes(held)} in all")
    out.append(f"run size       max_batch_size {opts.max_batch_size} x max_seq_len {opts.max_seq_len} (sizes the KV "
               "cache)")
    out.append(f"chat format    {run.chat_format}")
    if opts.draft is not None:
        held_draft = f", {_fmt_bytes(run.draft_bytes)} of the GPU taken out of the budget" if run.draft_bytes else ""
        out.append(f"draft          {opts.draft}, {opts.draft_tokens} tokens a pass{held_draft}")
    if run.device.type == "cpu":
        out.append(f"device         cpu: every block computed by the host's cores, in {dtype_name(run.dtype)}")
        if plan.host_kernel is not None:  # how its matrices multiply here
            out.append(f"CPU kernel     {plan.host_kernel.describe()}")
    else:
        where = "" if torch.cuda.is_available() else " (planned only: PyTorch sees no CUDA GPU here)"
        out.append(f"device         {run.device}{where}")
        out.append(f"paged          {plan.paged_layers} of {n_layers} blocks, in {plan.num_slices} slice(s), from "
                   f"{_fmt_bytes(plan.streamed_bytes)} of pinned host memory; {plan.resident_layers} block(s) resident")
        if plan.cpu_blocks:
            out.append(f"CPU lane       {plan.cpu_blocks} of {n_layers} blocks computed by the host's cores while the "
                       f"paged ones stream (placement: {''.join(w[0].upper() for w in plan.placement())}; R resident, "
                       "P paged, C CPU)")
        elif plan.lanes is None and opts.cpu_blocks is None and not torch.cuda.is_available():
            out.append("CPU lane       not planned: the split is calibrated on a machine with a GPU (or give "
                       "--cpu_blocks N)")
        out.append("GPU memory plan (the CUDA context, a few hundred MiB, comes on top):")
        out.append(plan.describe())
    out.append(f"context        {f'{run.context_length} tokens, from {run.context_source}' if run.context_length else 'not known (nothing records it)'}")
    try:  # info shows the plan anyway; the run refuses it
        check_context_length(opts.max_seq_len, run.context_length, run.context_source, opts.allow_long_context)
    except ValueError as e:
        out.append(f"  warning: {e}")
    out.append(f"Host memory plan, on {'the CPU' if run.device.type == 'cpu' else 'a GPU'}:")
    out.append(run.host.describe())
    available = available_host_bytes()
    if available is not None and run.host.total_bytes > available:
        out.append(f"  warning: more than the {available / 2**30:.2f} GiB available now (MemAvailable): "
                   f"{run.host.advice()}")
    return out
