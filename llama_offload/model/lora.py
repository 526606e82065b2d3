"""LoRA adapters: a low-rank update ``W + (alpha / r) * B @ A`` beside each frozen target matrix.

The base matrices stay where the plan puts them (resident, or paged with their block); the adapter's own
tensors live in one ``LoRAAdapter`` module, resident on the training device with their gradients and the
optimizer state. A ``LoRALinear`` wraps a base linear and holds its ``LoRAPair`` by reference, not as a
submodule, so a block's ``parameters()`` (what the pager copies into pinned pages) never include them.

On disk an adapter is a directory: ``adapter_config.json`` (rank, alpha, targets and the model shape it was
trained on) and ``adapter.safetensors`` (``layers.{i}.{attention|feed_forward}.{name}.lora_A`` (r, in) and
``.lora_B`` (out, r)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llama_offload.model.args import ModelArgs
from llama_offload.model.quant import QuantLinear


FORMAT = "llama_offload-lora"  # adapter_config.json's "format"
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


# The submodule of a TransformerBlock each target matrix belongs to: layers.{i}.{TARGET_OWNERS[t]}.{t}.
TARGET_OWNERS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


def parse_targets(value: str | Sequence[str]) -> tuple[str, ...]:
    """``--lora_targets``: a comma-separated list (or a list fire already parsed) of Meta's matrix names."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora_targets takes matrices of a transformer block, among {','.join(TARGETS)}; found "
                         f"{','.join(unknown) if unknown else 'none'}. For example --lora_targets wq,wv.")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must agree with: the matrices it updates have these sizes."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int

    @classmethod
    def of(cls, params: ModelArgs) -> "ModelShape":
        return cls(params.dim, params.n_layers, params.n_heads, params.kv_heads, params.ffn_hidden_dim)

    def matrix(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a target matrix."""
        head_dim = self.dim // self.n_heads
        return {"wq": (self.n_heads * head_dim, self.dim), "wk": (self.n_kv_heads * head_dim, self.dim),
                "wv": (self.n_kv_heads * head_dim, self.dim), "wo": (self.dim, self.n_heads * head_dim),
                "w1": (self.ffn_hidden_dim, self.dim), "w2": (self.dim, self.ffn_hidden_dim),
                "w3": (self.ffn_hidden_dim, self.dim)}[name]


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    shape: ModelShape

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--lora_rank must be a positive integer, found {self.rank!r}. Typical values: 8 to 64.")
        if not self.alpha > 0:
            raise ValueError(f"--lora_alpha must be positive, found {self.alpha!r}. A common choice is twice the rank.")
        parse_targets(self.targets)
        out_in = [self.shape.matrix(t) for t in self.targets]
        if self.rank > min(min(s) for s in out_in):
            raise ValueError(f"--lora_rank {self.rank} is larger than the smallest target matrix dimension "
                             f"({min(min(s) for s in out_in)}): a low-rank update must have a lower rank. Lower it.")

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "model": asdict(self.shape)}


class LoRAPair(nn.Module):
    """A (r, in) and B (out, r), fp32. B starts at zero, so a new adapter leaves the model unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 device: Optional[torch.device | str] = None):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the two thin GEMMs run in the autocast dtype; without it, in x's dtype.
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return F.linear(F.linear(x, a), b) * self.scale  # (..., out_features)

    def delta(self) -> torch.Tensor:
        """The dense update (out, in) that merging adds to the base weight, in fp32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale


class LoRALinear(nn.Module):
    """A frozen base linear plus its adapter pair: ``base(x) + scale * B(A(x))``."""

    def __init__(self, base: nn.Module, pair: LoRAPair):
        super().__init__()
        self.base = base
        object.__setattr__(self, "pair", pair)  # not a submodule: its tensors must not be paged with the block
        self.in_features, self.out_features = pair.lora_A.shape[1], pair.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.pair(x)


class LoRAAdapter(nn.Module):
    """Every pair of a model, by Meta's names: ``pairs["layers.3.attention.wq"]``."""

    def __init__(self, config: LoRAConfig, device: Optional[torch.device | str] = None):
        super().__init__()
        config.check()
        self.config = config
        self.pairs = nn.ModuleDict()
        for i in range(config.shape.n_layers):
            for t in config.targets:
                out_features, in_features = config.shape.matrix(t)
                self.pairs[_key(i, t)] = LoRAPair(in_features, out_features, config.rank, config.scale, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved form: ``{name}.lora_A`` / ``{name}.lora_B`` with Meta's dotted names."""
        return {f"{pair_name(key)}.{p}": t.detach().float().contiguous().cpu()
                for key, pair in self.pairs.items() for p, t in pair.named_parameters()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = {name: t.shape for name, t in self.tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        wrong = sorted(n for n in expected.keys() & tensors.keys() if tuple(tensors[n].shape) != tuple(expected[n]))
        if missing or extra or wrong:
            what = "; ".join(part for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(extra[:3])}" if extra else "",
                f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])}" if wrong else "",
            ) if part)
            raise ValueError(f"The adapter in {source} does not fit its own adapter_config.json ({what}). "
                             "It is damaged or was edited; train it again or restore it.")
        with torch.no_grad():
            for key, pair in self.pairs.items():
                for p, t in pair.named_parameters():
                    t.copy_(tensors[f"{pair_name(key)}.{p}"])


