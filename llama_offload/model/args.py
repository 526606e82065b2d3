"""Model hyper-parameters, read from Meta's ``params.json`` and checked before anything is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: plain multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1+: stretch the low RoPE frequencies for long contexts

    # Not in params.json: chosen at run time, they size the KV cache and the RoPE table.
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, found {value!r}.")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                "every head needs the same width. Check params.json."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} is odd; rotary embeddings pair up channels, "
                "so it must be even. Check params.json."
            )
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads}); grouped-query "
                "attention shares each key/value head among a whole number of query heads. Check params.json."
            )
        if self.vocab_size != -1 and self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, or -1 to take it from the tokenizer; found {self.vocab_size}.")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"use_scaled_rope must be true or false, found {self.use_scaled_rope!r}.")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"norm_eps and rope_theta must be positive; found {self.norm_eps} and {self.rope_theta}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's rule: 2/3 of 4*dim, scaled, then rounded up to a multiple of `multiple_of`.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, source: str = "params", **overrides: Any) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{source} has keys this version does not understand: {unknown}. Known keys: {sorted(known)}. "
                "If the checkpoint needs a feature that is not supported yet, it cannot be run correctly; "
                "otherwise remove the keys."
            )
        for name, value in params.items():
            kinds = _FIELD_TYPES[name]
            if value is None and type(None) in kinds:
                continue
            if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
                wanted = " or ".join("null" if k is type(None) else {"int": "a whole number", "float": "a number",
                                                                      "bool": "true or false"}[k.__name__]
                                     for k in kinds if not (k is int and float in kinds))
                raise ValueError(f"{source}: {name} must be {wanted}, found {value!r}. Restore params.json from the "
                                 "original download.")
        try:
            return cls(**{**params, **overrides})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        return cls.from_dict(read_params(path), source=str(path), **overrides)

    def to_params(self) -> dict[str, Any]:
        """The params.json form: everything except the run-time sizes."""
        d = dataclasses.asdict(self)
        del d["max_batch_size"], d["max_seq_len"]
        return d


# The keys that fix the model's shape: a params.json without one of them is refused, not given a default.
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of")
# What a params.json value may be, per field (a bool is not taken for a number, nor a number for a bool).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **{k: (int,) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_batch_size", "max_seq_len")},
    "n_kv_heads": (int, type(None)), "ffn_dim_multiplier": (int, float, type(None)),
    "norm_eps": (int, float), "rope_theta": (int, float), "use_scaled_rope": (bool,),
}

# Meta's Llama 2 shapes (7B, 13B, 70B): params.json records no context length, but these are Llama 2's.
_LLAMA2_DIMS = (4096, 5120, 8192)


def infer_context_length(args: ModelArgs) -> tuple[Optional[int], str]:
    """The context length a Meta checkpoint was trained for, where its params.json shows which family it is:
    (length, why), or (None, "") when it cannot be told. params.json never records the length itself."""
    if args.use_scaled_rope:
        return 131072, "Llama 3.1+ (use_scaled_rope)"
    if args.rope_theta == 500000.0 and args.vocab_size == 128256:
        return 8192, "Llama 3 (rope_theta 500000, vocab 128256)"
    if (args.rope_theta == 10000.0 and args.norm_eps == 1e-5 and args.vocab_size in (-1, 32000)
            and args.dim in _LLAMA2_DIMS and args.multiple_of in (256, 4096)):
        return 4096, "Llama 2 (its params.json shape)"
    return None, ""


def read_params(path: str | Path) -> dict[str, Any]:
    """A params.json as a dict, checked to be JSON and to name the model's shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the model's params.json at {path}, found nothing. "
            "A Meta checkpoint directory holds params.json, consolidated.NN.pth and tokenizer.model."
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Restore it from the original download.") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} should hold a JSON object of model parameters, found {type(params).__name__}.")
    # Without these the defaults (Llama 2 7B's) would describe another model, and the shards' sizes get the blame.
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: every Meta params.json records "
                         f"{', '.join(REQUIRED_PARAMS)}. Restore it from the original download (or re-run the "
                         "conversion that wrote it).")
    return params


def param_counts(args: ModelArgs, *, tied: bool = False) -> dict[str, int]:
    """Parameters per part of the model, from the shapes alone (the bytes come from ``plan_offload``).

    ``tied``: the output head is the token embedding (SmolLM2's tie_word_embeddings). ``total`` then counts
    that matrix once, as the model's own parameter count does, while ``held`` still counts both copies: the
    checkpoint stores the head as a matrix of its own, and that is what is loaded and takes memory.
    Without ``tied`` the two are equal.
    """
    if args.vocab_size <= 0:
        raise ValueError("Counting parameters needs the real vocab_size; fill params.json's -1 from the tokenizer.")
    dim, hidden = args.dim, args.ffn_hidden_dim
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    per_block = (
        dim * q_out + 2 * dim * kv_out + q_out * dim  # wq, wk + wv, wo
        + 3 * dim * hidden  # w1, w2, w3
        + 2 * dim  # attention_norm, ffn_norm
    )
    resident = args.vocab_size * dim + dim + dim * args.vocab_size  # tok_embeddings, norm, output
    blocks = args.n_layers * per_block
    held = blocks + resident
    total = held - args.vocab_size * dim if tied else held
    return dict(per_block=per_block, blocks=blocks, resident=resident, total=total, held=held)
