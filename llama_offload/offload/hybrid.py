"""A CPU lane beside the PCIe lane: the host's cores compute some of the blocks that are not resident, from
the same pinned pages the copy engine streams, while the copy engine streams the others to the GPU.

At batch 1 a block's weights are read once per token wherever it runs, and the host reads its RAM faster
than PCIe carries it (README.md: about 98 against 53 GB/s, with no contention between the two), so the two
lanes add up. ``plan.spread`` puts the CPU blocks between the paged ones, the last block on the CPU:

    paged block   wait for its copy, compute on the GPU (a decode step: one CUDA graph replay, block_graphs.py,
                  so its launch takes little of the host thread the CPU lane needs), free its slot, queue the
                  copy of the page len(slots) further down the stream (the copies never wait for the host)
    CPU run       the hidden state comes to the host (the whole packet the first time in a step: a few KB
                  at decode), the cores run the blocks with their KV caches in host memory, and the hidden
                  state goes back into the GPU packet, in place; the copies queued before the run go on
                  meanwhile, so both lanes work at once (that small copy waits behind a page copy the engine
                  has begun, pieces or not: scripts/probe_copy_queue.py)
    large step    more tokens than ``max_cpu_tokens`` (a prefill, a large batch, the verification of many
                  drafts) are compute-bound: every block goes to the GPU, the CPU ones streamed like paged
                  ones over the GPU copy of their KV caches (kv_mirror.py: what one side wrote reaches the
                  other before a step there reads it), so a run of large steps is all paged, graphs included

Without CUDA the same schedule runs with the CPU as the "GPU" (no pages, no streams): the tests check the
crossings and the cache hand-over that way.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn

from llama_offload.offload.block_graphs import BlockGraphs
from llama_offload.model.cpu_linear import set_cpu_kernel
from llama_offload.offload.kv_mirror import GPU, HOST, MirroredKVCache
from llama_offload.offload.pager import InferenceOffloadModel
from llama_offload.offload.packing import PackedBlock, StepContext
from llama_offload.model.step import StepShape


class HybridOffloadModel(nn.Module):
    """The non-resident blocks in model order, one page each; ``on_cpu[i]``: block i is computed by the host's
    cores in steps of at most ``max_cpu_tokens`` tokens. One packet in, the same packet out."""

    def __init__(self, blocks: Sequence[PackedBlock], on_cpu: Sequence[bool], device: torch.device,
                 context: StepContext, max_cpu_tokens: int, cpu_kernel: str = "torch", cuda_graphs: bool = True):
        super().__init__()
        if len(blocks) != len(on_cpu):
            raise ValueError(f"internal: {len(blocks)} blocks but {len(on_cpu)} placements")
        self.device = device
        self.context = context
        self.on_cpu = list(on_cpu)
        self.max_cpu_tokens = max_cpu_tokens
        self.blocks = list(blocks)  # the PackedBlocks, for their caches (the pager owns the modules)
        cuda = device.type == "cuda"
        # A CPU block's cache lives on both sides (kv_mirror.py): the host's for the CPU lane, the GPU's for steps
        # that stream the block there.
        self.caches: list[Optional[MirroredKVCache]] = [None] * len(blocks)
        for i, (block, cpu) in enumerate(zip(blocks, on_cpu)):
            if cpu:
                attention = block.block.attention
                attention.cache = self.caches[i] = MirroredKVCache(attention.cache, pin=cuda)
                set_cpu_kernel(block, cpu_kernel)  # the kernel calibration found fastest (offload/lanes.py)
        # On a GPU the pager holds every page; its parameters point at the host pages unless a copy is queued.
        self.pager = InferenceOffloadModel(nn.Sequential(*blocks), device, len(blocks)) if cuda else None
        self.units = nn.ModuleList(list(self.pager.model_slices) if cuda else blocks)
        # The paged blocks' decode launches as CUDA graphs: the host thread they share with the CPU lane is freed.
        self.graphs = BlockGraphs(device) if cuda and cuda_graphs else None
        self._ahead: list[int] = []  # pages whose copies the last step queued for this one, in stream order
        self._base = 0  # the copy ring's position (_Ring) at the start of the next step
        self.clock: Optional[LaneClock] = None  # benchmarks: where the host thread's time goes (LaneClock)

    def _stream_order(self, cpu_lane: bool) -> list[int]:
        return [i for i, cpu in enumerate(self.on_cpu) if not (cpu and cpu_lane)]

    def forward(self, packet: torch.Tensor) -> torch.Tensor:
        layout = self.context.current()
        cpu_lane = layout.shape.bsz * layout.shape.seqlen <= self.max_cpu_tokens
        # Only a replayed step's packet keeps its address from step to step: other steps launch eagerly.
        graphs = self.graphs if self.context.static_packet else None
        ring = _Ring(self.pager, self._stream_order(cpu_lane), self._ahead, self._base, graphs, layout.shape)
        self._ahead = []
        try:
            packet = self._run(packet, ring, cpu_lane)
        except BaseException:
            ring.abandon()
            raise
        self._ahead, self._base = ring.finish()
        return packet

    def _run(self, packet: torch.Tensor, ring: "_Ring", cpu_lane: bool) -> torch.Tensor:
        layout = self.context.current()
        h_bytes = layout.offsets[1]  # the hidden state is the packet's first field
        host: Optional[torch.Tensor] = None
        i, n = 0, len(self.units)
        while i < n:
            if cpu_lane and self.on_cpu[i]:
                end = i
                while end < n and self.on_cpu[end]:
                    end += 1
                with self._timed("wait"):
                    if host is None:  # the first crossing of the step brings the whole packet: freqs, positions, mask
                        host = _to_host(packet, None)
                    else:
                        _to_host(packet[:h_bytes], host[:h_bytes])
                with self._timed("cpu"):
                    for j in range(i, end):
                        self._cache(j).enter(HOST, layout.shape)
                        self.units[j](host)
                    packet[:h_bytes].copy_(host[:h_bytes], non_blocking=True)  # pinned: the next D2H orders after it
                i = end
                continue
            with self._timed("gpu"):
                if self.on_cpu[i]:  # a large step: this CPU block is streamed and runs on the GPU, over its GPU cache
                    self._cache(i).enter(GPU, layout.shape)
                packet = ring.compute(i, self.units[i], packet)
            i += 1
        return packet

    def _timed(self, what: str) -> ContextManager[None]:
        return self.clock.span(what) if self.clock is not None else contextlib.nullcontext()

    def _cache(self, i: int) -> MirroredKVCache:
        cache = self.caches[i]
        assert cache is not None, f"internal: block {i} is not on the CPU lane"
        return cache


class LaneClock:
    """Where a hybrid model's host thread spends its time, for benchmarks (``scripts/bench_hybrid.py --profile``):
    ``wait`` in the blocking crossings to the host (the GPU work and the copies it waits for), ``cpu`` computing
    CPU blocks, ``gpu`` launching streamed blocks; and the copy lane's busy time from each copy's CUDA events.
    ``attach`` before the timed steps, ``report`` after them."""

    def __init__(self) -> None:
        self.host = {"wait": 0.0, "cpu": 0.0, "gpu": 0.0}
        self.model: Optional["HybridOffloadModel"] = None

    def attach(self, model: "HybridOffloadModel") -> None:
        self.model, model.clock = model, self
        if model.pager is not None:
            model.pager.copy_times = []

    @contextlib.contextmanager
    def span(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.host[what] += time.perf_counter() - start

    def report(self, steps: int) -> dict[str, float]:
        """ms per step: each host category, and the copy lane's busy time and bytes' pace (synchronizes)."""
        out = {f"{k}_ms": v / steps * 1e3 for k, v in self.host.items()}
        pager = self.model.pager if self.model is not None else None
        if pager is not None and pager.copy_times:
            torch.cuda.synchronize(self.model.device)
            out["copy_busy_ms"] = sum(a.elapsed_time(b) for a, b in pager.copy_times) / steps
            out["copies_per_step"] = len(pager.copy_times) / steps
        if self.model is not None:
            self.model.clock = None
            if pager is not None:
                pager.copy_times = None
        return out


def _to_host(src: torch.Tensor, dst: Optional[torch.Tensor]) -> torch.Tensor:
    """A blocking device-to-host copy (it waits for the blocks before it), into pinned memory on a GPU."""
    if dst is None:
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
    return dst.copy_(src)


class _Ring:
    """The copy schedule: the pages streamed, step after step, go round the slots in order (the g-th page since
    the start into slot g % len(slots)), each queued as soon as its slot is free, so up to len(slots) copies run
    ahead of the GPU, through the CPU runs, and across the end of a step into the next one."""

    def __init__(self, pager: Optional[InferenceOffloadModel], order: list[int], ahead: list[int], base: int,
                 graphs: Optional[BlockGraphs] = None, shape: Optional[StepShape] = None):
        self.pager, self.order, self.base = pager, order, base
        self.graphs, self.shape = graphs, shape
        self.position = {page: k for k, page in enumerate(order)}
        self.next_ahead: list[int] = []
        if pager is None:
            return
        width = min(len(pager.slots), len(order))
        # Copies the last step queued for this one are kept if they are this step's first pages.
        kept = len(ahead) if ahead == order[: len(ahead)] else 0
        if not kept:  # queued for the other schedule (a step of another size): they are reloaded where needed
            for page in ahead:
                pager.pages[page].point_at(pager.pages[page].host)
        for k in range(kept, width):
            pager.load_page(order[k], self.slot(k))

    def slot(self, k: int) -> int:
        assert self.pager is not None
        return (self.base + k) % len(self.pager.slots)

    def compute(self, page: int, unit: nn.Module, packet: torch.Tensor) -> torch.Tensor:
        if self.pager is None:
            return unit(packet)
        k, width, n = self.position[page], len(self.pager.slots), len(self.order)
        slot = self.slot(k)
        self.pager.wait_loaded(slot)
        if self.graphs is not None and self.shape is not None:
            packet = self.graphs.compute((page, slot), unit, packet, self.shape)  # the page's weights are in slot
        else:
            packet = unit(packet)
        self.pager.drop_page(page, slot)
        ahead = k + width  # the page that goes into this slot next
        if ahead < n:
            self.pager.load_page(self.order[ahead], slot)
        elif n >= width:
            # Weights never change: the next step's first pages (in this step's order) are copied now, behind
            # this step's last blocks, the head and the sampling.
            self.pager.load_page(self.order[ahead - n], slot)
            self.next_ahead.append(self.order[ahead - n])
        return packet

    def finish(self) -> tuple[list[int], int]:
        """(the pages queued for the next step, the ring position it starts at)."""
        if self.pager is None:
            return [], 0
        return self.next_ahead, (self.base + len(self.order)) % len(self.pager.slots)

    def abandon(self) -> None:
        """After a failed step: every page points home, so no later step computes from a slot it did not load."""
        if self.pager is not None:
            for pages in self.pager.pages:
                pages.point_at(pages.host)
