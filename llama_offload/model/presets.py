"""Meta's published Llama shapes (the fields of their ``params.json``), by name, for random-weight checkpoints.

``scripts/tools/make_random_checkpoint.py --preset NAME`` writes one, and the benchmarks under ``scripts/bench/``
build their 7B/13B/70B-shaped models from the same table, so a shape is spelled once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

# Llama 2 shapes (Meta's params.json), with the vocab size of its tokenizer filled in.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, rope_theta=1e6),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    # Llama 3.x (params.json as Meta ships them): 128256-token vocabulary, theta 5e5, scaled RoPE from 3.1 on.
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.0, rope_theta=500000.0, use_scaled_rope=True),
}
