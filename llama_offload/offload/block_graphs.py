"""A paged block's decode step replayed as a CUDA graph: one launch instead of ~40 kernels and their Python.

In the CPU lane's schedule (hybrid.py) one host thread computes the CPU blocks and, between them, launches the
paged blocks on the GPU, so every microsecond of a paged block's launch is taken from the CPU lane. A decode step
repeats exactly: the same page lands in the same slot (the copy ring's order), the packet lies at the same
address (graphs.DecodeGraphs keeps it static; hybrid.py asks for graphs only then, so the graphs stay as few as
the decode shapes) and the step has the same shape until the attended span crosses into the next KV_BUCKET. So
each (page, slot, packet address, step shape) is captured once and replayed after:

    first time    eager, on the capture stream: settles cuBLAS's handle and workspace for that stream
    second time   captured on that stream, then replayed
    after that    replayed

The copy stream's waits and events stay outside the graphs (hybrid._Ring issues them around each replay), so
the pages keep the order the pager writes. A block that cannot be captured (an operation that syncs) runs eager
from then on, with a note: never an error.
"""

from __future__ import annotations

import sys
from typing import Callable, Hashable, Optional

import torch

from llama_offload.model.step import StepShape


class BlockGraphs:
    """Decode steps (one position per row) of the blocks ``compute`` is called with, as CUDA graphs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.captured: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.seen: set[Hashable] = set()
        self.pool: Optional[tuple] = None  # one memory pool for every graph: they never run at the same time
        self.enabled = True

    @staticmethod
    def handles(shape: StepShape) -> bool:
        return shape.seqlen == 1

    def compute(self, key: Hashable, block: Callable[[torch.Tensor], torch.Tensor], packet: torch.Tensor,
                shape: StepShape) -> torch.Tensor:
        """``block(packet)`` (in place), as a graph when this key was seen before. ``key`` names the block and
        where its weights are (page and slot); the packet's address and the shape complete it."""
        if not (self.enabled and self.handles(shape)):
            return block(packet)
        full = (key, packet.data_ptr(), shape)
        graph = self.captured.get(full)
        if graph is not None:
            graph.replay()
            return packet
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                if full not in self.seen:
                    self.seen.add(full)
                    out = block(packet)
                else:
                    out = self._capture(full, block, packet)
        finally:
            current.wait_stream(self.stream)
        if out.data_ptr() != packet.data_ptr():  # not in place: a graph would lose the output
            self.enabled = False
        return out

    def _capture(self, full: Hashable, block: Callable[[torch.Tensor], torch.Tensor], packet: torch.Tensor) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            graph.capture_begin(pool=self.pool)
            try:
                out = block(packet)
            finally:
                graph.capture_end()
        except RuntimeError as e:
            self.enabled = False
            print(f"llama_offload: a paged block could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                  "paged blocks launch eagerly from now on.", file=sys.stderr)
            return block(packet)
        if out.data_ptr() != packet.data_ptr():
            return block(packet)  # compute() turns graphs off; the captured work never ran: run it eagerly
        self.pool = graph.pool()
        self.captured[full] = graph
        graph.replay()  # capturing records the kernels without running them
        return packet
