"""Meta's reference LLaMA math, with Meta's parameter names so ``consolidated.*.pth`` loads as is.

``Transformer`` here is the plain, unoffloaded model: every offloaded result is compared with it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("The KV cache is not set up: call setup_caches() on the model before running it.")
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (bs, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bs, seqlen, n_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        keys, values = self.cache.update(start_pos, xk, xv)
        keys = repeat_kv(keys, self.n_rep)  # (bs, cache_len + seqlen, n_heads, head_dim)
        values = repeat_kv(values, self.n_rep)  # (bs, cache_len + seqlen, n_heads, head_dim)

        xq = xq.transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
        keys = keys.transpose(1, 2)  # (bs, n_heads, cache_len + seqlen, head_dim)
        values = values.transpose(1, 2)  # (bs, n_heads, cache_len + seqlen, head_dim)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)  # (bs, n_heads, seqlen, cache_len + seqlen)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)  # (bs, n_heads, seqlen, head_dim)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)  # (bs, seqlen, dim)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size is -1: set it from the tokenizer before building the model.")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.freqs_cis: Optional[torch.Tensor] = None  # plain attribute, not a buffer: not in the state dict

    def setup_caches(self, max_batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocate the KV caches and the RoPE table on `device`. Called once, before the first forward."""
        p = self.params
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, p.kv_heads, p.head_dim, device, dtype)
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
