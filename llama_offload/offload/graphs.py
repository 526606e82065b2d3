"""Decode steps replayed as CUDA graphs: one launch instead of hundreds of small kernels per step.

A decode step at batch size B attending kv_len cache positions is captured once, the first time it is
needed, and replayed after that; a new batch size or a longer context captures another graph. Only the
resident work is captured: the prefix (embedding, packet, resident blocks) and the suffix (final norm and
head). The paged blocks between them run eagerly, so their copy-stream waits and events are issued exactly
as ``InferenceOffloadModel.forward`` orders them. With nothing paged, the whole step is one graph.

A capture first runs the resident parts once eagerly on a side stream (PyTorch's recipe: it settles lazy
initialisation such as cuBLAS handles); that run writes the same keys and values the replay writes, at the
same positions, so the KV caches end up as after one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from llama_offload.offload.packing import PacketLayout, StepContext
from llama_offload.model.step import Step, StepShape


class SplitStep(Protocol):
    """What a model offers to be graphed: a step cut into prefix, paged blocks and suffix (offload/offloaded.py)."""

    params: Any
    device: torch.device
    dtype: torch.dtype
    head_half: int
    context: StepContext
    paged: Optional[Callable[[torch.Tensor], torch.Tensor]]

    def prefix(self, step: Step) -> torch.Tensor: ...

    def suffix(self, packet: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor: ...


@dataclass
class _Captured:
    tokens: torch.Tensor  # (bs, 1) static input
    input_pos: torch.Tensor  # (bs, 1) static input
    prefix: torch.cuda.CUDAGraph
    suffix: Optional[torch.cuda.CUDAGraph]  # None: the prefix graph is the whole step
    packet: torch.Tensor  # the prefix's output, the paged blocks' input
    logits: torch.Tensor  # (bs, 1, vocab) static output


class DecodeGraphs:
    def __init__(self, model: SplitStep):
        self.model = model
        self.captured: dict[tuple[int, int], _Captured] = {}
        self.pool: Optional[tuple] = None  # one memory pool for every graph: they never run at the same time

    @staticmethod
    def handles(step: Step) -> bool:
        """Decode steps over the rows from 0: the steps that repeat with the same shapes."""
        return step.shape.seqlen == 1 and step.shape.row0 == 0

    def run(self, step: Step) -> torch.Tensor:
        key = (step.shape.bsz, step.shape.kv_len)
        graph = self.captured.get(key)
        if graph is None:
            graph = self.captured[key] = self._capture(step)
        else:
            graph.tokens.copy_(step.tokens)
            graph.input_pos.copy_(step.input_pos)
        graph.prefix.replay()
        if graph.suffix is not None:
            self.model.context.layout = self._layout(step.shape)
            self.model.context.static_packet = True
            try:
                packet = self.model.paged(graph.packet)
            finally:
                self.model.context.static_packet = False
            assert packet.data_ptr() == graph.packet.data_ptr()  # the blocks work in place
            graph.suffix.replay()
        logits = graph.logits.clone()  # the next replay overwrites the static output
        return logits[:, 0] if step.last is not None else logits

    def _layout(self, shape: StepShape) -> PacketLayout:
        m = self.model
        return PacketLayout(shape, m.params.dim, m.head_half, m.dtype)

    def _capture(self, step: Step) -> _Captured:
        m = self.model
        tokens, input_pos = step.tokens.clone(), step.input_pos.clone()
        static = Step(tokens, input_pos, step.shape, None)
        whole = m.paged is None

        def prefix() -> torch.Tensor:
            packet = m.prefix(static)
            return m.suffix(packet, None) if whole else packet

        side = torch.cuda.Stream(device=m.device)
        side.wait_stream(torch.cuda.current_stream(m.device))
        with torch.cuda.stream(side):
            # Warm-up (cuBLAS handles cannot be made during a capture): the resident blocks write this step's
            # keys and values, as the replay will; the head only reads.
            warm = prefix()
            if not whole:
                m.suffix(warm, None)
        torch.cuda.current_stream(m.device).wait_stream(side)

        first = torch.cuda.CUDAGraph()
        with torch.cuda.graph(first, pool=self.pool):
            out = prefix()
        self.pool = first.pool()
        if whole:
            return _Captured(tokens, input_pos, first, None, out, out)
        second = torch.cuda.CUDAGraph()
        m.context.layout = self._layout(step.shape)
        with torch.cuda.graph(second, pool=self.pool):
            logits = m.suffix(out, None)
        return _Captured(tokens, input_pos, first, second, out, logits)
