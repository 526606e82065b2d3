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

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..args import ModelArgs
from ..quant import QuantLinear

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_OWNER = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
          "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.pt"
FORMAT = "llama_offload-lora"


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
        return {f"{_name(key)}.{p}": t.detach().float().contiguous().cpu()
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
                    t.copy_(tensors[f"{_name(key)}.{p}"])


def _key(layer: int, target: str) -> str:
    # ModuleDict keys may not contain dots.
    return f"layers_{layer}_{_OWNER[target]}_{target}"


def _name(key: str) -> str:
    _, layer, rest = key.split("_", 2)
    owner, target = rest.rsplit("_", 1)
    return f"layers.{layer}.{owner}.{target}"


def lora_linears(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def attach(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Wrap each target linear of ``model.layers`` in a LoRALinear that adds the adapter's pair. The base
    weights are left as they are (dtype, device, pinned pages); call before the model is offloaded."""
    if any(True for _ in lora_linears(model)):
        raise RuntimeError("This model already has a LoRA adapter attached; attach one adapter per model.")
    check_shape(adapter.config.shape, ModelShape.of(model.params), "the adapter")
    for i, layer in enumerate(model.layers):
        for t in adapter.config.targets:
            owner = getattr(layer, _OWNER[t])
            base = getattr(owner, t)
            if not (type(base) is nn.Linear or isinstance(base, QuantLinear)) or getattr(base, "parallel", None):
                raise ValueError(f"LoRA needs plain or quantized linears in one process; layers.{i}.{_OWNER[t]}.{t} "
                                 f"is {type(base).__name__}. Fine-tune without model parallelism (data parallel "
                                 "ranks each hold the whole model).")
            setattr(owner, t, LoRALinear(base, adapter.pairs[_key(i, t)]))
    for p in model.parameters():
        p.requires_grad_(False)


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
                linear = getattr(getattr(layer, _OWNER[t]), t)
                if type(linear) is not nn.Linear:
                    raise ValueError(f"Merging a LoRA adapter needs 16-bit or fp32 weights, but layers.{i}.{_OWNER[t]}.{t} "
                                     f"is {type(linear).__name__}. Merge into the unquantized checkpoint "
                                     "(llama-offload merge), then quantize the result.")
                w = linear.weight
                delta = adapter.pairs[_key(i, t)].delta().to(w.device)
                w.copy_((w.float() + delta).to(w.dtype))


class SaveError(OSError):
    """A save that could not be written (a full disk, a read-only directory): one line, nothing left behind.
    ``errno`` is the cause's; the message is the whole text (no "[Errno N]" in front)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


def _file_mode() -> int:
    # safetensors writes its file 0600; everything else this tool writes follows the umask (0644 under 022).
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_bytes(config: LoRAConfig, *, with_state: bool = True) -> int:
    """About the bytes one save writes: adapter.safetensors (fp32 A and B), and with ``with_state`` the trainer
    state beside it (the adapter again plus AdamW's two fp32 moments); a little over, for headers and history."""
    params = sum(config.rank * (o + i) for o, i in (config.shape.matrix(t) for t in config.targets))
    params *= config.shape.n_layers
    pairs = config.shape.n_layers * len(config.targets)
    per_file = 4 * params + 256 * pairs + 4096  # fp32 tensors, a header entry per tensor
    return per_file + ((3 * 4 * params + 1024 * pairs + (1 << 20)) if with_state else 0)


def save_adapter(adapter: LoRAAdapter, out_dir: str | Path, state: Optional[dict] = None) -> Path:
    """Write the adapter directory atomically: a temporary sibling renamed into place, replacing an older save.
    ``state`` (optimizer, step, loss history) goes beside it as STATE_FILE, so that a run can resume.

    The temporary directory is ``cleanup.new_temp_dir``'s (``.NAME.partial-HOST-PID-X``): removed when the write
    fails or is interrupted, and by the next run when a hard kill left it. A write that fails (a full disk) raises
    :class:`SaveError` with what to do; the previous save in ``out_dir`` is then untouched."""
    from safetensors.torch import save_file

    from ..cleanup import deferred_signals, new_temp_dir, remove_tree

    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(out.parent, out.name, "partial")
    except OSError as e:
        raise SaveError(e.errno, f"Could not save the adapter: cannot write in {out.parent} ({e.strerror or e}). "
                        "Make it writable, or choose another --out.") from None
    try:
        try:
            save_file(adapter.tensors(), str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")
            if state is not None:
                torch.save(state, tmp / STATE_FILE)
            mode = _file_mode()
            for f in tmp.iterdir():
                f.chmod(mode)
        except Exception as e:  # safetensors and torch.save wrap the OSError in errors of their own
            raise _save_error(e, out, adapter.config, state is not None) from None
        with deferred_signals():  # the swap is whole: a signal waits until the new save is in place
            # The previous save waits in .NAME.old-HOST-PID-X/NAME (as a conversion's does): a hard kill here
            # leaves it for the next run to put back (cleanup.remove_stale), never to delete.
            old = new_temp_dir(out.parent, out.name, "old") if out.exists() else None
            if old is not None:
                out.rename(old / out.name)
            try:
                tmp.rename(out)
            except BaseException:
                if old is not None:
                    (old / out.name).rename(out)
                raise
            finally:
                if old is not None:
                    remove_tree(old)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return out


def _save_error(e: BaseException, out: Path, config: LoRAConfig, with_state: bool) -> SaveError:
    import errno as errnos

    code = getattr(e, "errno", None)
    text = str(e)
    full = code in (errnos.ENOSPC, errnos.EDQUOT) or "No space left" in text or "Disk quota" in text
    need = save_bytes(config, with_state=with_state)
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = None
    found = f"; {free / 2**20:.1f} MiB free now" if free is not None else ""
    if full:
        return SaveError(code or errnos.ENOSPC, f"Could not save the adapter to {out}: the disk is full (a save "
                         f"needs about {need / 2**20:.1f} MiB{found}). The previous save there, if any, is unchanged "
                         "and nothing partial was left; free some space and continue with --resume.")
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return SaveError(code or errnos.EIO, f"Could not save the adapter to {out} ({reason}). The previous save there, "
                     "if any, is unchanged and nothing partial was left; fix the cause and continue with --resume.")


def read_config(adapter_dir: str | Path) -> LoRAConfig:
    """The adapter's config, checked, before any tensor is read."""
    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"LoRA adapter directory {d} does not exist. Pass the --out directory that "
                                "llama-offload finetune wrote.")
    path = d / CONFIG_FILE
    if not path.is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a LoRA adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it, as "
                                "llama-offload finetune writes them.")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        config = LoRAConfig(int(raw["rank"]), float(raw["alpha"]), parse_targets(raw["targets"]),
                            ModelShape(**{k: int(v) for k, v in raw["model"].items()}))
        bad = {k: v for k, v in asdict(config.shape).items() if v < 1}
        if bad:
            raise ValueError(f"its model shape has sizes below 1: {bad}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a llama_offload LoRA config ({e}). Point --lora at a directory written "
                         "by llama-offload finetune.") from None
    config.check()
    check_weights_file(d / WEIGHTS_FILE, config)
    return config


def check_weights_file(path: Path, config: LoRAConfig) -> None:
    """``adapter.safetensors`` whole and fitting ``config``, from its header alone (no tensor is read): its
    header parses, its tensors are the ones the config implies with their shapes, and the file is as long as
    the header says. A truncated or damaged file is refused here, before any model weight is read."""
    size = path.stat().st_size
    what = None
    header: Any = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if len(head) < 8:
                what = f"it is {size} bytes long, too short to hold even a safetensors header"
            elif n < 2 or n > min(size - 8, 100 << 20):
                what = f"its header length field says {n} bytes, but the file has {size}"
            else:
                header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        what = f"its header is not valid JSON ({e})"
    if what is None and not isinstance(header, dict):
        what = "its header is not a JSON object"
    expected = {}
    if what is None:
        for i in range(config.shape.n_layers):
            for t in config.targets:
                out_features, in_features = config.shape.matrix(t)
                name = f"layers.{i}.{_OWNER[t]}.{t}"
                expected[f"{name}.lora_A"] = [config.rank, in_features]
                expected[f"{name}.lora_B"] = [out_features, config.rank]
        found = {k: v for k, v in header.items() if k != "__metadata__"}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        try:
            wrong = sorted(k for k in expected.keys() & found.keys() if list(found[k]["shape"]) != expected[k])
            end = max((int(v["data_offsets"][1]) for v in found.values()), default=0)
        except (TypeError, KeyError, IndexError, ValueError):
            what = "its header does not describe tensors"
        else:
            if missing or extra or wrong:
                what = "; ".join(part for part in (
                    f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(extra[:3])}" if extra else "",
                    f"{wrong[0]} is {tuple(found[wrong[0]]['shape'])}, expected {tuple(expected[wrong[0]])}"
                    if wrong else "") if part)
                what = f"it does not fit its adapter_config.json ({what})"
            elif 8 + n + end != size:
                what = (f"it is {size} bytes long, but its header describes {8 + n + end}: it is truncated"
                        if size < 8 + n + end else f"it is {size} bytes long, {size - 8 - n - end} more than its header "
                        "describes")
    if what is not None:
        raise ValueError(f"LoRA adapter file {path} is damaged: {what}. Copy it again from where it was trained, or "
                         "train the adapter again (llama-offload finetune).")


def load_adapter(adapter_dir: str | Path, device: Optional[torch.device | str] = None) -> LoRAAdapter:
    from safetensors.torch import load_file

    config = read_config(adapter_dir)  # the weights file's header too: a damaged file is refused here
    adapter = LoRAAdapter(config, device)
    path = Path(adapter_dir).expanduser() / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a file it cannot read
        raise ValueError(f"LoRA adapter file {path} could not be read ({type(e).__name__}: {e}). Copy it again, or "
                         "train the adapter again.") from None
    adapter.load_tensors(tensors, str(adapter_dir))
    return adapter
