"""Paging transformer blocks between pinned host memory and the GPU with FairScale's OffloadModel.

Stock ``OffloadModel`` is built for training and is wrong for inference (see DESIGN.md): it copies a
slice on a side stream that the compute stream never waits for, frees GPU memory that kernels may still
read, copies unchanged weights back to the host after every use, and round-trips every boundary
activation through the CPU. ``InferenceOffloadModel`` keeps OffloadModel's slicing (one ``ModelShard``
per slice) and replaces its forward pass:

    host:  one pinned flat buffer per slice (the only copy of its weights; parameters are views of it)
    GPU:   two reusable slot buffers; slice i is copied into slot i % 2 on a copy stream
    order: copy(i+1) overlaps compute(i); compute(i) waits for copy(i) (event ``loaded``);
           copy(i+2) into the same slot waits for compute(i) to finish (event ``freed``);
           the next step's slice 0 is copied as soon as this step's last slice is done

The packet stays on the GPU from the first slice to the last.

Under model parallelism (torchrun, N processes) every rank pages its own 1/N of each block through its own
GPU, with the plan made for that part; the blocks' all-reduces run on the compute stream between the copies.
"""

from __future__ import annotations

import sys
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

from . import parallel
from .fused import FusedProjections
from .graphs import DecodeGraphs
from .model import Transformer, head
from .packing import PacketLayout, PackedBlock, StepContext
from .plan import OffloadPlan, WeightBytes, plan_offload
from .quant import QuantLinear, describe_quantization, quant_modules, scratch_bytes
from .step import Step, attention_mask, make_step

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
                 for group in sub.groups() if all(type(m) is nn.Linear for m in group)]
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
        for t, host_view in zip(self.tensors, self._views(self.host)):
            host_view.copy_(t.data)
            t.data = host_view  # the old (possibly mmap-backed) storage is released here

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, o in zip(self.tensors, self.offsets)
        ]

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

    def _load(self, i: int) -> None:
        slot = i % len(self.slots)
        pages = self.pages[i]
        gpu = self.slots[slot][: pages.nbytes]
        with torch.cuda.stream(self.copy_stream):
            # The slot still holds slice i - 2 until the kernels reading it have finished.
            self.copy_stream.wait_event(self.freed[slot])
            gpu.copy_(pages.host, non_blocking=True)
            self.loaded[slot].record(self.copy_stream)
        pages.point_at(gpu)

    def _drop(self, i: int) -> None:
        slot = i % len(self.slots)
        self.freed[slot].record(torch.cuda.current_stream(self.device))
        # Weights never change in inference: nothing is copied back, the parameters just point home.
        self.pages[i].point_at(self.pages[i].host)

    def forward(self, packet: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        compute = torch.cuda.current_stream(self.device)
        n = len(self.model_slices)
        if not self._first_slice_loaded:
            self._load(0)
        self._first_slice_loaded = False  # stays False if a slice raises: the next call reloads
        for i, shard in enumerate(self.model_slices):
            if i + 1 < n:
                self._load(i + 1)  # prefetch: this copy runs while slice i computes
            compute.wait_event(self.loaded[i % len(self.slots)])
            packet = shard(packet)
            self._drop(i)
        # Weights never change, so the next step's first slice can be copied now, behind the output
        # head, the sampling and any resident blocks of the next step.
        self._load(0)
        self._first_slice_loaded = True
        return packet


class OffloadedTransformer(nn.Module):
    """A loaded ``Transformer`` run as packed blocks; embedding, final norm, output head and KV caches resident.

    A step runs in three parts: ``prefix`` (embedding, the packet, the resident blocks), the paged blocks
    (``InferenceOffloadModel``), and ``suffix`` (final norm and head on the wanted positions). On a GPU,
    decode steps replay the prefix and suffix as CUDA graphs (graphs.py); the paged part stays eager, so
    its copies and events keep the order written in ``InferenceOffloadModel.forward``.
    """

    def __init__(self, model: Transformer, resident: list[PackedBlock], paged: Optional[nn.Module],
                 context: StepContext, device: torch.device, plan: OffloadPlan, cuda_graphs: bool):
        super().__init__()
        self.params = model.params
        self.device = device
        self.plan = plan
        self.tok_embeddings = model.tok_embeddings.to(device)
        self.norm = model.norm.to(device)
        self.output = model.output.to(device)
        self.resident = nn.Sequential(*resident)
        self.paged = paged
        self.context = context
        self.freqs_cis = model.freqs_cis
        self.dtype = model.dtype
        self.max_positions = model.max_positions
        self.head_half = model.params.head_dim // 2
        capturable = device.type == "cuda" and model.model_parallel_size == 1 and isinstance(paged, (InferenceOffloadModel, type(None)))
        self.graphs = DecodeGraphs(self) if cuda_graphs and capturable else None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Meta's call: every row at positions start_pos.., logits for every position (bs, seqlen, vocab)."""
        return self.step(make_step(tokens, start_pos, max_positions=self.max_positions))

    @torch.inference_mode()
    def step(self, step: Step) -> torch.Tensor:
        """Logits of one step: (bs, vocab) at ``step.last``, else (bs, seqlen, vocab)."""
        if self.graphs is not None and self.graphs.handles(step):
            return self.graphs.run(step)
        return self.run_eager(step)

    def run_eager(self, step: Step) -> torch.Tensor:
        packet = self.prefix(step)
        if self.paged is not None:
            packet = self.paged(packet)
        return self.suffix(packet, step.last)

    def prefix(self, step: Step) -> torch.Tensor:
        """Embedding, RoPE frequencies and mask (built once for the step) packed, then the resident blocks."""
        layout = PacketLayout(step.shape, self.params.dim, self.head_half, self.dtype)
        self.context.layout = layout
        h = self.tok_embeddings(step.tokens)  # (bs, seqlen, dim)
        freqs_cis = self.freqs_cis[step.input_pos]  # (bs, seqlen, head_dim/2)
        mask = attention_mask(step.input_pos, step.shape.kv_len, self.dtype)  # (bs, 1, seqlen, kv_len)
        return self.resident(layout.pack(h, freqs_cis, step.input_pos, mask))

    def suffix(self, packet: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.context.current().unpack(packet.to(self.device)).h  # (bs, seqlen, dim)
        return head(self.norm, self.output, h, last)


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def loaded_weight_bytes(model: Transformer) -> WeightBytes:
    """What the loaded weights take, block by block: quantized blocks count their codes and scales."""
    shapes = [(m.out_features, m.in_features) for _, m in quant_modules(model) if isinstance(m, QuantLinear)]
    # Groups dequantized together (wq/wk/wv, w1/w3); scratch_bytes caps every entry at one chunk.
    shapes += [(sum(m.out_features for m in g), g[0].in_features) for layer in model.layers
               for sub in (layer.attention, layer.feed_forward) for g in sub.groups()
               if all(isinstance(m, QuantLinear) for m in g)]
    return WeightBytes(max(_nbytes(layer) for layer in model.layers), _nbytes(model.tok_embeddings),
                       _nbytes(model.output) + _nbytes(model.norm), scratch_bytes(shapes, model.dtype),
                       describe_quantization(model))


def offload(
    model: Transformer,
    *,
    max_batch_size: int,
    max_seq_len: int,
    num_slices: Optional[int] = None,
    gpu_memory_gb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
    stock: bool = False,
    resident: bool = False,
    cuda_graphs: bool = True,
    prefill_chunk: Optional[int] = None,
) -> OffloadedTransformer:
    """Turn a loaded CPU ``Transformer`` into packed blocks, paged by OffloadModel on a GPU.

    ``gpu_memory_gb`` keeps as many blocks resident as the budget allows and pages the rest (see plan.py);
    without it every block is paged, in ``num_slices`` slices (default: one block per slice, the least GPU
    memory); ``resident=True`` keeps every block on the GPU. ``stock=True`` uses FairScale's unmodified
    OffloadModel instead, only to show that it is wrong in inference. Without CUDA, or with ``device="cpu"``,
    the same packed blocks run unoffloaded on the CPU. ``cuda_graphs`` replays decode steps as CUDA graphs.
    ``prefill_chunk`` (positions per prefill pass) sizes the plan's activation estimate.
    The model's own blocks are reused, so it must not be run on its own afterwards. A model split over N
    ranks (model parallelism) is planned and paged per rank: ``gpu_memory_gb`` is each rank's budget.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but PyTorch sees no CUDA GPU. Use device='cpu', or install a CUDA build of torch.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if resident and (gpu_memory_gb is not None or num_slices is not None):
        raise ValueError("resident=True keeps every block on the GPU: give no gpu_memory_gb or num_slices with it.")
    dtype = model.dtype
    plan = plan_offload(model.params, dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        gpu_memory_gb=gpu_memory_gb, num_slices=num_slices,
                        model_parallel_size=model.model_parallel_size, prefill_chunk=prefill_chunk,
                        all_resident=resident, sizes=loaded_weight_bytes(model))
    model.setup_caches(max_batch_size, max_seq_len, device, dtype)
    context = StepContext()
    packed = [PackedBlock(layer, context) for layer in model.layers]
    if device.type == "cpu":
        if parallel.is_rank0():
            print("llama_offload: no CUDA device, so the packed blocks run unoffloaded on the CPU.", file=sys.stderr)
        return OffloadedTransformer(model, packed, None, context, device, plan, cuda_graphs=False).eval()
    if stock:
        paged = OffloadModel(nn.Sequential(*packed), device=device, num_slices=plan.num_slices or len(packed))
        return OffloadedTransformer(model, [], paged, context, device, plan, cuda_graphs=False).eval()
    on_gpu = [block.to(device) for block in packed[: plan.resident_layers]]
    rest = packed[plan.resident_layers :]
    paged = InferenceOffloadModel(nn.Sequential(*rest), device, plan.num_slices) if rest else None
    return OffloadedTransformer(model, on_gpu, paged, context, device, plan, cuda_graphs).eval()
