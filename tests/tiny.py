"""Tiny random models for tests: small enough for CI, shaped to exercise every branch of the math."""

from __future__ import annotations

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import Transformer


def tiny_args(**overrides) -> ModelArgs:
    # n_kv_heads < n_heads (grouped-query attention) and rope_theta != 1e4 (Code Llama) on purpose.
    params = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32,
                  rope_theta=1e6, max_batch_size=4, max_seq_len=64)
    params.update(overrides)
    return ModelArgs(**params)


def tiny_model(args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights away from 1 so that a skipped norm would show.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()
