"""Pipeline stages: which layers each stage owns, and a stage built with only its own tensors.

A stage is a slice of the same Transformer, built on the meta device: the embedding on the first stage, blocks
[start, end), the final norm and the output head on the last. Only those tensors are read from the Meta shards
(checkpoint.load.load_state_dict's ``only``; model-parallel shards merged tensor by tensor from their memory maps),
so host and GPU memory per rank scale with the partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from llama_offload.checkpoint.load import load_state_dict
from llama_offload.model.args import ModelArgs, param_counts
from llama_offload.model.transformer import Transformer, precompute_freqs_cis


def parse_pp_layers(text: Any, n_layers: int, stages: int) -> list[int]:
    """``--pp_layers 10,11,11``: layers per stage, checked against the model and --pp. (fire hands a comma list
    over as a tuple.)"""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(x) for x in text)
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--pp_layers must be comma-separated whole numbers (layers per stage), found {text!r}.") from None
    if len(counts) != stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise ValueError(f"--pp_layers {text} must give {stages} stages (--pp {stages}) of at least one layer each, "
                         f"adding up to the model's {n_layers} layers; found {len(counts)} stages adding up to "
                         f"{sum(counts)}. For example --pp_layers {','.join(map(str, balanced_counts(n_layers, stages)))}.")
    return counts


def balanced_counts(n_layers: int, stages: int, *, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Layers per stage minimising the largest stage's cost, where a block costs 1 and the first and last stages
    carry ``first_extra`` and ``last_extra`` more (the embedding's and the head's work, in blocks): an exact
    search over contiguous splits (stages x layers^2 steps), the most even split among equals."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"--pp {stages}: a model of {n_layers} layers splits into 1 to {n_layers} stages.")

    def extra(s: int) -> float:
        return (first_extra if s == 0 else 0.0) + (last_extra if s == stages - 1 else 0.0)

    # best[s][i]: (largest cost, sum of squared costs) of splitting the first i layers into s + 1 stages
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n_layers + 1) for _ in range(stages)]
    cut = [[0] * (n_layers + 1) for _ in range(stages)]
    for i in range(1, n_layers + 1):
        c = i + extra(0)
        best[0][i] = (c, c * c)
    for s in range(1, stages):
        for i in range(s + 1, n_layers + 1):
            for j in range(s, i):
                c = (i - j) + extra(s)
                prev = best[s - 1][j]
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][i]:
                    best[s][i], cut[s][i] = cand, j
    counts, i = [], n_layers
    for s in range(stages - 1, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    counts.append(i)
    return counts[::-1]


def stage_layers(params: ModelArgs, stages: int, pp_layers: Optional[str] = None) -> list[tuple[int, int]]:
    """[start, end) of each stage's blocks: by hand (``--pp_layers``) or balanced by compute, the embedding
    counting little and the output head (a vocabulary x dim matrix on every token) as its share of a block."""
    n = params.n_layers
    if stages > n:
        raise ValueError(f"--pp {stages} asks for more pipeline stages than the model's {n} layers. Use --pp {n} "
                         "or fewer.")
    if pp_layers:
        counts = parse_pp_layers(pp_layers, n, stages)
    else:
        per_block = param_counts(params)["per_block"]
        counts = balanced_counts(n, stages, first_extra=0.0, last_extra=params.vocab_size * params.dim / per_block)
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def stage_keys(params: ModelArgs, start: int, end: int, first: bool, last: bool) -> list[str]:
    """The Meta names of the tensors a stage holds."""
    with torch.device("meta"):
        names = list(Transformer(params, model_parallel_size=1).state_dict())
    return [k for k in names if _owned(k, start, end, first, last)]


def _owned(key: str, start: int, end: int, first: bool, last: bool) -> bool:
    if key.startswith("layers."):
        return start <= int(key.split(".")[1]) < end
    if key.startswith("tok_embeddings."):
        return first
    return last  # norm, output


class StageModule(nn.Module):
    """One pipeline stage: (first) tokens -> embedding; blocks [start, end), each checkpointed (recomputed in the
    backward pass); (last) the final norm. The last stage's output is the normed hidden state: the loss multiplies
    it by ``output.weight`` a chunk of tokens at a time (loss.py), so the full logits never exist."""

    def __init__(self, model: Transformer, start: int, end: int, first: bool, last: bool, seq_len: int,
                 checkpoint_blocks: bool = True):
        super().__init__()
        self.first, self.last, self.start, self.checkpoint_blocks = first, last, start, checkpoint_blocks
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, end)})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        p = model.params
        self.register_buffer("freqs_cis", precompute_freqs_cis(p.head_dim, seq_len, p.rope_theta,
                                                               use_scaled=p.use_scaled_rope), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.first else x  # (mb, seqlen, dim)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers.values():
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer.forward_causal, h, freqs, use_reentrant=False)
            else:
                h = layer.forward_causal(h, freqs)
        return self.norm(h) if self.last else h


@dataclass
class LoadedStage:
    module: StageModule
    keys: list[str]  # the Meta names this stage read from the checkpoint
    nbytes: int  # their bytes


def build_stage(ckpt_dir: Path, params: ModelArgs, start: int, end: int, first: bool, last: bool, *,
                seq_len: int, dtype: torch.dtype, show_progress: bool = False) -> LoadedStage:
    """The stage's modules on the meta device, then only its tensors loaded into them (``assign``)."""
    keys = set(stage_keys(params, start, end, first, last))
    sd = load_state_dict(ckpt_dir, params, show_progress=show_progress, only=keys.__contains__)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = Transformer(params, model_parallel_size=1)
    model.load_state_dict(sd, assign=True, strict=False)
    module = StageModule(model, start, end, first, last, seq_len)
    left = [n for n, t in module.named_parameters() if t.device.type == "meta"]
    assert not left, f"stage [{start}, {end}) has tensors that were not loaded: {left[:4]}"
    module.requires_grad_(False)
    return LoadedStage(module, sorted(sd), sum(t.numel() * t.element_size() for t in sd.values()))
