"""Projections that read the same input (wq/wk/wv, w1/w3) run as one GEMM on a GPU when their weights lie
back to back in memory.

Decode steps are dominated by batch-1 GEMMs, and cuBLAS reads one (12288 x 4096) matrix faster than three
(4096 x 4096) ones: 26.6 us against 38.9 us on the H200 machine. The parameters keep Meta's names and shapes;
only their storage is shared. Whoever places the weights makes them adjacent: moving a module to a GPU does it
(``FusedProjections._apply``), and so does the pager's flat buffer (offload.pager.FlatPages, from ``groups``). The
forward pass fuses exactly when the weights are adjacent, so a paged block, a resident one and the plain model
on the same GPU all run the same kernels and give the same bits. On the CPU nothing changes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from llama_offload.model import quant
from llama_offload.model.cpu_linear import CpuLinear


def is_plain(linears: Sequence[nn.Module]) -> bool:
    # FairScale's parallel layers (several ranks) keep their own forward: never fused. A CPU lane block's
    # CpuLinear is a plain linear whenever its weight is on a GPU.
    return all(type(m) in (nn.Linear, CpuLinear) and m.bias is None for m in linears)


def adjacent_weight(linears: Sequence[nn.Module]) -> Optional[torch.Tensor]:
    """One (sum of out_features, in_features) view over the weights, if they lie back to back on a GPU."""
    if not is_plain(linears):
        return None
    ws = [m.weight for m in linears]
    if any(w.requires_grad for w in ws):
        # The combined view is outside autograd, so weights that train (full fine-tuning) run one by one, in the
        # graph-free forward too: its outputs are then the very ones the backward pass recomputes.
        return None
    first = ws[0]
    if not first.is_cuda or any(w.dtype != first.dtype or w.shape[1] != first.shape[1] or not w.is_contiguous()
                                for w in ws):
        return None
    storage = first.untyped_storage()
    # One storage, not merely neighbouring allocations: a view must never reach past its storage's end.
    if any(w.untyped_storage().data_ptr() != storage.data_ptr() for w in ws):
        return None
    for a, b in zip(ws, ws[1:]):
        if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
            return None
    rows = sum(w.shape[0] for w in ws)
    if (first.storage_offset() + rows * first.shape[1]) * first.element_size() > storage.nbytes():
        return None
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, first.shape[1]))


def group_weight(linears: Sequence[nn.Module], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The (sum of out_features, in_features) matrix of a group that can run as one GEMM on ``x``: adjacent 16-bit
    weights, or quantized ones dequantized back to back (quant.group_weight, on every device; None at a decode
    step that multiplies their codes directly, so each linear runs on its own)."""
    fused = adjacent_weight(linears)
    if fused is None:
        fused = quant.group_weight(list(linears), x.dtype, x.device, tokens=x.numel() // x.shape[-1])
    return fused


def project(x: torch.Tensor, linears: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Each linear applied to ``x``: one GEMM over adjacent weights, else one per linear."""
    fused = group_weight(linears, x)
    if fused is None:
        return [m(x) for m in linears]
    out = torch.nn.functional.linear(x, fused)  # (..., sum of out_features)
    return list(out.split([m.weight.shape[0] for m in linears], dim=-1))


def make_adjacent(linears: Sequence[nn.Module]) -> None:
    """Copy the weights into one buffer and point each parameter at its part (on the device they are on)."""
    if not is_plain(linears) or adjacent_weight(linears) is not None:
        return
    ws = [m.weight for m in linears]
    if len({(w.device, w.dtype, w.shape[1]) for w in ws}) != 1 or ws[0].device.type == "meta":
        return
    buf = torch.cat([w.detach() for w in ws])  # (sum of out_features, in_features)
    start = 0
    for w in ws:
        w.data = buf[start : start + w.shape[0]]
        start += w.shape[0]


class FusedProjections(nn.Module):
    """A module whose ``groups()`` of linears read the same input. Moving it to a GPU makes each group
    adjacent, so its forward can run the group as one GEMM."""

    def groups(self) -> list[list[nn.Module]]:
        raise NotImplementedError

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        for group in self.groups():
            if group[0].weight.is_cuda:
                make_adjacent(group)
        return out
