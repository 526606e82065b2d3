"""A CPU lane block's KV cache, kept on both sides: in host memory for the steps the host's cores compute
(decode at batch 1), on the GPU for the steps that stream the block there (prefill, large batches, the
verification of many drafts).

Each side is written only by the steps that run there. Positions written on one side are copied to the other
only when a step there next touches their row, so a run of large steps (batch 8 decode) copies nothing and
replays its graphs as the paged blocks do, and a prefill's keys and values reach the host once, before the
first CPU step. The GPU copy is the KV cache the plan counts for every block; the host copy is the host plan's
"CPU-lane KV cache".

A block's forward on the GPU may be a CUDA graph replay, which runs its kernels and none of its Python: so the
copies and the bookkeeping happen in ``enter``, which the schedule (hybrid.py) calls before each step of the
block, never inside ``update``.
"""

from __future__ import annotations

from typing import Optional

import torch

from llama_offload.model.transformer import KVCache
from llama_offload.model.step import StepShape

HOST, GPU = "host", "gpu"


def _host_copy(cache: KVCache, pin: bool) -> KVCache:
    """``cache`` copied to host memory: pinned on a GPU machine, so copies either way run without a bounce."""
    moved = KVCache.__new__(KVCache)
    moved.k, moved.v = (t.to("cpu", copy=True) for t in (cache.k, cache.v))
    if pin:
        moved.k, moved.v = moved.k.pin_memory(), moved.v.pin_memory()
    moved.row_start = cache.row_start.to("cpu")
    return moved


class MirroredKVCache(KVCache):
    """``update`` writes the side the block runs on now (``side``); ``k``, ``v`` and ``row_start`` are that side's.

    ``dirty[row]`` = (side, lo, hi): positions lo..hi-1 of the row were written on that side since the other
    side last saw them. At most one side is ever dirty for a row: a step on the other side copies them first."""

    def __init__(self, gpu: KVCache, pin: bool):
        self.sides = {GPU: gpu, HOST: _host_copy(gpu, pin)}
        self.side = HOST
        self.dirty: list[Optional[tuple[str, int, int]]] = [None] * gpu.k.shape[0]
        # The last host-to-GPU copies: they read host rows, which the host may not write before they are done.
        self._copied: Optional[torch.cuda.Event] = None

    @property
    def k(self) -> torch.Tensor:  # type: ignore[override]
        return self.sides[self.side].k

    @property
    def v(self) -> torch.Tensor:  # type: ignore[override]
        return self.sides[self.side].v

    @property
    def row_start(self) -> torch.Tensor:  # type: ignore[override]
        return self.sides[self.side].row_start

    def update(self, shape: StepShape, input_pos: torch.Tensor, xk: torch.Tensor,
               xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sides[self.side].update(shape, input_pos, xk, xv)

    def parts(self) -> list[KVCache]:
        """Both sides, for a rollback that zeroes positions (speculative.zero_positions): it writes host rows."""
        self._wait_for_copies()
        return [self.sides[HOST], self.sides[GPU]]

    def enter(self, side: str, shape: StepShape) -> None:
        """Before a step of ``shape`` computes the block on ``side``: its rows' positions written on the other side
        are copied here, and what the step will write is marked."""
        if side == HOST:
            self._wait_for_copies()
        src, dst = self.sides[GPU if side == HOST else HOST], self.sides[side]
        rows = range(shape.row0, shape.row0 + shape.bsz)
        copied = False
        for r in rows:
            mark = self.dirty[r]
            if mark is not None and mark[0] != side:
                _, lo, hi = mark
                # One row's positions are contiguous on both sides: one asynchronous copy each, from or into pinned memory.
                dst.k[r, lo:hi].copy_(src.k[r, lo:hi], non_blocking=True)
                dst.v[r, lo:hi].copy_(src.v[r, lo:hi], non_blocking=True)
                self.dirty[r] = None
                copied = True
        gpu = self.sides[GPU].k
        if copied and gpu.is_cuda:
            if side == HOST:  # the cores read these rows next
                torch.cuda.current_stream(gpu.device).synchronize()
            else:
                self._copied = torch.cuda.Event()
                self._copied.record(torch.cuda.current_stream(gpu.device))
        lo, hi = shape.written if shape.written is not None else (0, shape.kv_len)
        for r in rows:
            mark = self.dirty[r]
            self.dirty[r] = (side, lo, hi) if mark is None else (side, min(mark[1], lo), max(mark[2], hi))
        self.side = side

    def _wait_for_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
