"""Meta's reference LLaMA math, with Meta's parameter names so ``consolidated.*.pth`` loads as is.

``Transformer`` here is the plain, unoffloaded model: every offloaded result is compared with it.

Under model parallelism (torchrun with N > 1 processes, see parallel.py) each rank builds FairScale's
parallel layers instead, with the same parameter names: wq/wk/wv/w1/w3 hold 1/N of the output features,
wo/w2 1/N of the input features (their partial sums are all-reduced), the output head 1/N of the vocabulary
(gathered), and each rank attends with its own n_heads/N query and kv_heads/N key/value heads.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama_offload.model import parallel
from llama_offload.model.args import ModelArgs
from llama_offload.model.fused import FusedProjections, group_weight, project
from llama_offload.model.step import Step, StepShape, attention_mask, cache_len, make_step


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Meta's x * rsqrt(mean(x^2) + eps) * weight as one fused kernel (on a GPU one launch instead of five,
        # and decode steps are launch-bound): it accumulates in fp32 as Meta's does, and rounds to the model
        # dtype once, after the scaling, where Meta rounds before it too.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_scaling(freqs: torch.Tensor, scale_factor: float = 8.0, low_freq_factor: float = 1.0,
                  high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: slow frequencies are divided by scale_factor, fast ones kept, and the band
    between them blended, so a model trained on 8192 positions reads much longer contexts."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, device: torch.device | str = "cpu",
                         use_scaled: bool = False) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: (dim // 2)].float() / dim))  # (dim/2,)
    if use_scaled:
        freqs = apply_scaling(freqs)
    t = torch.arange(end, device=device, dtype=torch.float32)  # (end,)
    freqs = torch.outer(t, freqs)  # (end, dim/2)
    return torch.polar(torch.ones_like(freqs), freqs)  # (end, dim/2) complex64


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Meta's (seqlen, head_dim/2) table, or per-token frequencies (bs, seqlen, head_dim/2) when every row
    of the batch sits at its own positions."""
    if freqs_cis.ndim == 3:
        assert freqs_cis.shape == (x.shape[0], x.shape[1], x.shape[-1]), (freqs_cis.shape, x.shape)
        return freqs_cis[:, :, None, :]  # (bs, seqlen, 1, head_dim/2)
    assert freqs_cis.shape == (x.shape[1], x.shape[-1]), (freqs_cis.shape, x.shape)
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)  # (1, seqlen, 1, head_dim/2)


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE on (bs, seqlen, heads, head_dim): Meta's math, element by element in fp32."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (bs, seqlen, heads, head_dim/2)
    out = torch.view_as_real(x_ * reshape_for_broadcast(freqs_cis, x_)).flatten(3)  # (bs, seqlen, heads, head_dim)
    return out.type_as(x)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate(xq, freqs_cis), rotate(xk, freqs_cis)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)  # (bs, slen, n_heads, head_dim)
    )


