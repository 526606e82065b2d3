"""Offloading a loaded model: the blocks placed as the plan says (resident on the GPU, paged through it by
pager.py, or computed on the CPU by hybrid.py), around a resident embedding, final norm, head and KV caches.

``offload()`` is the one entry: it plans (plan.py), sets up the caches and builds an ``OffloadedTransformer``,
whose step runs the resident prefix, the paged (and CPU) blocks, and the resident suffix.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from llama_offload.model import parallel
from llama_offload.offload.graphs import DecodeGraphs
from llama_offload.model.cpu_linear import set_cpu_kernel
from llama_offload.offload.hybrid import HybridOffloadModel
from llama_offload.offload.lanes import cpu_threads_for
from llama_offload.model.transformer import Transformer, head
from llama_offload.offload.packing import PacketLayout, PackedBlock, StepContext
from llama_offload.offload.pager import FlatPages, InferenceOffloadModel, OffloadModel, pinned_host_buffer, split_evenly  # noqa: F401
from llama_offload.offload.plan import LaneTimes, OffloadPlan, WeightBytes, plan_offload
from llama_offload.model.quant import QuantLinear, describe_quantization, quant_modules, scratch_bytes
from llama_offload.model.step import Step, attention_mask, make_step
from llama_offload.model.lora import lora_cpu_blocks, lora_linears



class OffloadedTransformer(nn.Module):
    """A loaded ``Transformer`` run as packed blocks; embedding, final norm, output head and KV caches resident.

    A step runs in three parts: ``prefix`` (embedding, the packet, the resident blocks), the paged blocks
    (``InferenceOffloadModel``, or ``HybridOffloadModel`` when some are computed on the CPU), and ``suffix`` (final norm and head on the wanted positions). On a GPU,
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
        capturable = device.type == "cuda" and model.model_parallel_size == 1 and isinstance(paged, (InferenceOffloadModel, HybridOffloadModel, type(None)))
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
    cpu_blocks: Optional[int] = 0,
    lanes: Optional[LaneTimes] = None,
    cpu_threads: Optional[int] = None,
    host_kernel: Optional[str] = None,
    plan: Optional[OffloadPlan] = None,
) -> OffloadedTransformer:
    """Turn a loaded CPU ``Transformer`` into packed blocks, paged by OffloadModel on a GPU.

    ``gpu_memory_gb`` keeps as many blocks resident as the budget allows and pages the rest (see plan.py);
    without it every block is paged, in ``num_slices`` slices (default: one block per slice, the least GPU
    memory); ``resident=True`` keeps every block on the GPU. ``stock=True`` uses FairScale's unmodified
    OffloadModel instead, only to show that it is wrong in inference. Without CUDA, or with ``device="cpu"``,
    the same packed blocks run unoffloaded on the CPU. ``cuda_graphs`` replays decode steps as CUDA graphs.
    ``prefill_chunk`` (positions per prefill pass) sizes the plan's activation estimate. ``cpu_blocks`` of the
    blocks left off the GPU are computed by the host's cores in decode steps (hybrid.py; None: as many as
    ``lanes``, the calibration, says is fastest), on ``cpu_threads`` threads (default: lanes.py's choice).
    ``host_kernel``: how the matrices multiply when the model runs on the CPU (kernels/cpu.py; the plan's
    measured choice, lanes.choose_host_kernel; None: torch's).
    ``plan``: the placement a run planned before loading (generate/run_plan.py), carried out as it is: the sizing
    flags above are then the plan's own (``num_slices``, ``gpu_memory_gb``, ``resident``, ``prefill_chunk``,
    ``cpu_blocks``, ``lanes``, ``host_kernel`` are not read). Its weight bytes must be what the loaded model holds.
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
    # An adapter attached beside quantized matrices (model/lora.py) stays resident, like the KV cache: its pairs
    # are not block parameters, so the pager never moves them. Blocks on the CPU lane could not reach them.
    pairs = {id(m.pair): m.pair for _, m in lora_linears(model)}
    if pairs:
        cpu_blocks = lora_cpu_blocks(cpu_blocks)
        for pair in pairs.values():
            pair.to(device)
    if plan is None:
        plan = plan_offload(model.params, dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                            gpu_memory_gb=gpu_memory_gb, num_slices=num_slices,
                            model_parallel_size=model.model_parallel_size, prefill_chunk=prefill_chunk,
                            all_resident=resident, sizes=loaded_weight_bytes(model),
                            cpu_blocks=cpu_blocks if device.type == "cuda" else 0, lanes=lanes)
    else:
        _check_planned(plan, model, device, lora_attached=bool(pairs))
        host_kernel = plan.host_kernel.kernel if plan.host_kernel is not None else None
    if plan.cpu_blocks:
        torch.set_num_threads(cpu_threads_for(cpu_threads, plan.model_parallel_size))
    model.setup_caches(max_batch_size, max_seq_len, device, dtype)
    context = StepContext()
    packed = [PackedBlock(layer, context) for layer in model.layers]
    if device.type == "cpu":
        if host_kernel is not None:
            set_cpu_kernel(model, host_kernel)  # every matrix, the output head's included, and the attention
        if parallel.is_rank0():
            how = f", their matrices multiplied by the {host_kernel} kernel" if host_kernel else ""
            print(f"llama_offload: no CUDA device, so the packed blocks run unoffloaded on the CPU{how}.", file=sys.stderr)
        return OffloadedTransformer(model, packed, None, context, device, plan, cuda_graphs=False).eval()
    if stock:
        paged = OffloadModel(nn.Sequential(*packed), device=device, num_slices=plan.num_slices or len(packed))
        return OffloadedTransformer(model, [], paged, context, device, plan, cuda_graphs=False).eval()
    on_gpu = [block.to(device) for block in packed[: plan.resident_layers]]
    rest = packed[plan.resident_layers :]
    if plan.cpu_blocks:
        on_cpu = [where == "cpu" for where in plan.placement()[plan.resident_layers :]]
        kernel = plan.lanes.cpu_kernel if plan.lanes is not None else "torch"
        paged = HybridOffloadModel(rest, on_cpu, device, context, plan.max_cpu_tokens, kernel, cuda_graphs)
    else:
        paged = InferenceOffloadModel(nn.Sequential(*rest), device, plan.num_slices) if rest else None
    return OffloadedTransformer(model, on_gpu, paged, context, device, plan, cuda_graphs).eval()


def _check_planned(plan: OffloadPlan, model: Transformer, device: torch.device, *, lora_attached: bool) -> None:
    """A plan made before loading must describe the model that was loaded: a difference is a bug in the planner
    (its estimate of a size), caught here before a block is placed."""
    loaded = loaded_weight_bytes(model)
    problems = []
    if plan.n_layers != len(model.layers):
        problems.append(f"{plan.n_layers} blocks planned, {len(model.layers)} loaded")
    if plan.block_bytes != loaded.block:
        problems.append(f"{plan.block_bytes} bytes a block planned, {loaded.block} loaded")
    if lora_attached and plan.cpu_blocks:
        problems.append("an attached LoRA adapter with a CPU lane")
    if device.type == "cpu" and plan.cpu_blocks:
        problems.append("a CPU lane on a run without a GPU")
    if problems:
        raise RuntimeError(f"internal: the run plan does not fit the loaded model ({'; '.join(problems)}). Please "
                           "report this with the command you ran.")
