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

from llama_offload.model.args import ModelArgs

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
