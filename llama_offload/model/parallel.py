"""Model parallelism under torchrun: each process holds 1/N of every block, as Meta's reference code does.

``torchrun --nproc_per_node N`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set. ``init_model_parallel()`` joins them into one ``torch.distributed`` group and one FairScale
model-parallel group of size N, on GPU LOCAL_RANK. From then on ``model/transformer.py`` builds FairScale's parallel
layers instead of ``nn.Linear`` / ``nn.Embedding``, ``checkpoint/load.py`` loads only this rank's slice of every
split tensor, and ``offload/offloaded.py`` pages this rank's part of each block through its own GPU.

One process (WORLD_SIZE unset or 1) never touches ``torch.distributed``: the model is built from plain
``nn.Linear`` / ``nn.Embedding`` exactly as before.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from typing import NoReturn

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.utils import VocabUtility
from torch import nn

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "exit_after_error",
    "init_model_parallel",
    "is_rank0",
    "model_parallel_rank",
    "model_parallel_world_size",
    "quiet_other_ranks",
    "requested_world_size",
    "shutdown",
]


def requested_world_size() -> int:
    """The process count torchrun asked for (WORLD_SIZE), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1  # not set by torchrun: not our business


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RuntimeError(
            f"{name} is {value!r}, expected an integer: torchrun sets it for every process it starts. "
            "Start the processes with torchrun --nproc_per_node N."
        ) from None


def init_model_parallel() -> tuple[int, int]:
    """Join torchrun's processes into one model-parallel group; return (rank, world_size).

    The backend is NCCL for CUDA tensors (gloo for CPU tensors alongside it), gloo alone without CUDA.
    Each process uses GPU LOCAL_RANK. Calling it again returns the group already made.
    """
    if dist.is_available() and dist.is_initialized() and fs_init.model_parallel_is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = requested_world_size()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is {world_size}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "several processes started by hand are not supported yet. Start them with "
            f"torchrun --nproc_per_node {world_size} (model parallelism: each process holds 1/{world_size} of every "
            "block, on its own GPU), or run one process with torchrun --nproc_per_node 1 or plain python."
        )
    if not dist.is_available():
        raise RuntimeError("This build of PyTorch has no torch.distributed, which model parallelism needs. "
                           "Install a standard PyTorch build, or run one process (--nproc_per_node 1).")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise RuntimeError(
                f"This process has LOCAL_RANK {local_rank}, but PyTorch sees only {gpus} GPU(s) on this machine: "
                f"model parallelism needs one GPU per process. Use torchrun --nproc_per_node {gpus} or fewer "
                "(a number that divides the model's heads)."
            )
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the model; gloo lets CPU tensors (--device cpu) work too
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if not fs_init.model_parallel_is_initialized():
        # FairScale announces the group sizes on stdout, which is the program's output: keep it clean.
        with contextlib.redirect_stdout(io.StringIO()):
            fs_init.initialize_model_parallel(world_size)
    if rank == 0:
        device = "one GPU per process" if torch.cuda.is_available() else "CPU"
        print(f"llama_offload: model parallelism over {world_size} processes ({backend}, {device})",
              file=sys.stderr, flush=True)
    return rank, world_size


def model_parallel_world_size() -> int:
    """How many ranks each block is split over: 1 when model parallelism is not initialised."""
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else 0


def is_rank0() -> bool:
    """True in a single process, and in the first of torchrun's processes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return requested_world_size() == 1 or os.environ.get("RANK", "0") == "0"


def quiet_other_ranks() -> None:
    """Every rank computes the same answer; let only rank 0 print it (stderr stays open on every rank)."""
    if not is_rank0() and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")


def shutdown() -> None:
    """Leave the group cleanly (NCCL warns about a group never destroyed). No-op in a single process."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_after_error(message: str, *, show_traceback: bool = False, code: int = 1) -> NoReturn:
    """End this rank at once after an error, so that torchrun tears the others down.

    A rank that raises while the others wait in a collective would leave them waiting for the NCCL timeout
    (10 minutes), and a normal interpreter exit can itself block in the process group's destructor. So the
    rank prints its own error and leaves with ``os._exit``; torchrun sees the exit code and stops the rest.
    """
    rank = os.environ.get("RANK", "?")
    if show_traceback:
        traceback.print_exc()
    print("\n".join(f"[rank {rank}] {line}" for line in message.splitlines()), file=sys.stderr)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- FairScale's layers, built without touching memory -----------------------------------------------
#
# FairScale 0.4.13 allocates each weight with the legacy ``torch.Tensor(rows, cols)`` constructor, which
# ignores ``torch.device("meta")``, and then copies an initialisation into it (a meta->cpu copy that fails,
# or for a real model gigabytes of pointless writes). We always build on the meta device and load the
# checkpoint with ``assign=True``, so these subclasses set up the same attributes, allocate with
# ``torch.empty`` and skip the initialisation. ``forward`` is FairScale's, collectives included.


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """y = x W^T with W's rows (output features) split across ranks; no bias, as in LLaMA."""

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = out_features // _checked_split(out_features)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.register_parameter("bias", None)
        self.master_weight = None


class RowParallelLinear(fs_layers.RowParallelLinear):
    """y = x W^T with W's columns (input features) split across ranks and the partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool):
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = in_features // _checked_split(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.register_parameter("bias", None)
        self.master_weight = None


def _embedding_attributes(module: nn.Module, num_embeddings: int, embedding_dim: int) -> None:
    module.num_embeddings = num_embeddings
    module.embedding_dim = embedding_dim
    module.padding_idx = None
    module.max_norm = None
    module.norm_type = 2.0
    module.scale_grad_by_freq = False
    module.sparse = False
    module._weight = None


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """Llama 2's embedding: each rank holds every token's slice of the embedding dim; outputs all-gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        _embedding_attributes(self, num_embeddings, embedding_dim)
        self.embedding_dim_per_partition = embedding_dim // _checked_split(embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim_per_partition))


class VocabParallelEmbedding(fs_layers.VocabParallelEmbedding):
    """Llama 3's embedding: each rank holds a range of tokens; the other ranks' rows are zeros, all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        _embedding_attributes(self, num_embeddings, embedding_dim)
        _checked_split(num_embeddings)
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))


def _checked_split(size: int) -> int:
    n = fs_init.get_model_parallel_world_size()
    # model.check_model_parallel_sizes() explains a bad process count to the user before any layer is built.
    assert size % n == 0, f"{size} is not divisible by the model-parallel size {n}"
    return n
