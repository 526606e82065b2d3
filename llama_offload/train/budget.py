"""How many blocks stay resident while fine-tuning under a GPU budget, and whether one block's step fits at all.

What a training step holds on the GPU besides the resident blocks:

    always    embedding, final norm, output head; the LoRA pairs with their gradients and AdamW moments (fp32)
    paging    two slots of one block's weights (one computing, one copying)
    one block the activations autograd keeps while one block is recomputed and back-propagated (estimated below)
    loss      one chunk of fp32 logits and its gradient (loss.py), and the hidden state's gradient
    checkpts  each block's input: all of them on the GPU, or a few in flight when offloaded to pinned memory

The activation estimate counts the tensors a LLaMA block keeps for its backward pass in the compute dtype and the
gradients alive beside them, with the feed-forward half over one chunk of positions (paged.block_backward). It is
an estimate: the GPU benchmark reports the measured peak beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llama_offload.model.args import ModelArgs, param_counts

GiB = 1024**3
LOGIT_CHUNK_BYTES = 256 * 1024**2  # fp32 logits per loss chunk: small against a block, large enough to keep GEMMs big
CUDA_CONTEXT_BYTES = GiB // 2  # kernels, cuBLAS workspace and allocator slack
FFN_CHUNK_TOKENS = 4096  # positions per feed-forward chunk: 0.7 GB of an 8B model's intermediates, GEMMs still large


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss: 523 for Llama 3's 128,256-token vocabulary, 2048 for 32,000."""
    return max(1, LOGIT_CHUNK_BYTES // (vocab_size * 4))


def block_activation_bytes(params: ModelArgs, tokens: int, itemsize: int, lora_rank: int) -> int:
    """The GPU memory one block's recompute and backward pass holds (paged.block_backward): the attention half's
    graph over every token, and the feed-forward half's over one chunk of FFN_CHUNK_TOKENS."""
    dim, ffn = params.dim, params.ffn_hidden_dim
    q = params.n_heads * params.head_dim
    attention = (
        (3 * dim + 4 * q) * itemsize  # input, its norm, the residual sum; q, keys and values over the query heads, output
        + 7 * lora_rank * itemsize  # each pair's A(x)
        + 3 * dim * itemsize  # d output, d residual, d input
        + 3 * q * itemsize  # d q, d k, d v while attention back-propagates
    )
    feed_forward = (2 * dim + 4 * ffn + 2 * ffn) * itemsize  # chunk in, its norm; w1, w3, silu, product; their grads
    return tokens * attention + min(tokens, FFN_CHUNK_TOKENS) * feed_forward


@dataclass(frozen=True)
class TrainingPlan:
    resident_layers: int
    n_layers: int
    block_bytes: int
    fixed_bytes: int  # embedding, norm, head, LoRA state, CUDA context
    activation_bytes: int  # one block's step, the loss chunk, the checkpoints
    budget_bytes: Optional[int]

    @property
    def paged_layers(self) -> int:
        return self.n_layers - self.resident_layers

    @property
    def expected_peak_bytes(self) -> int:
        slots = 2 * self.block_bytes if self.paged_layers else 0
        return self.fixed_bytes + self.activation_bytes + slots + self.resident_layers * self.block_bytes

    def describe(self) -> str:
        return (f"{self.resident_layers} of {self.n_layers} blocks resident, {self.paged_layers} paged; "
                f"expected peak {self.expected_peak_bytes / GiB:.2f} GiB"
                + (f" of a {self.budget_bytes / GiB:.2f} GiB budget" if self.budget_bytes else ""))


def plan_training(params: ModelArgs, *, block_bytes: int, fixed_weight_bytes: int, lora_params: int,
                  seq_len: int, batch_size: int, itemsize: int, lora_rank: int, offload_activations: bool,
                  gpu_memory_gb: Optional[float]) -> TrainingPlan:
    """``gpu_memory_gb`` None pages every block (the least memory), as inference does without a budget."""
    tokens = seq_len * batch_size
    checkpoint = tokens * params.dim * itemsize
    checkpoints = (3 if offload_activations else params.n_layers) * checkpoint
    loss = 3 * min(tokens, loss_chunk_tokens(params.vocab_size)) * params.vocab_size * 4 + 2 * tokens * params.dim * 4
    activations = block_activation_bytes(params, tokens, itemsize, lora_rank) + loss + checkpoints
    fixed = fixed_weight_bytes + 16 * lora_params + CUDA_CONTEXT_BYTES  # LoRA: weight, grad, two moments
    n = params.n_layers
    if gpu_memory_gb is None:
        return TrainingPlan(0, n, block_bytes, fixed, activations, None)
    budget = int(gpu_memory_gb * GiB)
    need = fixed + activations + 2 * block_bytes
    if budget < need:
        raise ValueError(
            f"--gpu_memory_gb {gpu_memory_gb:g} is too small to train one block at --seq_len {seq_len} x "
            f"--batch_size {batch_size}: one block's activations ({activations / GiB:.2f} GiB), two paged block "
            f"slots ({2 * block_bytes / GiB:.2f} GiB) and the embedding, head and LoRA state ({fixed / GiB:.2f} GiB) "
            f"need {need / GiB:.2f} GiB. Raise --gpu_memory_gb, or lower --seq_len or --batch_size"
            + ("" if offload_activations else ", or keep --offload_activations on") + "."
        )
    if budget >= fixed + activations + n * block_bytes:
        return TrainingPlan(n, n, block_bytes, fixed, activations, budget)
    resident = min(n - 1, (budget - need) // block_bytes)
    return TrainingPlan(int(resident), n, block_bytes, fixed, activations, budget)


# --- full fine-tuning: the GPU and the host ------------------------------------------------------------------

MOMENT_BYTES = {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / 256}  # AdamW's two moments per parameter (host_adamw)
HOST_MARGIN_BYTES = 4 * GiB  # the process, torch's CPU allocator, the data and page-cache pressure


def available_host_bytes() -> int:
    """What the kernel says can be allocated without swapping (MemAvailable), or the total where it says nothing."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class FullTrainingPlan:
    """Where full fine-tuning puts everything, on the GPU and on the host (per process)."""

    gpu: TrainingPlan
    checkpoints_on_host: bool
    optim_state: str
    host: dict[str, int]  # what -> bytes, in this process's host memory
    host_budget_bytes: int

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    on_gpu: bool = True

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.host.items() if v)
        gpu = (f"GPU: {self.gpu.describe()}; activation checkpoints on the "
               f"{'host' if self.checkpoints_on_host else 'GPU'}; " if self.on_gpu else "on the CPU; ")
        return (gpu + f"host: {self.host_bytes / GiB:.2f} GiB of {self.host_budget_bytes / GiB:.2f} ({parts} GiB; "
                f"{self.optim_state} moments)")


def plan_full_training(params: ModelArgs, *, seq_len: int, batch_size: int, itemsize: int, world: int,
                       optim_state: str, keep_grads: bool, offload_activations: Optional[bool], on_gpu: bool,
                       gpu_memory_gb: Optional[float], host_memory_gb: Optional[float]) -> FullTrainingPlan:
    """The plan of ``finetune --full``, refusing a run that cannot fit with the figures and what to change.

    Host, per process: the fp32 master weights and AdamW moments of the units this rank owns (1/world of them),
    the 16-bit working copies (pinned pages and the resident units' homes: every rank holds the whole model),
    two pinned fp32 staging buffers of the largest unit, the fp32 gradient accumulators when gradients must wait
    (--grad_accum above 1, or clipping), and the activation checkpoints when they live on the host. Those go to
    the GPU when every block's checkpoint fits there beside the rest (unless --offload_activations says)."""
    dim, n, vocab = params.dim, params.n_layers, params.vocab_size
    counts = param_counts(params)
    block_params, total_params = counts["per_block"], counts["held"]
    edge_params = vocab * dim  # the embedding; the head (output and final norm) is one more of about this size
    tokens = seq_len * batch_size
    one_checkpoint = tokens * dim * itemsize
    biggest = max(block_params, edge_params + dim)
    # The GPU: one unit's fp32 gradient sum and autograd's 16-bit gradients beside one block's step.
    gpu_fixed_extra = biggest * (4 + itemsize)
    fixed_weight_bytes = (2 * edge_params + dim) * itemsize

    def gpu_plan(on_host: bool) -> TrainingPlan:
        return plan_training(params, block_bytes=block_params * itemsize, fixed_weight_bytes=fixed_weight_bytes + gpu_fixed_extra,
                             lora_params=0, seq_len=seq_len, batch_size=batch_size, itemsize=itemsize, lora_rank=0,
                             offload_activations=on_host, gpu_memory_gb=gpu_memory_gb)

    if not on_gpu:
        on_host = False  # the CPU computes where the checkpoints already are
        plan = TrainingPlan(n, n, block_params * itemsize, 0, 0, None)
    elif offload_activations is not None:
        on_host = bool(offload_activations)
        plan = gpu_plan(on_host)
    else:
        try:  # checkpoints on the GPU when they fit there with the rest: no copies, and host memory is dearer
            plan, on_host = gpu_plan(False), False
            if gpu_memory_gb is None:
                raise ValueError("no GPU budget: page everything and keep the checkpoints on the host")
        except ValueError:
            plan, on_host = gpu_plan(True), True
    owned = -(-total_params // world)
    host = {
        "master weights": 4 * owned,
        "moments": int(MOMENT_BYTES[optim_state] * owned),
        "working weights": total_params * itemsize,  # bf16 pages and homes on a GPU; the model itself on the CPU
        "gradient staging": 2 * 4 * biggest if on_gpu else 0,
        "gradient sums": 4 * owned if keep_grads else 0,
        "activation checkpoints": n * one_checkpoint if on_host else 0,
    }
    budget = int(host_memory_gb * GiB) if host_memory_gb is not None else available_host_bytes() - HOST_MARGIN_BYTES
    full = FullTrainingPlan(plan, on_host, optim_state, host, budget, on_gpu)
    if full.host_bytes > budget:
        advice = []
        if optim_state == "fp32":
            advice.append(f"--optim_state bf16 (saves {(MOMENT_BYTES['fp32'] - MOMENT_BYTES['bf16']) * owned / GiB:.1f} GiB)"
                          f" or int8 (saves {(MOMENT_BYTES['fp32'] - MOMENT_BYTES['int8']) * owned / GiB:.1f} GiB)")
        elif optim_state == "bf16":
            advice.append(f"--optim_state int8 (saves {(MOMENT_BYTES['bf16'] - MOMENT_BYTES['int8']) * owned / GiB:.1f} GiB)")
        if on_host:
            advice.append("a larger --gpu_memory_gb so the activation checkpoints stay on the GPU, or a shorter --seq_len")
        if keep_grads:
            advice.append("--grad_accum 1 without --max_grad_norm (gradients then go straight to the optimizer)")
        if world == 1:
            advice.append("more processes (torchrun --nproc_per_node N shares the optimizer state)")
        where = "--host_memory_gb" if host_memory_gb is not None else "the memory available on this host"
        raise ValueError(
            f"Full fine-tuning needs {full.host_bytes / GiB:.1f} GiB of host memory per process "
            f"({', '.join(f'{k} {v / GiB:.1f}' for k, v in host.items() if v)} GiB), more than {where} "
            f"({budget / GiB:.1f} GiB). Try " + "; or ".join(advice) + ", or train LoRA adapters (without --full).")
    return full
