"""How the CPU lane's blocks compute on the host: their matrices by one kernel per run, chosen by calibration,
and their attention by llama_offload's own kernel.

    "torch"       torch's own: ``F.linear`` for 16-bit weights, its weight-only kernels for int8/int4 codes
                  (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
    "dequantize"  int8/int4 codes dequantized to the model dtype, then ``F.linear`` (quantized blocks only)
    "gemv"        llama_offload's own matrix-vector kernels (csrc/cpu_gemv.cpp, built at first use by
                  native_build.py): one pass over the weights per step, every thread on its own band of rows;
                  fp16/bf16 weights converted to fp32 in registers, fp32 accumulation; int8/int4 codes
                  multiplied by x rounded to int16 per group in integer dot products (csrc/gemv_i16.h)

Attention on the CPU lane is always llama_offload's own where it builds (csrc/cpu_attention.cpp, ``attend_host``):
a few queries against a host KV cache, where torch's fused attention, built for long queries, took 0.44 ms for
one query over 256 positions on one core (0.03 ms native when 24 of them are filled, 0.21 ms when all are).

A decode step on the CPU lane is a few tokens against every weight of the block, so it is bound by how fast
the cores read the weights; torch's kernels are built for larger products (measured: a 7B fp16 block on 15
threads took 9.3 ms with ``F.linear``, where the host's 97.7 GB/s allow about 4). Calibration (offload/lanes.py)
times each kernel that applies on a random block and the CPU lane runs the fastest; a kernel that is not
available here (no compiler for "gemv") is simply not among the candidates.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from llama_offload.kernels import native_build


DENSE_KERNELS = ("torch", "gemv")


QUANT_KERNELS = ("dequantize", "torch", "gemv")


GEMV_DTYPES = (torch.float16, torch.bfloat16)  # the 16-bit weights the native kernel reads


NATIVE_SOURCES = ("cpu_gemv", "cpu_attention", "cpu_block")  # csrc/*.cpp: the products, the attention, a fused block


def gemv_available(verbose: bool = True) -> bool:
    """Whether the native kernels are built and loaded here (building them on first call)."""
    return native_build.load("cpu_gemv", verbose=verbose) is None


def gemv_unavailable_reason() -> Optional[str]:
    """Why the native kernels are not available here (None: they are), without printing it."""
    return native_build.load("cpu_gemv", verbose=False)


def gemv_isa() -> Optional[str]:
    """The instructions the native kernels were built with ("avx512", "avx2", "scalar"), or None."""
    return torch.ops.llama_offload_cpu.isa() if gemv_available(verbose=False) else None


# gemv_linear, gemv_quant and attend_host check their operands before the native operators see them. The
# operators check too, but a C++ exception thrown inside them has crashed the process (a segmentation fault, not
# a RuntimeError) where torch and the kernels came from different compilers (torch 2.11 + g++ 13 on the GPU
# machine), so a bad operand is refused here, as a ValueError, and the operators' own checks are the last resort.
# The CPU lane's modules (CpuLinear, quant.QuantLinear, model.Attention) call the operators through `native`
# instead: their weights were checked when they were made and x comes from the model, and the checks would cost
# 5-15 us a call, 7 matrices and an attention a block, at 1-3 ms a block.
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_OPS: dict[str, Callable[..., torch.Tensor]] = {}


def native(name: str) -> Callable[..., torch.Tensor]:
    """The native operator ``name`` ("linear16", "linear_quant", "attend"), unchecked: its overload resolved once
    (the packet's lookup costs a few us a call). The kernels must be loaded (gemv_available/attention_available)."""
    op = _OPS.get(name)
    if op is None:
        ns = torch.ops.llama_offload_cpu_attention if name == "attend" else torch.ops.llama_offload_cpu
        op = _OPS[name] = getattr(ns, name).default
    return op


def _check_x(x: torch.Tensor, n_in: int, what: str) -> None:
    if x.device.type != "cpu" or x.dtype not in X_DTYPES or x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"{what}: x must be a float16, bfloat16 or float32 CPU tensor of {n_in} input features; "
                         f"got {x.dtype} on {x.device} of shape {tuple(x.shape)}")


