"""The fine-tuning progress line: step, loss, tokens/s, ETA and GPU memory, redrawn in place on a terminal."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import torch


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, first_step: int, device: torch.device, stream: TextIO = sys.stderr,
                 enabled: bool = True):
        self.total, self.first, self.device, self.stream, self.enabled = total_steps, first_step, device, stream, enabled
        self.start = time.perf_counter()
        self.tokens = 0
        self.tty = stream.isatty()
        self.last_line = ""

    def gpu_memory(self) -> str:
        if self.device.type != "cuda":
            return ""
        return f" | GPU {torch.cuda.max_memory_allocated(self.device) / 1024**3:.2f} GiB peak"

    def update(self, step: int, loss: float, tokens: int, eval_loss: Optional[float] = None) -> str:
        """``step``: steps done so far (1-based); ``tokens``: input tokens of this step over every rank."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        done = step - self.first
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        line = (f"step {step}/{self.total} | loss {loss:.4f}" + (f" | eval {eval_loss:.4f}" if eval_loss is not None else "")
                + f" | {rate:,.0f} tok/s | ETA {_clock(eta)}{self.gpu_memory()}")
        if self.enabled:
            if self.tty and eval_loss is None and step < self.total:
                self.stream.write("\r" + line.ljust(len(self.last_line)))
            else:
                self.stream.write(("\r" if self.tty else "") + line.ljust(len(self.last_line) if self.tty else 0) + "\n")
            self.stream.flush()
        self.last_line = line
        return line
