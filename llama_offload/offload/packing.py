"""One flat tensor per step, so that FairScale's OffloadModel (which passes one tensor between stages) can
run Meta's blocks.

A packet is a 1-D uint8 tensor on the GPU holding, as raw bytes (no lossy casts):

    hidden state    (bs, seqlen, dim)          in the model dtype
    RoPE freqs      (bs, seqlen, head_dim/2)   complex64 as fp32 pairs, one row per token's own position
    positions       (bs, seqlen)               int64, where each token's keys/values go in the cache
    attention mask  (bs, 1, seqlen, kv_len)    additive (0 or -inf) in the model dtype, built once per step

Where each field starts is not stored in the packet: ``PacketLayout`` computes it from the step's host-side
``StepShape``, which travels beside the packet through ``StepContext``. So a block never reads the GPU back
to learn a shape, and a step can be captured as a CUDA graph. Each block writes its output hidden state into
the packet it was given and returns that same packet: nothing is allocated per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from llama_offload.model.transformer import TransformerBlock
from llama_offload.model.step import StepShape

ALIGN = 16  # every field starts 16-byte aligned, so each dtype view is aligned for the kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Unpacked(NamedTuple):
    h: torch.Tensor  # (bs, seqlen, dim)
    freqs_cis: torch.Tensor  # (bs, seqlen, head_dim/2) complex64
    input_pos: torch.Tensor  # (bs, seqlen) int64
    mask: torch.Tensor  # (bs, 1, seqlen, kv_len) additive, model dtype


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class PacketLayout:
    """Where each field of a step's packet lives, known on the host."""

    shape: StepShape
    dim: int
    half: int  # head_dim / 2
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"Hidden states must be one of {DTYPES}, found {self.dtype}.")

    @property
    def _sizes(self) -> list[int]:
        tokens = self.shape.bsz * self.shape.seqlen
        return [tokens * self.dim * self.dtype.itemsize, tokens * self.half * 8, tokens * 8,
                tokens * self.shape.kv_len * self.dtype.itemsize]

    @property
    def offsets(self) -> list[int]:
        out, at = [], 0
        for n in self._sizes:
            out.append(at)
            at += _padded(n)
        return out + [at]

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def pack(self, h: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One packet on ``h.device`` holding the step's block inputs."""
        bsz, seqlen, kv_len = self.shape.bsz, self.shape.seqlen, self.shape.kv_len
        expected = {"hidden state": (h, (bsz, seqlen, self.dim), self.dtype),
                    "RoPE frequencies": (freqs_cis, (bsz, seqlen, self.half), torch.complex64),
                    "positions": (input_pos, (bsz, seqlen), torch.int64),
                    "mask": (mask, (bsz, 1, seqlen, kv_len), self.dtype)}
        for name, (t, shape, dtype) in expected.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"The packet's {name} must be {dtype} of shape {shape}, found {t.dtype} {tuple(t.shape)}.")
        parts = [_as_bytes(h), _as_bytes(torch.view_as_real(freqs_cis)), _as_bytes(input_pos), _as_bytes(mask)]
        packet = torch.empty(self.nbytes, dtype=torch.uint8, device=h.device)
        for part, start in zip(parts, self.offsets):
            packet[start : start + part.numel()].copy_(part)
        return packet

    def unpack(self, packet: torch.Tensor) -> Unpacked:
        """Views into ``packet``: no copies, no reads."""
        if packet.dtype != torch.uint8 or packet.ndim != 1 or packet.numel() != self.nbytes:
            raise ValueError(f"Not this step's packet: expected a 1-D uint8 tensor of {self.nbytes} bytes, "
                             f"found {packet.dtype} {tuple(packet.shape)}.")
        bsz, seqlen, kv_len = self.shape.bsz, self.shape.seqlen, self.shape.kv_len
        o, n = self.offsets, self._sizes
        h = packet[o[0] : o[0] + n[0]].view(self.dtype).view(bsz, seqlen, self.dim)
        freqs = packet[o[1] : o[1] + n[1]].view(torch.float32).view(bsz, seqlen, self.half, 2)
        input_pos = packet[o[2] : o[2] + n[2]].view(torch.int64).view(bsz, seqlen)
        mask = packet[o[3] : o[3] + n[3]].view(self.dtype).view(bsz, 1, seqlen, kv_len)
        return Unpacked(h, torch.view_as_complex(freqs), input_pos, mask)


class StepContext:
    """The current step's layout, shared by every PackedBlock: the host-side half of the packet."""

    def __init__(self) -> None:
        self.layout: Optional[PacketLayout] = None
        # True while a replayed decode step (graphs.DecodeGraphs) runs the paged blocks: the packet then lies at
        # the same address every step of its shape, so those blocks may be replayed as graphs too (block_graphs.py).
        self.static_packet = False

    def current(self) -> PacketLayout:
        if self.layout is None:
            raise RuntimeError("No step is running: packed blocks are run through OffloadedTransformer.step().")
        return self.layout


class PackedBlock(nn.Module):
    """A Meta ``TransformerBlock`` that takes one packet and returns it, for ``nn.Sequential``."""

    def __init__(self, block: TransformerBlock, context: StepContext):
        super().__init__()
        self.block = block
        self.context = context

    def forward(self, packet: torch.Tensor) -> torch.Tensor:
        layout = self.context.current()
        h, freqs_cis, input_pos, mask = layout.unpack(packet)
        # The block reads h before its last add, which writes the result over h: the packet goes on in place.
        self.block(h, layout.shape, input_pos, freqs_cis, mask, out=h)  # (bs, seqlen, dim)
        return packet
