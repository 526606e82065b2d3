"""Write a Meta-format checkpoint of random weights at real LLaMA shapes, for tests and benchmarks.

    python scripts/tools/make_random_checkpoint.py --ckpt_dir checkpoints/random-7b --preset 7b --dtype float16
    python scripts/tools/make_random_checkpoint.py --ckpt_dir /tmp/tiny --preset tiny --num_shards 2
    python scripts/tools/make_random_checkpoint.py --ckpt_dir /tmp/x --dim 256 --n_layers 4 --n_heads 8 --vocab_size 1000

Weights are N(0, 0.02), never zeros, so timings and numerics look like a real model's. The whole
state dict is held in memory in the chosen dtype while it is written (7B in fp16: ~13.5 GB).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.model.presets import PRESETS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(
    ckpt_dir: str,
    preset: Optional[str] = None,
    dim: Optional[int] = None,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    n_kv_heads: Optional[int] = None,
    vocab_size: Optional[int] = None,
    multiple_of: Optional[int] = None,
    ffn_dim_multiplier: Optional[float] = None,
    rope_theta: Optional[float] = None,
    norm_eps: Optional[float] = None,
    num_shards: int = 1,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> None:
    """Write random weights as consolidated.NN.pth + params.json into ckpt_dir (which must not hold a checkpoint).

    Args:
        ckpt_dir: output directory; created, and refused if it already holds params.json or shards.
        preset: tiny | 7b | 13b | 70b (Llama 2 shapes) | llama3.1-8b | llama3.2-1b | llama3.2-3b; the shape
            flags below override its values.
        dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier, rope_theta, norm_eps:
            params.json fields; without a preset, dim/n_layers/n_heads default to ModelArgs' and
            vocab_size is required.
        num_shards: model-parallel shards to split into, as Meta's 13B (2) and 70B (8) downloads are.
        dtype: float16 | bfloat16 | float32 (Meta ships bfloat16).
        seed: seed of the weights; the same seed and shapes give the same file contents.
    """
    params: dict[str, Any] = {}
    if preset is not None:
        key = str(preset).lower()
        if key not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        params.update(PRESETS[key])
    flags = dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, rope_theta=rope_theta, norm_eps=norm_eps,
    )
    params.update({k: v for k, v in flags.items() if v is not None})
    # fire parses "1e6" as a float and "500000" as an int; the dataclass wants floats for these.
    for k in ("ffn_dim_multiplier", "rope_theta", "norm_eps"):
        if params.get(k) is not None:
            params[k] = float(params[k])
    if params.get("vocab_size") is None:
        raise ValueError("Random weights need a vocab size: pass --vocab_size or a --preset.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")

    args = ModelArgs.from_dict(params, source="command-line flags")
    start = time.perf_counter()
    state_dict = random_state_dict(args, seed=seed, dtype=DTYPES[dtype])
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    print(f"generated {len(state_dict)} tensors, {nbytes / 1e9:.3f} GB ({dtype}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    start = time.perf_counter()
    save_checkpoint(state_dict, args, ckpt_dir, num_shards=num_shards)
    print(f"wrote {num_shards} shard(s) and params.json to {ckpt_dir} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    from llama_offload.cli.options import fire_main

    fire_main(main, name=Path(__file__).name)  # one-line errors, and help printed without a pager
