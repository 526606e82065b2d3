"""Meta's reference LLaMA math, with Meta's parameter names so ``consolidated.*.pth`` loads as is.

``Transformer`` here is the plain, unoffloaded model: every offloaded result is compared with it.

Under model parallelism (torchrun with N > 1 processes, see parallel.py) each rank builds FairScale's
parallel layers instead, with the same parameter names: wq/wk/wv/w1/w3 hold 1/N of the output features,
wo/w2 1/N of the input features (their partial sums are all-reduced), the output head 1/N of the vocabulary
(gathered), and each rank attends with its own n_heads/N query and kv_heads/N key/value heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: fp16/bf16 sums of squares lose too much precision.
        return self._norm(x.float()).type_as(x) * self.weight


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
    assert freqs_cis.shape == (x.shape[1], x.shape[-1]), (freqs_cis.shape, x.shape)
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)  # (1, seqlen, 1, head_dim/2)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (bs, seqlen, n_heads, head_dim/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))  # (bs, seqlen, n_kv_heads, head_dim/2)
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)  # (bs, seqlen, n_heads, head_dim)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)  # (bs, seqlen, n_kv_heads, head_dim)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)  # (bs, slen, n_heads, head_dim)
    )


def causal_mask(seqlen: int, start_pos: int, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Meta's mask: new tokens see every cached position and the new tokens up to themselves."""
    if seqlen == 1:
        return None  # one new token may attend to everything before it
    mask = torch.full((seqlen, seqlen), float("-inf"), device=device)
    mask = torch.triu(mask, diagonal=1)
    # (seqlen, start_pos + seqlen): cached positions are all visible
    return torch.hstack([torch.zeros((seqlen, start_pos), device=device), mask]).to(dtype)


class KVCache:
    """Keys and values of one block. Not an nn.Module on purpose: offload pages a block's parameters
    and buffers, and the cache must stay on the GPU instead of travelling with its block."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen = xk.shape[:2]
        end = start_pos + seqlen
        if end > self.k.shape[1] or bsz > self.k.shape[0]:
            raise ValueError(
                f"KV cache holds {self.k.shape[0]} sequences of {self.k.shape[1]} positions; "
                f"asked for {bsz} sequences up to position {end}. Raise max_batch_size / max_seq_len."
            )
        self.k[:bsz, start_pos:end] = xk
        self.v[:bsz, start_pos:end] = xv
        return self.k[:bsz, :end], self.v[:bsz, :end]  # (bs, cache_len + seqlen, n_kv_heads, head_dim)


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


class Attention(nn.Module):
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

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (bs, seqlen, n_local_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (bs, seqlen, n_local_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        keys, values = self.cache.update(start_pos, xk, xv)
        keys = repeat_kv(keys, self.n_rep)  # (bs, cache_len + seqlen, n_local_heads, head_dim)
        values = repeat_kv(values, self.n_rep)  # (bs, cache_len + seqlen, n_local_heads, head_dim)

        xq = xq.transpose(1, 2)  # (bs, n_local_heads, seqlen, head_dim)
        keys = keys.transpose(1, 2)  # (bs, n_local_heads, cache_len + seqlen, head_dim)
        values = values.transpose(1, 2)  # (bs, n_local_heads, cache_len + seqlen, head_dim)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)  # (bs, n_local_heads, seqlen, cache_len + seqlen)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)  # (bs, n_local_heads, seqlen, head_dim)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)  # (bs, seqlen, n_local_heads * head_dim)
        return self.wo(output)  # (bs, seqlen, dim): with N ranks, the sum of every rank's heads


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, model_parallel_size: int = 1):
        super().__init__()
        self.w1 = _column_parallel(dim, hidden_dim, model_parallel_size)
        self.w2 = _row_parallel(hidden_dim, dim, model_parallel_size)
        self.w3 = _column_parallel(dim, hidden_dim, model_parallel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, model_parallel_size: int = 1):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, model_parallel_size)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, model_parallel_size)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
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

    def setup_caches(self, max_batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocate the KV caches and the RoPE table on `device`. Called once, before the first forward.
        With N ranks each cache holds this rank's key/value heads only."""
        p = self.params
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, layer.attention.n_local_kv_heads,
                                            p.head_dim, device, dtype)
        # Meta's table covers twice the context; positions never exceed max_seq_len here, so that suffices.
        self.freqs_cis = precompute_freqs_cis(p.head_dim, max_seq_len * 2, p.rope_theta, device=device,
                                              use_scaled=p.use_scaled_rope)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if self.freqs_cis is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]  # (seqlen, head_dim/2)
        mask = causal_mask(seqlen, start_pos, h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.output(self.norm(h)).float()  # (bs, seqlen, vocab_size)
