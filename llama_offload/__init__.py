"""Run Meta-format LLaMA checkpoints that are larger than the GPU by paging blocks from host memory."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Dialog", "Llama", "Message", "ModelArgs"]

# Loaded on first use: importing the package stays cheap (torch is not imported yet), so the command can set
# up its signal handling before the heavy imports (see entry.py).
_HOME = {"ModelArgs": ".model.args", "Dialog": ".text.chat_format", "Message": ".text.chat_format",
         "Llama": ".generate.generation"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value
