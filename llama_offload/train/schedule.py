"""Which process trains which rows: the processes of a data-parallel run and the fixed order of the rows.

The rows of every step come from a fixed order: epoch e is a permutation of the packed rows drawn from ``seed``
+ e, and step s takes rows s x G .. (s + 1) x G - 1 of the epochs laid end to end (G = rows per step over every
rank). So the data position is the step number, and a resumed run sees the rows the uninterrupted one would have.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel run; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_data_parallel(device: Optional[str]) -> torch.device:
    """The training device; under torchrun with N processes, each rank's (GPU LOCAL_RANK, or the CPU with gloo)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU. Use --device cpu, or install a "
                           "CUDA build of torch.")
    if size > 1:
        if wanted.type == "cuda":
            wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(wanted)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    elif wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return wanted


def step_rows(step: int, rows_per_step: int, n_rows: int, seed: int) -> torch.Tensor:
    """The packed rows of optimizer step ``step`` over every rank, in the fixed order (module docstring)."""
    first = step * rows_per_step
    out = []
    for k in range(first, first + rows_per_step):
        epoch, at = divmod(k, n_rows)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[at]))
    return torch.tensor(out, dtype=torch.long)