def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T with the native kernel; weight fp16 or bf16, both on the CPU."""
    if weight.dim() != 2 or weight.dtype not in GEMV_DTYPES or weight.device.type != "cpu" or not weight.is_contiguous():
        raise ValueError(f"gemv_linear: the weight must be a contiguous (out, in) float16 or bfloat16 CPU matrix; got "
                         f"{weight.dtype} on {weight.device} of shape {tuple(weight.shape)}")
    _check_x(x, weight.shape[1], "gemv_linear")
    return native("linear16")(x, weight)


def gemv_quant(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor],
               int16_x: bool = True) -> torch.Tensor:
    """x (..., in) @ dequantize(codes, scales, mins)^T with the native kernel, in quant.py's layout. With
    ``int16_x``, a fp16 or bf16 x (where the group sizes fit the vectors) is rounded to int16 per group and the
    codes multiply it in integer dot products (csrc/gemv_i16.h: errors of the order of the fp16 model's own
    roundings); a fp32 x, or ``int16_x`` False, multiplies in fp32."""
    int4 = codes.dtype == torch.uint8
    if codes.dim() != 2 or codes.dtype not in (torch.int8, torch.uint8) or codes.device.type != "cpu" \
            or not codes.is_contiguous():
        raise ValueError(f"gemv_quant: the codes must be a contiguous (out, in) int8 or (out, in / 2) uint8 CPU matrix; "
                         f"got {codes.dtype} on {codes.device} of shape {tuple(codes.shape)}")
    n_in = codes.shape[1] * (2 if int4 else 1)
    if (scales.dim() != 2 or scales.shape[0] != codes.shape[0] or scales.dtype not in (torch.float16, torch.float32)
            or not scales.is_contiguous() or scales.shape[1] == 0 or n_in % scales.shape[1]
            or (int4 and (n_in // scales.shape[1]) % 2)):
        raise ValueError(f"gemv_quant: scales must be a contiguous float16 or float32 ({codes.shape[0]}, groups) matrix "
                         f"whose groups divide the {n_in} inputs (in even groups for int4); got {scales.dtype} of "
                         f"shape {tuple(scales.shape)}")
    if mins is not None and (mins.shape != scales.shape or mins.dtype != scales.dtype or not mins.is_contiguous()):
        raise ValueError(f"gemv_quant: mins must match scales ({scales.dtype}, {tuple(scales.shape)}); got {mins.dtype} "
                         f"of shape {tuple(mins.shape)}")
    _check_x(x, n_in, "gemv_quant")
    return native("linear_quant")(x, codes, scales, mins, int16_x)


def attention_available(verbose: bool = True) -> bool:
    """Whether the native attention (csrc/cpu_attention.cpp) is built and loaded here."""
    return native_build.load("cpu_attention", verbose=verbose) is None


def attend_host(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """model.attend's result with the native kernel, for tensors on the CPU: xq (bs, seqlen, n_heads, head_dim),
    keys and values (bs, kv_len, n_kv_heads, head_dim) in the cache's layout, mask additive (bs, 1, seqlen,
    kv_len); returns (bs, seqlen, n_heads * head_dim)."""
    shapes = f"xq {tuple(xq.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
    if xq.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape or keys.shape[0] != xq.shape[0] \
            or keys.shape[3] != xq.shape[3]:
        raise ValueError(f"attend_host: xq must be (bs, seqlen, n_heads, head_dim), keys and values (bs, kv_len, "
                         f"n_kv_heads, head_dim) alike; got {shapes}")
    if any(t.device.type != "cpu" for t in (xq, keys, values, mask)):
        raise ValueError("attend_host: every tensor must be on the CPU")
    if keys.shape[2] == 0 or xq.shape[2] % keys.shape[2]:
        raise ValueError(f"attend_host: n_heads must be a multiple of n_kv_heads; got {shapes}")
    if keys.dtype != values.dtype or keys.stride() != values.stride() or keys.stride(3) != 1:
        raise ValueError(f"attend_host: keys and values must share one layout, head_dim contiguous; got {keys.dtype} "
                         f"strides {keys.stride()} and {values.dtype} strides {values.stride()}")
    if keys.dtype not in X_DTYPES:
        raise ValueError(f"attend_host: the cache must be float16, bfloat16 or float32; got {keys.dtype}")
    return native("attend")(xq, keys, values, mask)


def kernels_for(dtype: torch.dtype, quantized: bool) -> tuple[str, ...]:
    """The kernels calibration times for a block of ``dtype`` (quantized or not) on this machine."""
    names = QUANT_KERNELS if quantized else DENSE_KERNELS
    if quantized or dtype in GEMV_DTYPES:
        # The "gemv" kernel's blocks use all three libraries: built side by side the first time, not one by one.
        native_build.build_together(NATIVE_SOURCES, verbose=True)
    gemv = (quantized or dtype in GEMV_DTYPES) and gemv_available()
    return tuple(k for k in names if k != "gemv" or gemv)