def _key(layer: int, target: str) -> str:
    # ModuleDict keys may not contain dots.
    return f"layers_{layer}_{TARGET_OWNERS[target]}_{target}"


def pair_name(key: str) -> str:
    """The Meta name of the linear an adapter pair's key adapts: ``layers.3.attention.wq``."""
    _, layer, rest = key.split("_", 2)
    owner, target = rest.rsplit("_", 1)
    return f"layers.{layer}.{owner}.{target}"


def lora_linears(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def pair_layer(key: str) -> int:
    """The block index of an adapter pair's key (``LoRAAdapter.pairs``)."""
    return int(key.split("_")[1])


def attach(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Wrap each target linear of ``model.layers`` in a LoRALinear that adds the adapter's pair. The base
    weights are left as they are (dtype, device, pinned pages); call before the model is offloaded."""
    if any(True for _ in lora_linears(model)):
        raise RuntimeError("This model already has a LoRA adapter attached; attach one adapter per model.")
    check_shape(adapter.config.shape, ModelShape.of(model.params), "the adapter")
    attach_blocks(enumerate(model.layers), adapter)
    for p in model.parameters():
        p.requires_grad_(False)


def attach_blocks(blocks: Iterable[tuple[int, nn.Module]], adapter: LoRAAdapter) -> None:
    """``attach`` for some blocks only, given with their index in the model (a pipeline stage's)."""
    for i, layer in blocks:
        for t in adapter.config.targets:
            owner = getattr(layer, TARGET_OWNERS[t])
            base = getattr(owner, t)
            if not (type(base) is nn.Linear or isinstance(base, QuantLinear)) or getattr(base, "parallel", None):
                raise ValueError("LoRA needs plain or quantized linears in one process; "
                                 f"layers.{i}.{TARGET_OWNERS[t]}.{t} "
                                 f"is {type(base).__name__}. Fine-tune without model parallelism (data parallel "
                                 "ranks each hold the whole model).")
            setattr(owner, t, LoRALinear(base, adapter.pairs[_key(i, t)]))


def lora_cpu_blocks(cpu_blocks: Optional[int]) -> int:
    """The CPU lane with an adapter attached beside quantized matrices: off, since its pairs live on the GPU."""
    if cpu_blocks:
        raise ValueError(f"--cpu_blocks {cpu_blocks} cannot run with a LoRA adapter attached to a quantized "
                         "checkpoint: the adapter stays on the GPU beside the paged blocks. Drop --cpu_blocks, or "
                         "merge the adapter into an unquantized checkpoint (llama-offload merge) and run that.")
    return 0


def check_shape(adapter: ModelShape, model: ModelShape, source: str) -> None:
    if adapter != model:
        diffs = ", ".join(f"{k} {a} (model {b})" for (k, a), b in zip(asdict(adapter).items(), asdict(model).values())
                          if a != b)
        raise ValueError(f"{source} was trained on another model shape: {diffs}. Use it with the checkpoint it "
                         "was trained from, or train one for this checkpoint.")


def merge_into(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Add each pair's update to its base weight in place (16-bit or fp32 weights; rounded once)."""
    check_shape(adapter.config.shape, ModelShape.of(model.params), "the adapter")
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for t in adapter.config.targets:
                linear = getattr(getattr(layer, TARGET_OWNERS[t]), t)
                if type(linear) is not nn.Linear:
                    raise ValueError("Merging a LoRA adapter needs 16-bit or fp32 weights, but "
                                     f"layers.{i}.{TARGET_OWNERS[t]}.{t} "
                                     f"is {type(linear).__name__}. Merge into the unquantized checkpoint "
                                     "(llama-offload merge), then quantize the result.")
                w = linear.weight
                delta = adapter.pairs[_key(i, t)].delta().to(w.device)
                w.copy_((w.float() + delta).to(w.dtype))
