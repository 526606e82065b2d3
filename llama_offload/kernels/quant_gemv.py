"""Quantized matrix-vector products on the GPU in one Triton kernel: the codes read once, no 16-bit matrix.

A decode step multiplies 1-8 tokens by each matrix. Dequantizing first (quant_triton.py) writes a 16-bit copy of
the matrix and reads it back, four to six times the traffic of the codes themselves: a 7B int4 block takes
0.61 ms that way on an H100, where its ~114 MB of codes alone would take ~0.1 ms. Here each program reads a band
of rows once, dequantizes it in registers (fp32, quant.dequantize's arithmetic) and multiplies it with every
token before moving on. This is a separate module from quant_triton.py because that one writes matrices, this
one never does; both use the same layout (quant.py's docstring).

Shapes: every format quant.py stores is handled, any group size that divides the input features (int4: an even
group), any row count and input length (tails masked), 1..MAX_TOKENS tokens. A group whose byte count has only a
small power-of-two factor (int4 g48: 24 bytes -> sub-tiles of 8) runs with smaller scale sub-tiles, correct but
slower. No split-K: a matrix has enough row bands to fill the GPU, and every output is summed in one order, so
results are deterministic (paged, resident and graphed blocks give the same bits).

CUDA graphs: nothing is tuned at run time. The tile is a fixed function of the shape, and every constexpr
(format, group, token count, dtypes) is compiled by the first call with it; graphs.py and block_graphs.py run each
step shape eagerly before capturing it, so no compilation happens inside a capture.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

# Tokens one launch multiplies: each is unrolled in the kernel (registers grow with it). Larger batches are
# matmuls, which the dequantize-then-GEMM path runs on tensor cores.
MAX_TOKENS = 16
# LLAMA_OFFLOAD_FUSED_GEMV=0: quant.QuantLinear dequantizes then multiplies even at decode (for comparisons).
# Benchmarks may flip the attribute itself.
enabled = os.environ.get("LLAMA_OFFLOAD_FUSED_GEMV", "1") != "0"

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x, codes, scales, mins, y, n_rows, bytes_per_row, n_groups,
                    T: tl.constexpr, T_P2: tl.constexpr, INT4: tl.constexpr, HAS_MINS: tl.constexpr,
                    GROUP_BYTES: tl.constexpr, SUB: tl.constexpr, N_SUB: tl.constexpr, BLOCK_N: tl.constexpr):
        # A tile is (BLOCK_N rows, N_SUB sub-tiles, SUB bytes): SUB divides the group's bytes, so one scale (and
        # min) covers a whole sub-tile and broadcasts along its last axis; the row's bytes are whole sub-tiles,
        # so a sub-tile is all inside the row or all past its end (one mask per sub-tile).
        EPB: tl.constexpr = 2 if INT4 else 1  # elements per byte
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < n_rows
        row_bytes = rows.to(tl.int64) * bytes_per_row  # int64: a large int8 head passes 2^31 bytes
        sub = tl.arange(0, N_SUB)  # (N_SUB,)
        byte = tl.arange(0, SUB)  # (SUB,)
        elem = tl.arange(0, SUB * EPB)  # (SUB * EPB,)
        tok = tl.arange(0, T_P2)  # (T_P2,)
        in_features = bytes_per_row * EPB
        acc = tl.zeros((T_P2, BLOCK_N), dtype=tl.float32)
        for kb in range(0, bytes_per_row, N_SUB * SUB):
            sub0 = kb + sub * SUB  # (N_SUB,) first byte of each sub-tile
            sub_ok = sub0 < bytes_per_row
            ok2 = row_ok[:, None] & sub_ok[None, :]  # (BLOCK_N, N_SUB)
            group = rows[:, None].to(tl.int64) * n_groups + (sub0 // GROUP_BYTES)[None, :]  # (BLOCK_N, N_SUB)
            s = tl.load(scales + group, mask=ok2, other=0.0).to(tl.float32)[:, :, None]  # (BLOCK_N, N_SUB, 1)
            if HAS_MINS:
                m = tl.load(mins + group, mask=ok2, other=0.0).to(tl.float32)[:, :, None]  # (BLOCK_N, N_SUB, 1)
            ptrs = codes + row_bytes[:, None, None] + sub0[None, :, None] + byte[None, None, :]  # (BLOCK_N, N_SUB, SUB)
            q = tl.load(ptrs, mask=ok2[:, :, None], other=0)
            if INT4:
                b = q.to(tl.int32)
                lo = (b & 15).to(tl.float32)  # element 2j
                hi = (b >> 4).to(tl.float32)  # element 2j + 1
                if HAS_MINS:
                    lo = lo * s + m
                    hi = hi * s + m
                else:
                    lo = (lo - 8.0) * s
                    hi = (hi - 8.0) * s
                # Interleave back into element order, so x is read contiguously (vector loads).
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, N_SUB, SUB * 2))  # (BLOCK_N, N_SUB, 2 * SUB)
            else:
                w = q.to(tl.float32) * s
                if HAS_MINS:
                    w = w + m  # (BLOCK_N, N_SUB, SUB)
            x_offs = (sub0 * EPB)[:, None] + elem[None, :]  # (N_SUB, SUB * EPB)
            for t in tl.static_range(T):
                xt = tl.load(x + t * in_features + x_offs, mask=sub_ok[:, None], other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(w * xt[None, :, :], axis=2), axis=1)  # (BLOCK_N,)
                acc = tl.where(tok[:, None] == t, acc + part[None, :], acc)  # (T_P2, BLOCK_N)
        out = y + tok[:, None] * n_rows + rows[None, :]  # (T_P2, BLOCK_N)
        tl.store(out, acc.to(y.dtype.element_ty), mask=(tok[:, None] < T) & row_ok[None, :])

    return gemv_kernel


def _pow2_factor(n: int) -> int:
    return n & -n


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile(rows: int, bytes_per_row: int, group_bytes: int, block_bytes: int = 256, block_rows: int = 8) -> tuple[int, int, int]:
    """(BLOCK_N, SUB, N_SUB): rows per program and the K tile of N_SUB sub-tiles of SUB bytes. 256 bytes of 8 rows
    (2 KB, 16 bytes a thread of 4 warps: one vector load) keep ~500 programs on a 4096-row matrix."""
    block_bytes = min(block_bytes, _next_pow2(bytes_per_row))
    sub = min(_pow2_factor(group_bytes), block_bytes)
    return min(block_rows, _next_pow2(rows)), sub, block_bytes // sub


def check_format(weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """Why ``gemv`` cannot multiply inputs of ``dtype`` by this matrix (a phrase), or None if it can."""
    if dtype not in _X_DTYPES:
        return f"x is {dtype}, not fp16, bf16 or fp32"
    if weight.dtype not in (torch.uint8, torch.int8) or weight.dim() != 2:
        return f"the codes are {weight.dtype} {tuple(weight.shape)}, not a 2-D int8 or uint8 (int4) matrix"
    rows, bytes_per_row = weight.shape
    if scales.dtype not in _SCALE_DTYPES or scales.dim() != 2 or scales.shape[0] != rows or scales.shape[1] < 1:
        return f"scales are {scales.dtype} {tuple(scales.shape)}, not fp16/fp32 ({rows}, groups)"
    if mins is not None and (mins.dtype != scales.dtype or mins.shape != scales.shape):
        return f"mins are {mins.dtype} {tuple(mins.shape)}, not like the scales {scales.dtype} {tuple(scales.shape)}"
    if bytes_per_row % scales.shape[1]:
        return f"{scales.shape[1]} groups do not divide a row of {bytes_per_row} bytes"
    return None


def check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor]) -> Optional[str]:
    """Why ``gemv`` cannot multiply ``x`` by this matrix (a phrase), or None if it can."""
    why = check_format(weight, scales, mins, x.dtype)
    if why is not None:
        return why
    n_in = weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    if x.dim() < 1 or x.shape[-1] != n_in:
        return f"x {tuple(x.shape)} does not end in the matrix's {n_in} input features"
    tokens = x.numel() // max(n_in, 1)
    if not 1 <= tokens <= MAX_TOKENS:
        return f"{tokens} tokens, outside 1..{MAX_TOKENS}"
    if len({t.device for t in (x, weight, scales) + (() if mins is None else (mins,))}) != 1:
        return "the tensors are on different devices"
    return None


def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor] = None, *,
         block_rows: int = 8, block_bytes: int = 256, num_warps: int = 4) -> torch.Tensor:
    """x (..., in_features) times the quantized matrix's transpose: (..., rows) in x's dtype, summed in fp32.
    Raises ValueError for what ``check`` refuses (the caller's cue to dequantize instead). The tile arguments
    (powers of two) are for benchmarks' sweeps; the defaults are what quant.QuantLinear runs."""
    why = check(x, weight, scales, mins)
    if why is not None:
        raise ValueError(f"quant_gemv.gemv cannot multiply these: {why}.")
    import triton

    rows, bytes_per_row = weight.shape
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in).contiguous()  # (tokens, in)
    tokens = x2.shape[0]
    weight, scales = weight.contiguous(), scales.contiguous()
    mins = None if mins is None else mins.contiguous()
    y = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)  # (tokens, rows)
    group_bytes = bytes_per_row // scales.shape[1]
    block_n, sub, n_sub = tile(rows, bytes_per_row, group_bytes, block_bytes, block_rows)
    grid = (triton.cdiv(rows, block_n),)
    _kernel()[grid](x2, weight, scales, scales if mins is None else mins, y, rows, bytes_per_row, scales.shape[1],
                    T=tokens, T_P2=_next_pow2(tokens), INT4=weight.dtype == torch.uint8, HAS_MINS=mins is not None,
                    GROUP_BYTES=group_bytes, SUB=sub, N_SUB=n_sub, BLOCK_N=block_n, num_warps=num_warps,
                    enable_fp_fusion=True)  # products summed by fused multiply-adds: fewer instructions a weight
    return y.view(*x.shape[:-1], rows)  # (..., rows)
