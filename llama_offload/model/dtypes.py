"""Dtypes by the names users give on the command line and checkpoints record."""

from __future__ import annotations

from typing import Optional

import torch



DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A dtype given by name (``bf16``, ``float16``, ...) or as a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: expected bfloat16, float16 or float32 (or bf16, fp16, fp32).")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
