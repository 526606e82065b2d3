"""How much of the model stays on the GPU: the offload plan for a GPU memory budget.

Everything is counted in bytes that PyTorch allocates; the CUDA context (a few hundred MB) comes on top.
The resident part is set aside first (embedding, final norm, output head, KV cache, RoPE table,
activations of the largest step, and the two slot buffers that paged blocks stream through); whatever
the budget leaves is filled with resident blocks, and the rest of the blocks are paged.

Under model parallelism over N ranks the plan is one rank's: its 1/N of every block, of the embedding,
the output head and the KV cache, against its own GPU's budget (``gpu_memory_gb`` is per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .args import ModelArgs
from .quant import LINEAR_NAMES, QuantSpec, scratch_bytes
from .step import cache_len

DEFAULT_PREFILL_CHUNK = 2048  # prompt positions per prefill pass unless --prefill_chunk says otherwise

GiB = 2**30


def block_bytes(args: ModelArgs, dtype: torch.dtype, model_parallel_size: int = 1) -> int:
    """One block's weights on one rank: 1/N of its matrices, all of its norms."""
    p, n = args, model_parallel_size
    attention = p.dim * p.head_dim * (2 * p.n_heads + 2 * p.kv_heads) // n  # wq, wo + wk, wv
    feed_forward = 3 * p.dim * p.ffn_hidden_dim // n  # w1, w2, w3
    norms = 2 * p.dim
    return (attention + feed_forward + norms) * dtype.itemsize


@dataclass(frozen=True)
class WeightBytes:
    """The weights' bytes on one rank, as the planner counts them: quantized models count their codes and scales."""

    block: int  # the largest block
    embedding: int
    head: int  # output head and final norm
    scratch: int = 0  # the buffer quantized matrices are dequantized into (quant.py)
    quantization: Optional[str] = None  # e.g. "int4 g64", shown by describe()


