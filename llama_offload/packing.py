"""The packet: everything one transformer block needs, in one flat tensor.

FairScale's OffloadModel runs an ``nn.Sequential`` whose stages pass a single tensor, but a block
needs the hidden state, the RoPE frequencies, the mask and the position. So each step packs them
into one uint8 tensor, byte for byte, which makes the round trip exact for every dtype and position:

    [ header: 8 x int64 | hidden state bytes | pad to 16 | RoPE freqs as (seqlen, head_dim/2, 2) fp32 ]

The mask is not stored: it is rebuilt from (seqlen, start_pos), as Meta's ``Transformer.forward`` builds it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .model import TransformerBlock, causal_mask

MAGIC = 0x4C4C4F46_50415431  # identifies a packet, so a stray tensor fails loudly instead of decoding garbage
HEADER_BYTES = 8 * 8
ALIGN = 16  # keeps the fp32/complex view of the frequencies aligned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Unpacked(NamedTuple):
    h: torch.Tensor  # (bs, seqlen, dim)
    freqs_cis: torch.Tensor  # (seqlen, head_dim/2) complex64
    start_pos: int
    mask: Optional[torch.Tensor]  # (seqlen, start_pos + seqlen) or None for a single token


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(h: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Pack one step's block inputs into a 1-D uint8 tensor on ``h.device``."""
    if h.dtype not in DTYPES:
        raise TypeError(f"Hidden states must be one of {DTYPES}, found {h.dtype}.")
    if h.ndim != 3:
        raise ValueError(f"Hidden state must be (batch, seqlen, dim), found shape {tuple(h.shape)}.")
    bsz, seqlen, dim = h.shape
    if freqs_cis.dtype != torch.complex64 or freqs_cis.ndim != 2 or freqs_cis.shape[0] != seqlen:
        raise ValueError(
            f"RoPE frequencies must be complex64 of shape ({seqlen}, head_dim/2), "
            f"found {freqs_cis.dtype} {tuple(freqs_cis.shape)}."
        )
    header = torch.tensor(
        [MAGIC, DTYPES.index(h.dtype), bsz, seqlen, dim, start_pos, freqs_cis.shape[1], 0], dtype=torch.int64
    )
    hidden = _as_bytes(h)
    pad = torch.zeros(_padded(hidden.numel()) - hidden.numel(), dtype=torch.uint8, device=h.device)
    freqs = _as_bytes(torch.view_as_real(freqs_cis).to(h.device))  # (seqlen, head_dim/2, 2) fp32 as bytes
    return torch.cat([_as_bytes(header).to(h.device), hidden, pad, freqs])


def _header(packet: torch.Tensor) -> list[int]:
    if packet.dtype != torch.uint8 or packet.ndim != 1 or packet.numel() < HEADER_BYTES:
        raise ValueError(f"Not a packet: expected a 1-D uint8 tensor, found {packet.dtype} {tuple(packet.shape)}.")
    # One small device-to-host read per block: the header sizes the views below.
    header = packet[:HEADER_BYTES].view(torch.int64).tolist()
    if header[0] != MAGIC:
        raise ValueError("Not a packet: the header's magic number is wrong.")
    return header


def unpack(packet: torch.Tensor) -> Unpacked:
    """Views into ``packet`` (no copies), plus the rebuilt mask."""
    _, code, bsz, seqlen, dim, start_pos, half, _ = _header(packet)
    dtype = DTYPES[code]
    hidden_bytes = bsz * seqlen * dim * dtype.itemsize
    h = packet[HEADER_BYTES : HEADER_BYTES + hidden_bytes].view(dtype).view(bsz, seqlen, dim)
    start = HEADER_BYTES + _padded(hidden_bytes)
    freqs = packet[start : start + seqlen * half * 8].view(torch.float32).view(seqlen, half, 2)
    mask = causal_mask(seqlen, start_pos, packet.device, dtype)
    return Unpacked(h, torch.view_as_complex(freqs), start_pos, mask)


def with_hidden(packet: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A new packet equal to ``packet`` but carrying hidden state ``h`` (same shape and dtype)."""
    hidden = _as_bytes(h)
    end = HEADER_BYTES + hidden.numel()
    return torch.cat([packet[:HEADER_BYTES], hidden, packet[end:]])


class PackedBlock(nn.Module):
    """A Meta ``TransformerBlock`` that takes one packet and returns one, for ``nn.Sequential``."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.block = block

    def forward(self, packet: torch.Tensor) -> torch.Tensor:
        h, freqs_cis, start_pos, mask = unpack(packet)
        out = self.block(h, start_pos, freqs_cis, mask)
        if out.shape != h.shape or out.dtype != h.dtype:
            raise RuntimeError(f"Block {self.block.layer_id} changed the hidden state from {h.shape} {h.dtype} "
                               f"to {out.shape} {out.dtype}.")
        return with_hidden(packet, out)