def attend(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # mask: (bs, 1, seqlen, kv_len) additive, 0 where a token may attend and -inf elsewhere
    """Fused attention (``scaled_dot_product_attention``): no (heads x seqlen x kv_len) score matrix is
    kept, so long prompts cost memory linear in their length.

    Grouped-query attention without copying the cache: the n_rep query heads that share a key/value head
    are stacked along the query axis, so each key/value head is read once, as it is stored.
    """
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_kv_heads = keys.shape[2]
    n_rep = n_heads // n_kv_heads
    q = xq.view(bsz, seqlen, n_kv_heads, n_rep, head_dim).permute(0, 2, 3, 1, 4)  # (bs, n_kv_heads, n_rep, seqlen, head_dim)
    q = q.reshape(bsz, n_kv_heads, n_rep * seqlen, head_dim)  # (bs, n_kv_heads, n_rep * seqlen, head_dim)
    if n_rep > 1:
        mask = mask.expand(bsz, n_rep, seqlen, mask.shape[-1]).reshape(bsz, 1, n_rep * seqlen, -1)  # (bs, 1, n_rep * seqlen, kv_len)
    out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
    out = out.view(bsz, n_kv_heads, n_rep, seqlen, head_dim).permute(0, 3, 1, 2, 4)  # (bs, seqlen, n_kv_heads, n_rep, head_dim)
    return out.reshape(bsz, seqlen, n_heads * head_dim)  # (bs, seqlen, n_heads * head_dim)


def attend_explicit(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Meta's attention math, score matrix and all: the reference ``attend`` is checked against."""
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_rep = n_heads // keys.shape[2]
    keys = repeat_kv(keys, n_rep).transpose(1, 2)  # (bs, n_heads, kv_len, head_dim)
    values = repeat_kv(values, n_rep).transpose(1, 2)  # (bs, n_heads, kv_len, head_dim)
    scores = torch.matmul(xq.transpose(1, 2), keys.transpose(2, 3)) / math.sqrt(head_dim)  # (bs, n_heads, seqlen, kv_len)
    scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    output = torch.matmul(scores, values)  # (bs, n_heads, seqlen, head_dim)
    return output.transpose(1, 2).reshape(bsz, seqlen, -1)  # (bs, seqlen, n_heads * head_dim)


class KVCache:
    """Keys and values of one block. Not an nn.Module on purpose: offload pages a block's parameters
    and buffers, and the cache must stay on the GPU instead of travelling with its block."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (max_batch_size, cache_len(max_seq_len), n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.row_start = torch.arange(max_batch_size, device=device) * shape[1]  # (max_batch_size,) flat index of each row

    def update(self, shape: StepShape, input_pos: torch.Tensor, xk: torch.Tensor,
               xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys/values at each token's own position (positions on the device: no host read),
        and return the rows' first kv_len positions."""
        rows, positions = self.k.shape[:2]
        if shape.row0 + shape.bsz > rows or shape.kv_len > positions:
            raise ValueError(
                f"KV cache holds {rows} sequences of {positions} positions; asked for rows {shape.row0}.."
                f"{shape.row0 + shape.bsz - 1} up to position {shape.kv_len - 1}. Raise max_batch_size / max_seq_len."
            )
        slot = (self.row_start[shape.row0 : shape.row0 + shape.bsz, None] + input_pos).reshape(-1)  # (bs * seqlen,)
        self.k.view(rows * positions, *self.k.shape[2:]).index_copy_(0, slot, xk.reshape(-1, *xk.shape[2:]))
        self.v.view(rows * positions, *self.v.shape[2:]).index_copy_(0, slot, xv.reshape(-1, *xv.shape[2:]))
        batch = slice(shape.row0, shape.row0 + shape.bsz)
        return self.k[batch, : shape.kv_len], self.v[batch, : shape.kv_len]  # (bs, kv_len, n_kv_heads, head_dim)

    def parts(self) -> list["KVCache"]:
        """The caches that hold this block's keys and values: itself (a CPU lane block's has two, kv_mirror.py)."""
        return [self]


def check_model_parallel_sizes(args: ModelArgs, world_size: int) -> None:
    """Every rank holds whole heads and equal parts of the other split dims: refuse a process count that
    does not divide them, naming the counts that would work."""
    if world_size == 1:
        return
    sizes = {"n_heads": args.n_heads, "key/value heads (n_kv_heads)": args.kv_heads,
             "feed-forward hidden size": args.ffn_hidden_dim, "vocab_size": args.vocab_size}
    bad = {name: size for name, size in sizes.items() if size % world_size}
    if bad:
        common = math.gcd(*sizes.values())
        works = [n for n in range(1, common + 1) if common % n == 0]
        found = ", ".join(f"{name} {size}" for name, size in bad.items())
        raise ValueError(
            f"Model parallelism over {world_size} processes needs n_heads, n_kv_heads, the feed-forward hidden "
            f"size and vocab_size to be divisible by {world_size} (each rank holds whole heads and an equal part "
            f"of every split matrix), but this model has {found}. Process counts that work for this model: "
            f"{', '.join(map(str, works))}. Run torchrun --nproc_per_node with one of them."
        )


def _column_parallel(in_features: int, out_features: int, model_parallel_size: int,
                     gather_output: bool = False) -> nn.Module:
    """nn.Linear, or with N ranks FairScale's column-parallel layer holding 1/N of the output features."""
    if model_parallel_size == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return parallel.ColumnParallelLinear(in_features, out_features, gather_output=gather_output)


def _row_parallel(in_features: int, out_features: int, model_parallel_size: int) -> nn.Module:
    """nn.Linear, or with N ranks FairScale's row-parallel layer: 1/N of the input features, all-reduced."""
    if model_parallel_size == 1:
        return nn.Linear(in_features, out_features, bias=False)
    return parallel.RowParallelLinear(in_features, out_features, input_is_parallel=True)


class Attention(FusedProjections):
    def __init__(self, args: ModelArgs, model_parallel_size: int = 1):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        # This rank's heads: all of them in one process.
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = args.kv_heads // model_parallel_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = _column_parallel(args.dim, args.n_heads * self.head_dim, model_parallel_size)
        self.wk = _column_parallel(args.dim, self.n_kv_heads * self.head_dim, model_parallel_size)
        self.wv = _column_parallel(args.dim, self.n_kv_heads * self.head_dim, model_parallel_size)
        self.wo = _row_parallel(args.n_heads * self.head_dim, args.dim, model_parallel_size)
        self.cache: Optional[KVCache] = None
        self.explicit = False  # True: Meta's score-matrix attention, the reference for the fused kernel
        # A CPU lane block's attention while it runs on the host (cpu_linear.set_cpu_kernel): the same math,
        # same arguments as ``attend``. None: ``attend`` everywhere.
        self.host_attend: Optional[Callable[..., torch.Tensor]] = None

    def groups(self) -> list[list[nn.Module]]:
        return [[self.wq, self.wk, self.wv]]

    def forward(self, x: torch.Tensor, shape: StepShape, input_pos: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        bsz, seqlen, _ = x.shape
        heads, kv_heads, head_dim = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        fused = group_weight(self.groups()[0], x)
        if fused is not None:  # one GEMM, and RoPE on q and k together: fewer launches per decode step
            xqkv = F.linear(x, fused)  # (bs, seqlen, (heads + 2 * kv_heads) * head_dim)
            xqk = xqkv[..., : (heads + kv_heads) * head_dim].view(bsz, seqlen, heads + kv_heads, head_dim)
            xq, xk = rotate(xqk, freqs_cis).split([heads, kv_heads], dim=2)  # (bs, seqlen, heads | kv_heads, head_dim)
            xv = xqkv[..., (heads + kv_heads) * head_dim :].view(bsz, seqlen, kv_heads, head_dim)
        else:
            xq = self.wq(x).view(bsz, seqlen, heads, head_dim)  # (bs, seqlen, n_local_heads, head_dim)
            xk = self.wk(x).view(bsz, seqlen, kv_heads, head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
            xv = self.wv(x).view(bsz, seqlen, kv_heads, head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
            xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys, values = self.cache.update(shape, input_pos, xk, xv)  # (bs, kv_len, n_local_kv_heads, head_dim)
        kernel = attend_explicit if self.explicit else attend
        if self.host_attend is not None and not self.explicit and xq.device.type == "cpu" and not torch.is_grad_enabled():
            kernel = self.host_attend
        output = kernel(xq, keys, values, mask)  # (bs, seqlen, n_local_heads * head_dim)
        return self.wo(output)  # (bs, seqlen, dim): with N ranks, the sum of every rank's heads


    def forward_causal(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Training: every row attends over its own tokens at positions 0..seqlen-1, causally; no KV cache.
        ``freqs_cis``: (seqlen, head_dim/2)."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (bs, seqlen, n_local_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys = repeat_kv(xk, self.n_rep).transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
        values = repeat_kv(xv, self.n_rep).transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
        # is_causal lets the fused kernels skip the masked half and keep no (seqlen x seqlen) scores for backward.
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys, values, is_causal=True)  # (bs, n_local_heads, seqlen, head_dim)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))  # (bs, seqlen, dim)


class FeedForward(FusedProjections):
    def __init__(self, dim: int, hidden_dim: int, model_parallel_size: int = 1):
        super().__init__()
        self.w1 = _column_parallel(dim, hidden_dim, model_parallel_size)
        self.w2 = _row_parallel(hidden_dim, dim, model_parallel_size)
        self.w3 = _column_parallel(dim, hidden_dim, model_parallel_size)

    def groups(self) -> list[list[nn.Module]]:
        return [[self.w1, self.w3]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.groups()[0])  # one GEMM where w1 and w3 are adjacent (fused.py)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, model_parallel_size: int = 1):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, model_parallel_size)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, model_parallel_size)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        # The same math as one native call on the host (cpu_block.BlockStep, set by cpu_linear.set_cpu_kernel):
        # a small model's decode step on a CPU costs more in per-op overhead than in its weights. It returns None
        # for the steps it does not take. None: the modules everywhere.
        self.host_step: Optional[Callable[..., Optional[torch.Tensor]]] = None

    def forward(self, x: torch.Tensor, shape: StepShape, input_pos: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out``: where to write the result (a packed block passes its packet's hidden state: no extra copy)."""
        if (self.host_step is not None and x.device.type == "cpu" and not self.attention.explicit
                and not torch.is_grad_enabled()):
            # The mask is always step.attention_mask(input_pos): the native step derives it from the positions.
            result = self.host_step(self, x, shape, input_pos, freqs_cis, out)
            if result is not None:
                return result
        h = x + self.attention(self.attention_norm(x), shape, input_pos, freqs_cis, mask)
        if out is None or torch.is_grad_enabled():  # autograd cannot record a write into `out`
            result = h + self.feed_forward(self.ffn_norm(h))
            return result if out is None else out.copy_(result)
        return torch.add(h, self.feed_forward(self.ffn_norm(h)), out=out)


    def forward_causal(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Training (train/): the same block over whole sequences from position 0, without a KV cache."""
        h = x + self.attention.forward_causal(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, *, model_parallel_size: Optional[int] = None,
                 vocab_parallel_embedding: bool = False):
        """``model_parallel_size``: None follows parallel.py (N ranks once torchrun's group is initialised, else
        1); 1 builds the whole model even then (a reference run on one rank). ``vocab_parallel_embedding`` picks
        how N ranks split the embedding: by token (Llama 3's VocabParallelEmbedding) or along the embedding dim
        (Llama 2's ParallelEmbedding); either is exact, it decides which bytes each rank loads."""
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size is -1: set it from the tokenizer before building the model.")
        n = parallel.model_parallel_world_size() if model_parallel_size is None else model_parallel_size
        if n > 1:
            check_model_parallel_sizes(params, n)
            if n != parallel.model_parallel_world_size():
                raise RuntimeError(f"A model split over {n} ranks needs a model-parallel group of {n} processes; "
                                   f"this one has {parallel.model_parallel_world_size()}. Call "
                                   f"parallel.init_model_parallel() under torchrun --nproc_per_node {n}.")
        self.params = params
        self.model_parallel_size = n
        self.vocab_parallel_embedding = bool(vocab_parallel_embedding) and n > 1
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        if n == 1:
            self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        elif self.vocab_parallel_embedding:
            self.tok_embeddings = parallel.VocabParallelEmbedding(params.vocab_size, params.dim)
        else:
            self.tok_embeddings = parallel.ParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params, n) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        # Every rank needs the whole distribution to sample the same token: gather the vocabulary parts.
        self.output = _column_parallel(params.dim, params.vocab_size, n, gather_output=True)
        self.freqs_cis: Optional[torch.Tensor] = None  # plain attribute, not a buffer: not in the state dict

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (a quantized embedding's own table is int8 or uint8)."""
        return self.norm.weight.dtype

    def setup_caches(self, max_batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocate the KV caches and the RoPE table on `device`. Called once, before the first forward.
        With N ranks each cache holds this rank's key/value heads only."""
        p = self.params
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, layer.attention.n_local_kv_heads,
                                            p.head_dim, device, dtype)
        # Meta's table covers twice the context; positions never exceed the cache length here, so that suffices.
        self.freqs_cis = precompute_freqs_cis(p.head_dim, cache_len(max_seq_len), p.rope_theta, device=device,
                                              use_scaled=p.use_scaled_rope)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Meta's call: every row at positions start_pos.., logits for every position (bs, seqlen, vocab)."""
        return self.step(make_step(tokens, start_pos, max_positions=self.max_positions))

    @property
    def max_positions(self) -> int:
        if self.freqs_cis is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        return self.layers[0].attention.cache.k.shape[1]

    @torch.inference_mode()
    def step(self, step: Step) -> torch.Tensor:
        """Logits of one step: (bs, vocab) at ``step.last``, else (bs, seqlen, vocab)."""
        if self.freqs_cis is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        h = self.tok_embeddings(step.tokens)  # (bs, seqlen, dim)
        freqs_cis = self.freqs_cis[step.input_pos]  # (bs, seqlen, head_dim/2)
        mask = attention_mask(step.input_pos, step.shape.kv_len, h.dtype)  # (bs, 1, seqlen, kv_len)
        for layer in self.layers:
            h = layer(h, step.shape, step.input_pos, freqs_cis, mask)
        return head(self.norm, self.output, h, step.last)


def head(norm: nn.Module, output: nn.Module, h: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
    """Final norm and output head, on the wanted positions only: a prompt's other positions need no logits."""
    if last is not None:
        h = h[torch.arange(h.shape[0], device=h.device), last]  # (bs, dim)
    return output(norm(h)).float()  # (bs, vocab) or (bs, seqlen, vocab)
