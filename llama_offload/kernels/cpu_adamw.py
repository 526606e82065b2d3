"""The native host AdamW step (csrc/cpu_adamw.cpp, built at first use by native_build.py): one pass over a unit's
grad, fp32 master weights and moments (fp32, bf16, or int8 codes in blocks of BLOCK with a fp32 scale each).
llama_offload/train/host_adamw.py owns the storage formats and uses this kernel where it builds, torch's
kernels otherwise."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from llama_offload.kernels import native_build

SOURCE = "cpu_adamw"
BLOCK = 256  # int8 moments: elements per scale (kBlock in csrc/cpu_adamw.cpp)
TINY = 1e-30  # int8 moments: the smallest block maximum a scale divides by (kTiny in csrc/cpu_adamw.cpp)
# bf16 stochastic rounding: the multipliers of dither() in csrc/cpu_adamw.cpp, a hash of an element's index and a key.
DITHER_INDEX_MUL, DITHER_MIX1, DITHER_MIX2 = 0x61C88647, 0x7FEB352D, 0x2C1B3C6D
DITHER_STEP_MUL, DITHER_UNIT_MUL = 0x2545F491, 0x1B873593  # dither_key(): the step's and the unit's

_MOMENTS = {torch.float32: (torch.float32, False), torch.bfloat16: (torch.bfloat16, False),
            torch.int8: (torch.uint8, True)}  # exp_avg's dtype -> (exp_avg_sq's dtype, blockwise with scales)

_op: Optional[Callable[..., None]] = None


def available(verbose: bool = True) -> bool:
    """Whether the native step is built and loaded here (building it on the first call)."""
    return native_build.load(SOURCE, verbose=verbose) is None


def unavailable_reason() -> Optional[str]:
    """Why the native step is not available here (None: it is), without printing it."""
    return native_build.load(SOURCE, verbose=False)


def dither_key(unit: int, step: int) -> int:
    """The key of the bf16 stochastic rounding of ``unit``'s step ``step``: its random bits are a hash of the key
    and each element's index, so a step rounds the same way every time it is taken (resume included)."""
    return (step * DITHER_STEP_MUL + unit * DITHER_UNIT_MUL) & 0xFFFFFFFF


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               exp_avg_scale: Optional[torch.Tensor], exp_avg_sq_scale: Optional[torch.Tensor], *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step_size: float,
               bias_correction2_sqrt: float, dither: Optional[int] = None) -> None:
    """One AdamW step of ``param`` in place (decoupled weight decay), with ``step_size`` = lr / (1 - beta1**t) and
    ``bias_correction2_sqrt`` = sqrt(1 - beta2**t). bf16 moments are rounded to nearest even, or stochastically
    with the key ``dither`` (``dither_key``). Operands are checked here, as a ValueError: a C++ exception thrown
    inside a native operator has crashed the process where torch and the compiler differ (kernels/cpu.py)."""
    global _op
    n = param.numel()
    for name, t in (("param", param), ("grad", grad)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"cpu_adamw.adamw_step: {name} must be a contiguous float32 CPU tensor of {n} elements; "
                             f"got {t.dtype} on {t.device} with {t.numel()} elements")
    if exp_avg.dtype not in _MOMENTS:
        raise ValueError(f"cpu_adamw.adamw_step: exp_avg must be float32, bfloat16 or int8; got {exp_avg.dtype}")
    sq_dtype, blockwise = _MOMENTS[exp_avg.dtype]
    size = -(-n // BLOCK) * BLOCK if blockwise else n
    for name, t, dtype in (("exp_avg", exp_avg, exp_avg.dtype), ("exp_avg_sq", exp_avg_sq, sq_dtype)):
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != size:
            raise ValueError(f"cpu_adamw.adamw_step: {name} must be a contiguous {dtype} CPU tensor of {size} "
                             f"elements; got {t.dtype} on {t.device} with {t.numel()} elements")
    if blockwise:
        for name, t in (("exp_avg_scale", exp_avg_scale), ("exp_avg_sq_scale", exp_avg_sq_scale)):
            if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() \
                    or t.numel() != size // BLOCK:
                raise ValueError(f"cpu_adamw.adamw_step: int8 moments need {name}, a contiguous float32 CPU tensor "
                                 f"of {size // BLOCK} elements (one a block of {BLOCK})")
    if _op is None:
        if not available(verbose=False):
            raise RuntimeError(f"cpu_adamw.adamw_step: the native kernel is not available ({unavailable_reason()})")
        _op = torch.ops.llama_offload_cpu_adamw.adamw_step.default
    if dither is not None and not 0 <= dither <= 0xFFFFFFFF:
        raise ValueError(f"cpu_adamw.adamw_step: dither must be a 32-bit key (dither_key()) or None; got {dither}")
    _op(param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, lr, beta1, beta2, eps, weight_decay,
        step_size, bias_correction2_sqrt, -1 if dither is None else dither)
