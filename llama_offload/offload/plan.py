"""How much of the model stays on the GPU: the offload plan for a GPU memory budget.

Everything is counted in bytes that PyTorch allocates; the CUDA context (a few hundred MB) comes on top.
The resident part is set aside first (embedding, final norm, output head, KV cache, RoPE table,
activations of the largest step, and the two slot buffers that paged blocks stream through); whatever
the budget leaves is filled with resident blocks, and the rest of the blocks are paged.

Under model parallelism over N ranks the plan is one rank's: its 1/N of every block, of the embedding,
the output head and the KV cache, against its own GPU's budget (``gpu_memory_gb`` is per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.quant import QuantSpec, scratch_bytes
from llama_offload.model.step import cache_len

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


def spread(n: int, k: int) -> list[bool]:
    """``k`` of ``n`` positions marked, as evenly as possible, the last one marked first: CPU blocks between
    paged ones keep both lanes busy (the copy engine streams the next paged block while the cores compute), and
    a CPU block last lets the copy engine fetch the next step's first blocks behind it and the head."""
    return [(j + 1) * k // n > j * k // n for j in range(n)] if n else []


# Steps above one token take the CPU lane only where the model expects them at least 10% faster than
# streaming every block: on the H100 host the model's fp16 steps came out 9-13% faster than the runs
# (BENCHMARKS.md, the CPU lane's third run).
SPLIT_MARGIN = 0.9


@dataclass(frozen=True)
class LaneTimes:
    """What calibration measured on this machine (lanes.py): the pinned host-to-device bandwidth, the time the
    host's cores take for one block at a few step sizes (tokens = batch x positions) while the copy engine
    streams, and the host time one paged block costs on the GPU.

    One host thread drives both lanes: it computes the CPU blocks and, between them, launches the paged ones
    (their copies run on their own, queued ahead). So a step takes the longer of the copy lane (the paged
    blocks' bytes over PCIe) and the host lane (the resident blocks, which the first crossing waits for, CPU
    blocks, paged blocks' launches and crossings)."""

    pcie_gbps: float
    cpu_ms: tuple[tuple[int, float], ...]  # (tokens, ms for one block on the CPU), tokens ascending
    threads: int
    crossing_ms: float = 0.05  # the hidden state to the host and back, once per run of CPU blocks
    cpu_kernel: str = "torch"  # how the CPU blocks multiply: "torch", "dequantize" or "gemv" (kernels/cpu.py)
    kernel_ms: tuple[tuple[str, float], ...] = ()  # a block at 1 token with each kernel calibration timed
    gpu_block_ms: float = 0.0  # host time to launch and finish one paged block's compute (a graph replay, batch 1)
    # Pinned host-to-device bandwidth while the cores compute CPU blocks (both read host memory): the copy lane's
    # pace whenever a CPU lane runs beside it. None: not measured (the copies are taken at ``pcie_gbps``).
    pcie_loaded_gbps: Optional[float] = None

    def cpu_block_ms(self, tokens: int) -> float:
        """Measured at the nearest step size at or above ``tokens``; linear beyond the largest."""
        for t, ms in self.cpu_ms:
            if tokens <= t:
                return ms
        t, ms = self.cpu_ms[-1]
        return ms * tokens / t

    def page_ms(self, block_bytes: int, beside_cpu: bool = False) -> float:
        """One block's copy; ``beside_cpu``: while the CPU lane computes."""
        gbps = self.pcie_loaded_gbps if beside_cpu and self.pcie_loaded_gbps else self.pcie_gbps
        return block_bytes / (gbps * 1e9) * 1e3

    def step_ms(self, paged: int, cpu: int, block_bytes: int, tokens: int = 1, resident: int = 0) -> float:
        """The blocks of one step: the copy lane against the host lane, which overlap. The resident blocks run
        on the GPU before the first crossing (a graph replay each), while the step's first copies already run:
        they count on the host lane only."""
        runs = sum(1 for a, b in zip([False] + spread(paged + cpu, cpu), spread(paged + cpu, cpu)) if b and not a)
        host = (cpu * self.cpu_block_ms(tokens) + (paged + resident) * self.gpu_block_ms
                + runs * self.crossing_ms)
        return max(paged * self.page_ms(block_bytes, beside_cpu=cpu > 0), host)

    def best_split(self, host_layers: int, block_bytes: int, resident: int = 0) -> int:
        """The number of CPU blocks that makes a decode step at batch 1 fastest."""
        return min(range(host_layers + 1),
                   key=lambda c: (self.step_ms(host_layers - c, c, block_bytes, resident=resident), c))

    def max_cpu_tokens(self, paged: int, cpu: int, block_bytes: int, resident: int = 0) -> int:
        """The largest measured step size at which the split beats streaming every block by SPLIT_MARGIN (at
        least 1): a larger step streams the CPU blocks, so it is never slower than paging (batch 8 on the H100
        host: the model said 6% faster, the run was 4% slower)."""
        all_gpu = self.step_ms(paged + cpu, 0, block_bytes, resident=resident)
        fits = [t for t, _ in self.cpu_ms
                if self.step_ms(paged, cpu, block_bytes, t, resident) < SPLIT_MARGIN * all_gpu]
        return max(fits, default=1)

    def describe(self, block_bytes: int) -> str:
        kernels = "" if not self.kernel_ms else " (" + ", ".join(f"{k} {ms:.1f} ms" for k, ms in self.kernel_ms) + ")"
        loaded = "" if not self.pcie_loaded_gbps else f" ({self.pcie_loaded_gbps:.1f} beside the CPU lane)"
        return (f"PCIe {self.pcie_gbps:.1f} GB/s{loaded}: {self.page_ms(block_bytes):.2f} ms a block; CPU "
                f"{self.cpu_block_ms(1):.2f} ms a block on {self.threads} threads{kernels}; "
                f"{self.gpu_block_ms:.2f} ms of host time a paged block")


@dataclass(frozen=True)
class HostKernel:
    """How a run without a GPU multiplies its matrices: the kernel (kernels/cpu.py) that computed one block of the
    model's shape and format fastest at one token on this machine (lanes.choose_host_kernel), beside what the
    others took. A quantized block read through its codes ("gemv") moves 4-8 times fewer bytes than one
    dequantized every step, and a decode step on the CPU is bound by those bytes."""

    kernel: str
    block_ms: tuple[tuple[str, float], ...]  # (kernel, ms for one block at 1 token), every candidate timed
    threads: int

    def describe(self) -> str:
        ms = dict(self.block_ms)
        others = ", ".join(f"{k} {v:.2f} ms" for k, v in self.block_ms if k != self.kernel)
        return (f"{self.kernel}: {ms[self.kernel]:.2f} ms a block at 1 token on {self.threads} threads "
                f"({others}; measured on this machine)")


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
    cpu_blocks: int = 0  # of the non-resident blocks, this many are computed by the host's cores (hybrid.py)
    lanes: Optional[LaneTimes] = None  # what calibration measured: sizes the split and the expected step time
    host_kernel: Optional[HostKernel] = None  # a run without a GPU: how its matrices multiply (None: torch's)

    @property
    def paged_layers(self) -> int:
        """Blocks streamed to the GPU in a decode step (the CPU blocks stay on the host then)."""
        return self.n_layers - self.resident_layers - self.cpu_blocks

    @property
    def host_layers(self) -> int:
        """Blocks whose only copy is in pinned host memory: the paged ones and the CPU ones."""
        return self.n_layers - self.resident_layers

    def placement(self) -> list[str]:
        """Where each block runs: "resident", "paged" or "cpu" (see ``spread``)."""
        rest = ["cpu" if c else "paged" for c in spread(self.host_layers, self.cpu_blocks)]
        return ["resident"] * self.resident_layers + rest

    @property
    def max_cpu_tokens(self) -> int:
        """Steps of more tokens than this (prefill, large batches) run every block on the GPU: the CPU blocks
        are streamed too, since a block's CPU time grows with the tokens and its copy time does not."""
        if self.cpu_blocks == 0:
            return 0
        if self.lanes is None:
            return 1
        return self.lanes.max_cpu_tokens(self.paged_layers, self.cpu_blocks, self.block_bytes, self.resident_layers)

    def expected_decode_ms(self) -> Optional[float]:
        """A decode step at batch 1 as the lanes would run it (None without calibration): the streamed blocks'
        copies and the CPU blocks' compute overlap, the slower lane sets the pace. None with every block
        resident: the lanes carry nothing, and the resident blocks' GPU time is not modelled."""
        if self.lanes is None or not (self.paged_layers or self.cpu_blocks):
            return None
        return self.lanes.step_ms(self.paged_layers, self.cpu_blocks, self.block_bytes, tokens=1,
                                  resident=self.resident_layers)

    @property
    def slot_bytes(self) -> int:
        """GPU buffers that paged slices stream through: two, so one fills while the other computes."""
        if self.num_slices == 0:
            return 0
        per_slice = -(-self.host_layers // self.num_slices) * self.block_bytes
        return min(2, self.num_slices) * per_slice

    @property
    def gpu_bytes(self) -> int:
        return sum(self.fixed_bytes.values()) + self.resident_layers * self.block_bytes + self.slot_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied host-to-device per decode step."""
        return self.paged_layers * self.block_bytes

    @property
    def cpu_cache_bytes(self) -> int:
        """The CPU blocks' KV caches in host memory (the GPU's KV cache is planned for every block: a CPU block
        keeps its GPU copy for the large steps that run it there, kv_mirror.py)."""
        return self.fixed_bytes["KV cache"] * self.cpu_blocks // self.n_layers

    def describe(self) -> str:
        lines = [f"  {name:<22} {n / GiB:8.3f} GiB" for name, n in self.fixed_bytes.items()]
        if self.quantization:
            lines.append(f"  {'block weights':<22} {self.block_bytes / 2**20:8.1f} MiB  per block ({self.quantization},"
                         " codes and scales: what is paged)")
        lines.append(f"  {'resident blocks':<22} {self.resident_layers * self.block_bytes / GiB:8.3f} GiB"
                     f"  ({self.resident_layers} of {self.n_layers} blocks)")
        what = (f"{self.paged_layers} blocks paged in {self.num_slices} slices" if not self.cpu_blocks else
                f"{self.paged_layers} paged and {self.cpu_blocks} CPU blocks, a slice each")
        lines.append(f"  {'slot buffers':<22} {self.slot_bytes / GiB:8.3f} GiB  ({what})")
        if self.cpu_blocks:
            tokens = self.max_cpu_tokens
            lines.append(f"  {'CPU lane':<22} {self.cpu_blocks:8d} blocks computed on the CPU in steps of up to {tokens} "
                         f"token{'s' if tokens > 1 else ''} (larger steps stream them to the GPU too)")
        lines.append(f"  {'expected GPU memory':<22} {self.gpu_bytes / GiB:8.3f} GiB")
        lines.append(f"  {'streamed per step':<22} {self.streamed_bytes / GiB:8.3f} GiB")
        expected = self.expected_decode_ms()
        if self.lanes is not None and expected is not None:
            lines.append(f"  {'expected decode':<22} {expected:8.1f} ms per token at batch 1 "
                         f"({self.lanes.describe(self.block_bytes)})")
        if self.host_kernel is not None:
            lines.append(f"  {'CPU kernel':<22} {self.host_kernel.describe()}")
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
    cpu_blocks: Optional[int] = 0,
    lanes: Optional[LaneTimes] = None,
) -> OffloadPlan:
    """With a budget: as many resident blocks as fit, the rest paged one block per slice.
    Without one: every block paged, in ``num_slices`` slices (default: one block per slice); with
    ``all_resident``, every block on the GPU. ``prefill_chunk`` sizes the activation estimate. ``sizes``: the
    weights' bytes (default: ``dtype`` for every weight; quantized models pass their own, see weight_bytes).
    With ``model_parallel_size`` N > 1: one rank's plan, for its 1/N of the model and its own GPU.
    ``cpu_blocks``: how many of the blocks left off the GPU the host's cores compute in decode steps (hybrid.py);
    None lets ``lanes`` (calibration) pick the fastest split, 0 if there are no lanes."""
    plan = _gpu_plan(args, dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len, gpu_memory_gb=gpu_memory_gb,
                     num_slices=num_slices, model_parallel_size=model_parallel_size, prefill_chunk=prefill_chunk,
                     all_resident=all_resident, sizes=sizes)
    return with_cpu_lane(plan, cpu_blocks, lanes, explicit_slices=num_slices is not None)


def with_cpu_lane(plan: OffloadPlan, cpu_blocks: Optional[int], lanes: Optional[LaneTimes], *,
                  explicit_slices: bool = False) -> OffloadPlan:
    """``plan`` with ``cpu_blocks`` of its non-resident blocks on the CPU lane (None: the fastest split by
    ``lanes``), every non-resident block then paged in a slice of its own."""
    host = plan.host_layers
    if cpu_blocks is None:
        if lanes is None or explicit_slices or plan.model_parallel_size > 1 or host == 0:
            return replace(plan, lanes=lanes)
        cpu_blocks = lanes.best_split(host, plan.block_bytes, plan.resident_layers)
    if cpu_blocks == 0:
        return replace(plan, lanes=lanes)
    if plan.model_parallel_size > 1:
        raise ValueError(
            f"--cpu_blocks {cpu_blocks} with {plan.model_parallel_size} processes: the CPU lane runs in one process "
            "(each rank's blocks would all-reduce from the CPU, and the ranks would share the host's cores). Give "
            "--cpu_blocks 0, or run in one process.")
    if not 0 < cpu_blocks <= host:
        where = f"all {plan.n_layers} stay resident" if host == 0 else f"{plan.resident_layers} resident, {host} paged"
        raise ValueError(
            f"--cpu_blocks {cpu_blocks} asks for more blocks on the CPU than are left off the GPU: at this budget "
            f"{where}. " + (f"Give --cpu_blocks between 0 and {host}, or a smaller --gpu_memory_gb." if host else
                            "Leave --cpu_blocks unset (or 0), or give a smaller --gpu_memory_gb."))
    if explicit_slices and plan.num_slices != host:
        raise ValueError(
            f"--num_slices {plan.num_slices} with --cpu_blocks {cpu_blocks}: with a CPU lane every paged block is a "
            "slice of its own (CPU blocks sit between them). Drop --num_slices.")
    return replace(plan, num_slices=host, cpu_blocks=cpu_blocks, lanes=lanes)


def _gpu_plan(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    max_batch_size: int,
    max_seq_len: int,
    gpu_memory_gb: Optional[float],
    num_slices: Optional[int],
    model_parallel_size: int,
    prefill_chunk: Optional[int],
    all_resident: bool,
    sizes: Optional[WeightBytes],
) -> OffloadPlan:
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
    parts = {"pinned pages": plan.host_layers * plan.block_bytes}
    if plan.cpu_blocks:
        parts["CPU-lane KV cache"] = plan.cpu_cache_bytes
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