def linear_shapes(args: ModelArgs, model_parallel_size: int) -> list[tuple[int, int]]:
    """(out, in) of one block's seven matrices on one rank, in LINEAR_NAMES order."""
    p, n = args, model_parallel_size
    q, kv = p.n_heads * p.head_dim, p.kv_heads * p.head_dim
    return [(q // n, p.dim), (kv // n, p.dim), (kv // n, p.dim), (p.dim, q // n),
            (p.ffn_hidden_dim // n, p.dim), (p.dim, p.ffn_hidden_dim // n), (p.ffn_hidden_dim // n, p.dim)]


def _matrix_bytes(rows: int, cols: int, spec: Optional[QuantSpec], itemsize: int, bits: Optional[int] = None) -> int:
    bits = spec.bits if bits is None and spec is not None else bits
    if bits is None:
        return rows * cols * itemsize
    if bits == 8:
        return rows * cols + rows * 2  # int8 codes, one fp16 scale per output channel
    assert spec is not None and spec.group_size is not None
    return rows * cols // 2 + 2 * rows * (cols // spec.group_size) * 2  # nibbles, fp16 scale and min per group


def weight_bytes(args: ModelArgs, dtype: torch.dtype, model_parallel_size: int = 1,
                 spec: Optional[QuantSpec] = None) -> WeightBytes:
    """The bytes ``args``' weights take in ``dtype``, or quantized as ``spec`` says (before anything is loaded)."""
    b, mp = dtype.itemsize, model_parallel_size
    shapes = linear_shapes(args, mp)
    block = sum(_matrix_bytes(r, c, spec, b) for r, c in shapes) + 2 * args.dim * b
    emb_bits = 8 if spec is not None and spec.embeddings else None
    embedding = _matrix_bytes(args.vocab_size, args.dim // mp, None, b, emb_bits)
    head = _matrix_bytes(args.vocab_size // mp, args.dim, None, b, emb_bits) + args.dim * b
    if spec is None:
        return WeightBytes(block, embedding, head)
    matrices = shapes + [(shapes[0][0] + 2 * shapes[1][0], args.dim), (2 * shapes[4][0], args.dim)]  # fused groups
    if spec.embeddings:
        matrices.append((args.vocab_size // mp, args.dim))
    return WeightBytes(block, embedding, head, scratch_bytes(matrices, dtype), spec.name)


def activation_bytes(args: ModelArgs, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
                     model_parallel_size: int = 1, prefill_chunk: Optional[int] = None) -> int:
    """An upper estimate of the working memory of the largest step, on one rank: a prefill pass of
    ``prefill_chunk`` positions for every sequence, attending the whole cache. Attention is fused (no score
    matrix), and the head computes logits for one position per sequence."""
    p, b, n = args, dtype.itemsize, model_parallel_size
    chunk = min(max_seq_len, prefill_chunk or DEFAULT_PREFILL_CHUNK)
    tokens, kv = max_batch_size * chunk, cache_len(max_seq_len)
    n_rep = p.n_heads // p.kv_heads
    mask = tokens * kv * b * (1 + (n_rep if n_rep > 1 else 0))  # the packet's additive mask, its grouped-query copy
    attention = tokens * p.n_heads // n * p.head_dim * (3 * b + 8) + mask  # q, k, v, rotary fp32 copies, output
    feed_forward = 3 * tokens * p.ffn_hidden_dim // n * b
    logits = max_batch_size * p.vocab_size * (b + 4)  # the head's output (gathered whole on every rank) and its fp32 copy
    logits += 0 if n == 1 else 2 * max_batch_size * p.vocab_size * b  # this rank's part and the gathered parts
    hidden = 8 * tokens * p.dim * b  # residual stream, norms, the packet
    return max(attention, feed_forward, logits) + hidden + mask


@dataclass(frozen=True)
class OffloadPlan:
    n_layers: int
    resident_layers: int  # blocks 0 .. resident_layers - 1 live on the GPU
    num_slices: int  # the paged blocks are streamed in this many slices (0: nothing paged)
    block_bytes: int
    fixed_bytes: dict[str, int]  # what is resident whatever the budget
    model_parallel_size: int = 1  # N > 1: every figure is one rank's, on its own GPU
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt positions per prefill pass the activations are sized for
    quantization: Optional[str] = None  # the blocks' format when quantized, e.g. "int4 g64"

    @property
    def paged_layers(self) -> int:
        return self.n_layers - self.resident_layers

    @property
    def slot_bytes(self) -> int:
        """GPU buffers that paged slices stream through: two, so one fills while the other computes."""
        if self.num_slices == 0:
            return 0
        per_slice = -(-self.paged_layers // self.num_slices) * self.block_bytes
        return min(2, self.num_slices) * per_slice

    @property
    def gpu_bytes(self) -> int:
        return sum(self.fixed_bytes.values()) + self.resident_layers * self.block_bytes + self.slot_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host-to-device per forward step."""
        return self.paged_layers * self.block_bytes

    def describe(self) -> str:
        lines = [f"  {name:<22} {n / GiB:8.3f} GiB" for name, n in self.fixed_bytes.items()]
        if self.quantization:
            lines.append(f"  {'block weights':<22} {self.block_bytes / 2**20:8.1f} MiB  per block ({self.quantization},"
                         " codes and scales: what is paged)")
        lines.append(f"  {'resident blocks':<22} {self.resident_layers * self.block_bytes / GiB:8.3f} GiB"
                     f"  ({self.resident_layers} of {self.n_layers} blocks)")
        lines.append(f"  {'slot buffers':<22} {self.slot_bytes / GiB:8.3f} GiB"
                     f"  ({self.paged_layers} blocks paged in {self.num_slices} slices)")
        lines.append(f"  {'expected GPU memory':<22} {self.gpu_bytes / GiB:8.3f} GiB")
        lines.append(f"  {'streamed per step':<22} {self.streamed_bytes / GiB:8.3f} GiB")
        lines.append(f"  {'prefill chunk':<22} {self.prefill_chunk:8d} positions per pass (longer prompts take several)")
        if self.model_parallel_size > 1:
            lines.append(f"  (per rank: each of {self.model_parallel_size} ranks holds 1/{self.model_parallel_size} "
                         "of every block on its own GPU)")
        return "\n".join(lines)


def plan_offload(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    max_seq_len: int,
    gpu_memory_gb: Optional[float] = None,
    num_slices: Optional[int] = None,
    model_parallel_size: int = 1,
    prefill_chunk: Optional[int] = None,
    all_resident: bool = False,
    sizes: Optional[WeightBytes] = None,
) -> OffloadPlan:
    """With a budget: as many resident blocks as fit, the rest paged one block per slice.
    Without one: every block paged, in ``num_slices`` slices (default: one block per slice); with
    ``all_resident``, every block on the GPU. ``prefill_chunk`` sizes the activation estimate. ``sizes``: the
    weights' bytes (default: ``dtype`` for every weight; quantized models pass their own, see weight_bytes).
    With ``model_parallel_size`` N > 1: one rank's plan, for its 1/N of the model and its own GPU."""
    if args.vocab_size <= 0:
        raise ValueError("vocab_size is -1: set it from the tokenizer before planning.")
    b, mp = dtype.itemsize, model_parallel_size
    sizes = sizes or weight_bytes(args, dtype, mp)
    fixed = {
        "embedding": sizes.embedding,
        "output head + norm": sizes.head,
        "KV cache": 2 * args.n_layers * max_batch_size * cache_len(max_seq_len) * args.kv_heads // mp * args.head_dim * b,
        "RoPE table": cache_len(max_seq_len) * args.head_dim // 2 * 8,
        "activations (est.)": activation_bytes(args, dtype, max_batch_size, max_seq_len, mp, prefill_chunk),
    }
    if sizes.scratch:
        fixed["dequant scratch"] = sizes.scratch
    per_block = sizes.block
    n = args.n_layers
    chunk = min(max_seq_len, prefill_chunk or DEFAULT_PREFILL_CHUNK)
    q = sizes.quantization
    if all_resident:
        return OffloadPlan(n, n, 0, per_block, fixed, mp, chunk, q)
    if gpu_memory_gb is None:
        slices = n if num_slices is None else num_slices
        if not 1 <= slices <= n:
            raise ValueError(f"num_slices must be between 1 and the number of blocks ({n}), found {slices}.")
        return OffloadPlan(n, 0, slices, per_block, fixed, mp, chunk, q)
    if num_slices is not None:
        raise ValueError("Give either gpu_memory_gb or num_slices, not both: the budget decides the slices.")

    budget = int(gpu_memory_gb * GiB)
    base = sum(fixed.values())
    if base + n * per_block <= budget:
        return OffloadPlan(n, n, 0, per_block, fixed, mp, chunk, q)  # everything fits: nothing to page
    minimum = OffloadPlan(n, 0, n, per_block, fixed, mp, chunk, q).gpu_bytes  # nothing resident, two one-block slots
    if budget < minimum:
        per_rank = "" if mp == 1 else f" (per rank: each of {mp} processes holds 1/{mp} of the model on its own GPU)"
        raise ValueError(
            f"A GPU memory budget of {gpu_memory_gb:g} GiB{per_rank} is too small: this model needs at least "
            f"{minimum / GiB:.2f} GiB (resident part {base / GiB:.2f} GiB + two paged blocks of "
            f"{per_block / GiB:.2f} GiB) at max_batch_size={max_batch_size}, max_seq_len={max_seq_len}. "
            "Raise --gpu_memory_gb, or lower max_seq_len / max_batch_size to shrink the KV cache and activations."
        )
    # Two slots of one block stay reserved for the paged part, so the resident blocks get the rest.
    resident = min(n - 1, (budget - base - 2 * per_block) // per_block)
    paged = n - resident
    return OffloadPlan(n, resident, paged, per_block, fixed, mp, chunk, q)


# --- host memory ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostPlan:
    """What a run holds in host RAM, planned like the GPU's: on a GPU the pinned pages of the paged blocks
    (plus a converted copy of the weights while loading, when the checkpoint's dtype or sharding needs one);
    on the CPU the whole model, its KV cache, RoPE table and activations."""

    parts: dict[str, int]
    on_cpu: bool
    processes: int = 1  # model-parallel ranks on this host: each holds its own parts

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values()) * self.processes

    def describe(self) -> str:
        lines = [f"  {name:<22} {n / GiB:8.3f} GiB" for name, n in self.parts.items()]
        who = "" if self.processes == 1 else f" ({self.processes} processes, each the above)"
        lines.append(f"  {'expected host memory':<22} {self.total_bytes / GiB:8.3f} GiB{who}")
        return "\n".join(lines)

    def advice(self) -> str:
        if self.on_cpu:
            return ("Lower --max_seq_len or --max_batch_size (they size the KV cache), lower --prefill_chunk (the "
                    "activations), run in --dtype bfloat16 (half the float32 weights), or free host memory.")
        return ("Give a larger --gpu_memory_gb so that more blocks stay resident on the GPU and fewer are pinned "
                "in host memory, or free host memory.")


def plan_host(plan: OffloadPlan, *, on_cpu: bool, load_copy: bool = False, processes: int = 1) -> HostPlan:
    """The host memory of a run that follows ``plan`` (the GPU plan for the same flags; on the CPU its
    fixed parts are what the CPU holds beside the weights). ``load_copy``: the weights are converted (dtype)
    or merged (shards) into anonymous memory while loading, instead of staying file-backed."""
    weights = plan.n_layers * plan.block_bytes + plan.fixed_bytes["embedding"] + plan.fixed_bytes["output head + norm"]
    if on_cpu:
        parts = {"weights": weights, **{k: v for k, v in plan.fixed_bytes.items()
                                        if k not in ("embedding", "output head + norm")}}
        return HostPlan(parts, True, processes)
    parts = {"pinned pages": plan.paged_layers * plan.block_bytes}
    if load_copy:
        parts["weights while loading"] = weights
    return HostPlan(parts, False, processes)


def available_host_bytes(meminfo: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read (not Linux)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, *unit = line.split()[1:]
                    return int(value) * (1024 if unit and unit[0].lower() == "kb" else 1)
    except (OSError, ValueError):
        return None
    return None


def check_host_memory(host: HostPlan, available: Optional[int] = None) -> None:
    """Refuse a run whose host memory plan exceeds what is available, saying how much and what to change."""
    available = available_host_bytes() if available is None else available
    if available is None or host.total_bytes <= available:
        return
    parts = ", ".join(f"{name} {n / GiB:.2f} GiB" for name, n in host.parts.items() if n)
    per = "" if host.processes == 1 else f", for each of {host.processes} processes"
    where = "on the CPU" if host.on_cpu else "with blocks paged from pinned host memory"
    raise ValueError(
        f"This run {where} needs about {host.total_bytes / GiB:.2f} GiB of host memory ({parts}{per}), but only "
        f"{available / GiB:.2f} GiB is available (MemAvailable in /proc/meminfo). {host.advice()}"
    )
