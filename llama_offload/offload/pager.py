"""The pager: transformer blocks streamed from pinned host memory to the GPU through FairScale's OffloadModel.

Stock ``OffloadModel`` is built for training and is wrong for inference: it copies a
slice on a side stream that the compute stream never waits for, frees GPU memory that kernels may still
read, copies unchanged weights back to the host after every use, and round-trips every boundary
activation through the CPU. ``InferenceOffloadModel`` keeps OffloadModel's slicing (one ``ModelShard``
per slice) and replaces its forward pass:

    host:  one pinned flat buffer per slice (the only copy of its weights; parameters are views of it)
    GPU:   two reusable slot buffers; slice i is copied into slot i % 2 on a copy stream
    order: copy(i+1) overlaps compute(i); compute(i) waits for copy(i) (event ``loaded``);
           copy(i+2) into the same slot waits for compute(i) to finish (event ``freed``);
           the next step's slice 0 is copied as soon as this step's last slice is done

The packet stays on the GPU from the first slice to the last. ``load_page`` / ``wait_loaded`` /
``drop_page`` are the same steps for a caller with its own order (hybrid.py, which computes some pages on
the CPU in between).

Under model parallelism (torchrun, N processes) every rank pages its own 1/N of each block through its own
GPU, with the plan made for that part; the blocks' all-reduces run on the compute stream between the copies.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import numpy as np
import torch
from torch import nn

with warnings.catch_warnings():
    # fairscale 0.4.13 decorates its training path with the deprecated torch.cuda.amp API; we never use it.
    warnings.simplefilter("ignore", FutureWarning)
    from fairscale.experimental.nn.offload import OffloadModel

from llama_offload.model.fused import FusedProjections, is_plain

ALIGN = 256  # byte alignment of each tensor inside a flat buffer: keeps every dtype view and kernel aligned


def split_evenly(items: list, num_slices: int) -> list[list]:
    """Contiguous groups whose sizes differ by at most one (blocks are all the same size)."""
    if not 1 <= num_slices <= len(items):
        raise ValueError(f"num_slices must be between 1 and the number of blocks ({len(items)}), found {num_slices}.")
    base, extra = divmod(len(items), num_slices)
    groups, start = [], 0
    for i in range(num_slices):
        end = start + base + (i < extra)
        groups.append(items[start:end])
        start = end
    return groups


def pinned_host_buffer(nbytes: int) -> torch.Tensor:
    """Uninitialised page-locked host memory that the copy engine reads at full speed.

    Made by registering a plain allocation with CUDA rather than by cudaHostAlloc (``pin_memory=True``),
    which zero-fills and pins page by page: for 12 GiB on the H200 machine it took 4.8 s, against 1.1 s
    for allocating, filling and registering. The registration ends when the last view of the buffer dies.
    """
    array = np.empty(nbytes, dtype=np.uint8)  # numpy owns the memory: its lifetime ends the registration
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(array.ctypes.data, nbytes, 0)) != 0:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # registration refused: pin the usual way
    done = weakref.finalize(array, cudart.cudaHostUnregister, array.ctypes.data)
    done.atexit = False  # at exit the CUDA context may already be gone; the process frees everything anyway
    return torch.from_numpy(array)


class FlatPages:
    """The tensors of one slice laid out in one pinned host buffer, re-pointable at a GPU copy of it."""

    def __init__(self, module: nn.Module):
        # Weights that run as one GEMM (fused.py) go back to back; every other tensor starts aligned.
        units = [[m.weight for m in group] for sub in module.modules() if isinstance(sub, FusedProjections)
                 for group in sub.groups() if is_plain(group)]
        grouped = {id(t) for unit in units for t in unit}
        units += [[t] for t in list(module.parameters()) + list(module.buffers()) if id(t) not in grouped]
        self.tensors, self.offsets, offset = [], [], 0
        for unit in units:
            for t in unit:
                self.tensors.append(t)
                self.offsets.append(offset)
                offset += t.numel() * t.element_size()
            offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        self.nbytes = offset
        self.host = pinned_host_buffer(self.nbytes)
        # The tensors' views of each buffer they have pointed at (the host page, the slots): made once, since
        # slicing and viewing every tensor again cost 150-250 us a page on the host thread, twice per paged block.
        self._viewed: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        for t, host_view in zip(self.tensors, self._views(self.host)):
            host_view.copy_(t.data)
            t.data = host_view  # the old (possibly mmap-backed) storage is released here

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        key = flat.data_ptr()
        cached = self._viewed.get(key)
        if cached is None or cached[0].numel() < self.nbytes:
            views = [flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                     for t, o in zip(self.tensors, self.offsets)]
            # The buffer is kept with its views, so its address is never reused by another buffer meanwhile.
            cached = self._viewed[key] = (flat, views)
        return cached[1]

    def point_at(self, flat: torch.Tensor) -> None:
        for t, view in zip(self.tensors, self._views(flat)):
            t.data = view


class InferenceOffloadModel(OffloadModel):
    """OffloadModel for inference: one packet in, one packet out, weights paged from pinned memory."""

    def __init__(self, blocks: nn.Sequential, device: torch.device, num_slices: int):
        slices = [nn.Sequential(*group) for group in split_evenly(list(blocks), num_slices)]
        # The list form makes OffloadModel wrap each slice in a ModelShard without re-slicing or pinning.
        super().__init__(slices, device=device, offload_device=torch.device("cpu"), num_slices=len(slices))
        self.pages = [FlatPages(shard.model_shard) for shard in self.model_slices]
        slot_bytes = max(p.nbytes for p in self.pages)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(min(2, len(slices)))]
        self.copy_stream = torch.cuda.Stream(device=device)
        self.loaded = [torch.cuda.Event() for _ in self.slots]
        self.freed = [torch.cuda.Event() for _ in self.slots]
        self._first_slice_loaded = False
        # Benchmarks only (hybrid.LaneClock): each copy's start and end events, for the copy lane's busy time.
        self.copy_times: Optional[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = None

    def load_page(self, i: int, slot: int) -> None:
        """Queue the copy of slice i into ``slot`` on the copy stream; its parameters point at the GPU copy."""
        pages = self.pages[i]
        gpu = self.slots[slot][: pages.nbytes]
        with torch.cuda.stream(self.copy_stream):
            # The slot still holds an earlier slice until the kernels reading it have finished.
            self.copy_stream.wait_event(self.freed[slot])
            if self.copy_times is not None:
                self.copy_times.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                self.copy_times[-1][0].record(self.copy_stream)
            gpu.copy_(pages.host, non_blocking=True)
            self.loaded[slot].record(self.copy_stream)
            if self.copy_times is not None:
                self.copy_times[-1][1].record(self.copy_stream)
        pages.point_at(gpu)

    def wait_loaded(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.loaded[slot])

    def drop_page(self, i: int, slot: int) -> None:
        self.freed[slot].record(torch.cuda.current_stream(self.device))
        # Weights never change in inference: nothing is copied back, the parameters just point home.
        self.pages[i].point_at(self.pages[i].host)

    def forward(self, packet: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, width = len(self.model_slices), len(self.slots)
        if not self._first_slice_loaded:
            self.load_page(0, 0)
        self._first_slice_loaded = False  # stays False if a slice raises: the next call reloads
        for i, shard in enumerate(self.model_slices):
            if i + 1 < n:
                self.load_page(i + 1, (i + 1) % width)  # prefetch: this copy runs while slice i computes
            self.wait_loaded(i % width)
            packet = shard(packet)
            self.drop_page(i, i % width)
        # Weights never change, so the next step's first slice can be copied now, behind the output
        # head, the sampling and any resident blocks of the next step.
        self.load_page(0, 0)
        self._first_slice_loaded = True
        return packet
