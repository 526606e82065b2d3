"""Dequantization on the GPU in one Triton kernel: read the codes and scales once, write the 16-bit matrix once.

Without it, PyTorch runs the unpacking, the conversion, the scaling and the rounding as separate kernels
through fp32 temporaries, several times the traffic: on a paged int4 block that would outlast the block's
copy. The arithmetic is quant.dequantize's (fp32, the product and the sum each rounded, no fused multiply-add,
then one rounding to the output dtype), so both give the same bits whatever the scales. Triton is optional:
where it is missing, quant.py computes the same values with PyTorch.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BLOCK = 1024  # bytes of codes per program


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if os.environ.get("LLAMA_OFFLOAD_TRITON", "1") == "0":  # the PyTorch path, for comparison
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant(codes, scales, mins, out, n_bytes, bytes_per_row, bytes_per_group,
                INT4: tl.constexpr, HAS_MINS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte index in the (rows, bytes) codes
        valid = offs < n_bytes
        group = (offs // bytes_per_row) * (bytes_per_row // bytes_per_group) + (offs % bytes_per_row) // bytes_per_group
        s = tl.load(scales + group, mask=valid, other=0.0).to(tl.float32)
        if HAS_MINS:
            m = tl.load(mins + group, mask=valid, other=0.0).to(tl.float32)
        if INT4:
            b = tl.load(codes + offs, mask=valid, other=0).to(tl.int32)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            if HAS_MINS:
                lo = lo * s + m
                hi = hi * s + m
            else:
                lo = (lo - 8.0) * s
                hi = (hi - 8.0) * s
            tl.store(out + 2 * offs, lo.to(out.dtype.element_ty), mask=valid)
            tl.store(out + 2 * offs + 1, hi.to(out.dtype.element_ty), mask=valid)
        else:
            q = tl.load(codes + offs, mask=valid, other=0).to(tl.float32)
            w = q * s
            if HAS_MINS:
                w = w + m
            tl.store(out + offs, w.to(out.dtype.element_ty), mask=valid)

    return dequant


def dequantize(weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
               out: torch.Tensor) -> torch.Tensor:
    """quant.dequantize into ``out`` (rows, in_features), on the GPU ``weight`` is on."""
    import triton

    weight, scales = weight.contiguous(), scales.contiguous()
    mins = None if mins is None else mins.contiguous()
    int4 = weight.dtype == torch.uint8
    rows, bytes_per_row = weight.shape
    bytes_per_group = bytes_per_row // scales.shape[1]
    n_bytes = rows * bytes_per_row
    assert out.is_contiguous() and out.numel() == n_bytes * (2 if int4 else 1), (out.shape, weight.shape)
    grid = (triton.cdiv(n_bytes, BLOCK),)
    _kernels()[grid](weight, scales, scales if mins is None else mins, out, n_bytes, bytes_per_row, bytes_per_group,
                     INT4=int4, HAS_MINS=mins is not None, BLOCK=BLOCK,
                     enable_fp_fusion=False)  # q * s + m rounded twice, as PyTorch computes it: the same bits
    return out
