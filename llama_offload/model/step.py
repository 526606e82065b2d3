"""One forward step: which tokens, at which positions, in which KV-cache rows, and which logits are wanted.

Every caller (generation, the benchmarks, the batching and speculative decoders to come) describes a step
with a ``Step`` and calls ``model.step(step)``. The host fills the shape fields from numbers it already
knows (prompt lengths, positions it handed out), so nothing in the step reads the GPU back: the tensors
are copied to the device without waiting, and the blocks size their views from ``StepShape`` alone.

Positions are per token: each row of a batch has its own length, so sequences of different lengths decode
together without padding steps, and a new sequence can join a running batch in a free cache row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

KV_ALIGN = 64  # cache length granularity: keeps the attention mask's last dim aligned for fused kernels
KV_BUCKET = 256  # attended span granularity: steps of nearby lengths share one CUDA graph


def cache_len(max_seq_len: int) -> int:
    """Positions a KV cache holds for ``max_seq_len``, rounded up so attention spans stay aligned."""
    return -(-max_seq_len // KV_ALIGN) * KV_ALIGN


def attended_len(max_pos: int, cache_positions: int) -> int:
    """How many cache positions a step attends to, when its highest position is ``max_pos``: rounded up to
    a bucket (masked, so the result is the same) so that CUDA graphs are shared between nearby lengths."""
    return min(cache_positions, -(-(max_pos + 1) // KV_BUCKET) * KV_BUCKET)


@dataclass(frozen=True)
class StepShape:
    """Host-side metadata of a step: travels beside the packet, so no block reads the GPU for it."""

    bsz: int
    seqlen: int
    kv_len: int  # cache positions attended: > every position in the step
    row0: int = 0  # the batch occupies KV-cache rows row0 .. row0 + bsz - 1
    # The lowest position a token of the step writes and one past the highest, where the host knows them (None:
    # anywhere below kv_len): what a CPU lane block's two caches copy between them (kv_mirror.py). Not part of
    # the shape's identity, so steps that write elsewhere still share their CUDA graphs.
    written: Optional[tuple[int, int]] = field(default=None, compare=False)


@dataclass
class Step:
    tokens: torch.Tensor  # (bs, seqlen) int64
    input_pos: torch.Tensor  # (bs, seqlen) int64: each token's position in its own sequence
    shape: StepShape
    last: Optional[torch.Tensor] = None  # (bs,) index into seqlen whose logits are wanted; None: every position


def to_device(values: Sequence | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An int64 tensor on ``device``, copied without making the host wait (pinned staging on CUDA)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def make_step(tokens: torch.Tensor, starts: Sequence[int] | int, *, max_positions: int, row0: int = 0,
              last: Optional[Sequence[int]] = None) -> Step:
    """A step over ``tokens`` (bs, seqlen), already on the model's device, whose row i holds positions
    ``starts[i] .. starts[i] + seqlen - 1`` (one int: every row starts there). ``max_positions``: the KV
    cache's length. ``last``: per row, the index into seqlen whose logits are wanted (None: all of them)."""
    bsz, seqlen = tokens.shape
    device = tokens.device
    per_row = [starts] * bsz if isinstance(starts, int) else [int(s) for s in starts]
    if len(per_row) != bsz:
        raise ValueError(f"{len(per_row)} start positions were given for a batch of {bsz} rows.")
    if min(per_row) < 0:
        raise ValueError(f"start positions must be >= 0, found {min(per_row)}.")
    top = max(per_row) + seqlen - 1
    if top >= max_positions:
        raise ValueError(f"A step reaches position {top}, but the KV cache holds {max_positions} positions. "
                         "Raise max_seq_len, or keep prompt + generation within it.")
    offsets = torch.arange(seqlen, device=device)  # (seqlen,)
    if isinstance(starts, int):
        input_pos = (offsets + starts).expand(bsz, seqlen)  # (bs, seqlen)
    else:
        input_pos = to_device(per_row, device)[:, None] + offsets  # (bs, seqlen)
    if last is not None and len(last) != bsz:
        raise ValueError(f"{len(last)} last-position indices were given for a batch of {bsz} rows.")
    last_t = None if last is None else to_device([int(i) for i in last], device)
    return Step(tokens, input_pos, StepShape(bsz, seqlen, attended_len(top, max_positions), row0, (min(per_row), top + 1)),
                last_t)


def attention_mask(input_pos: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(bs, 1, seqlen, kv_len) additive mask: 0 where a token may attend (every cached position up to its own),
    -inf elsewhere. Built once per step, in the form the attention kernel adds (no per-block conversion); each
    row sees only its own positions, so unequal lengths need no padding mask."""
    keys = torch.arange(kv_len, device=input_pos.device)  # (kv_len,)
    hidden = keys[None, None, :] > input_pos[:, :, None]  # (bs, seqlen, kv_len)
    mask = torch.zeros(hidden.shape, dtype=dtype, device=input_pos.device).masked_fill_(hidden, float("-inf"))
    return mask[:, None]  # (bs, 1, seqlen, kv_len)
