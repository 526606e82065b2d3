"""What the converters (GGUF, Hugging Face) share: Meta's feed-forward size rule and the chat format a template implements."""

from __future__ import annotations

from typing import Any, Optional

import torch

from llama_offload.model.args import ModelArgs


def detect_chat_format(chat_template: Optional[str]) -> Optional[str]:
    """The chat format a Jinja chat template implements, by its markers; None when none is recognised."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "[INST]" in chat_template:
        return "llama2"
    return None


def ffn_params(dim: int, hidden_dim: int) -> dict[str, Any]:
    """``multiple_of`` and ``ffn_dim_multiplier`` for which ``ModelArgs.ffn_hidden_dim`` is ``hidden_dim``.

    Meta's rule only rounds up, so a plain ``multiple_of`` works when the file's size is the rounded
    2/3 * 4 * dim; otherwise a multiplier brings it there. Meta's usual 256 is preferred; the result is
    checked against ModelArgs itself, so it can never disagree with what the model builds.
    """
    base = int(2 * (4 * dim) / 3)
    multiples = [256] + [m for m in (4096, 2048, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1) if hidden_dim % m == 0]
    multipliers: list[Optional[float]] = [None]
    if base > 0:
        exact = hidden_dim / base
        # int(m * base) truncates; a hair above the exact ratio survives float rounding.
        multipliers += [exact, float(torch.nextafter(torch.tensor(exact, dtype=torch.float64),
                                                     torch.tensor(2 * exact, dtype=torch.float64)))]
    for mult in multipliers:
        for m in multiples:
            if hidden_dim % m:
                continue
            # n_heads=2 only makes a valid ModelArgs; the feed-forward size depends on dim alone.
            args = ModelArgs(dim=dim, n_heads=2, multiple_of=m, ffn_dim_multiplier=mult, n_layers=1)
            if args.ffn_hidden_dim == hidden_dim:
                return {"multiple_of": m, "ffn_dim_multiplier": mult}
    raise ValueError(f"Cannot express a feed-forward size of {hidden_dim} for dim {dim} with Meta's "
                     "multiple_of / ffn_dim_multiplier rule.")
