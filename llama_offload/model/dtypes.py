"""Dtypes by the names users give on the command line and checkpoints record."""

from __future__ import annotations

from typing import Optional

import torch



DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: Optional[str | torch.dtype], *, flag: Optional[str] = None) -> Optional[torch.dtype]:
    """A dtype given by name (``bf16``, ``float16``, ...) or as a torch dtype; None stays None. ``flag``: the run
    flag it came from (``--dtype``), whose unset default the error names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key in DTYPES:
        return DTYPES[key]
    if flag is not None:
        raise ValueError(
            f"Unknown {flag} {dtype!r}: expected float16, bfloat16 or float32 (or fp16, bf16, fp32). "
            "Leave it unset for the default: the checkpoint's own dtype on a GPU, float32 on the CPU."
        )
    raise ValueError(f"Unknown dtype {dtype!r}: expected bfloat16, float16 or float32 (or bf16, fp16, fp32).")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
