"""A checkpoint directory, read once: the record every stage of a run takes.

``read_checkpoint`` reads ``params.json``, ``llama_offload.json`` and the shard list, and checks them. The
planner, the loader, the draft and the chat format all take the ``CheckpointInfo`` it returns instead of the
directory, so one build opens each file once. A shard is opened (memory-mapped, so only its index is read)
the first time something needs its tensors; the planner's look at its headers and the loader's read share that
one mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta
from llama_offload.model.args import ModelArgs, infer_context_length, read_params

__all__ = ["DROPPED_KEYS", "CheckpointInfo", "as_checkpoint", "context_length", "find_shards", "open_shard",
           "read_checkpoint"]

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
CKPT_LAYOUT = ("A Meta checkpoint directory holds params.json, consolidated.00.pth (.01, ... for sharded models) "
               "and usually tokenizer.model.")
# Keys found in some Meta checkpoints that the model recomputes instead of loading.
DROPPED_KEYS: list[str] = [
    r"^rope\.freqs$",  # Llama 1 saved its RoPE table; setup_caches() builds it from rope_theta
]


def fmt_bytes(n: float) -> str:
    """A file's size as the loader's messages give it (decimal units, as file managers show them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def find_shards(ckpt_dir: str | Path) -> list[Path]:
    """``consolidated.NN.pth`` files of ``ckpt_dir`` in shard order, checked to be 00..N-1 without gaps."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"Checkpoint directory {ckpt_dir} does not exist. {CKPT_LAYOUT}")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"Expected a checkpoint directory at {ckpt_dir}, found a file. {CKPT_LAYOUT}")

    numbered: dict[int, Path] = {}
    for path in ckpt_dir.glob("consolidated.*.pth"):
        m = _SHARD_RE.match(path.name)
        if m is None:
            raise ValueError(
                f"{path} looks like a shard but is not named consolidated.NN.pth with NN a number. "
                "Rename or remove it."
            )
        n = int(m.group(1))
        if n in numbered:
            raise ValueError(
                f"{numbered[n].name} and {path.name} in {ckpt_dir} both claim to be shard {n}. Remove one of them."
            )
        numbered[n] = path
    if not numbered:
        present = sorted(p.name for p in ckpt_dir.iterdir())[:10]
        raise FileNotFoundError(
            f"No consolidated.*.pth shards in {ckpt_dir} (it holds: {present or 'nothing'}). {CKPT_LAYOUT}"
        )
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        names = ", ".join(f"consolidated.{n:02d}.pth" for n in missing)
        raise ValueError(
            f"{ckpt_dir} has shards {sorted(numbered)} but lacks shard(s) {missing} ({names}); "
            "shards must be numbered 00..N-1 without gaps. Re-download the missing files."
        )
    return [numbered[n] for n in sorted(numbered)]


def is_dropped(key: str) -> bool:
    return any(re.match(pattern, key) for pattern in DROPPED_KEYS)


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors, memory-mapped: only the index is read now, the weights when they are used."""
    size = path.stat().st_size
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch.load fails with RuntimeError, EOFError, UnpicklingError, ... on bad files
        raise RuntimeError(
            f"Could not read shard {path} ({fmt_bytes(size)}): {type(e).__name__}: {e}. "
            "The file is truncated, corrupt or not a torch zip checkpoint: re-download or re-convert it."
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise RuntimeError(
            f"Shard {path} ({fmt_bytes(size)}) does not hold a flat dict of tensors, found {type(sd).__name__}. "
            "Meta checkpoints are plain state dicts: re-download or re-convert it."
        )
    return {k: v for k, v in sd.items() if not is_dropped(k)}


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, read once (``read_checkpoint``)."""

    path: Path
    params: dict[str, Any]  # params.json, checked to name the model's shape
    meta: dict[str, Any]  # llama_offload.json; {} for Meta's own downloads
    shards: list[Path]  # consolidated.NN.pth, in shard order
    _opened: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:  # messages name the directory
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def params_path(self) -> Path:
        return self.path / "params.json"

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILENAME

    def model_args(self, **overrides: Any) -> ModelArgs:
        """params.json as ModelArgs, with run sizes (``max_seq_len``, ``max_batch_size``) or a vocabulary set."""
        return ModelArgs.from_dict(self.params, source=str(self.params_path), **overrides)

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index``'s tensors (memory-mapped), opened on first use and shared afterwards. The dict is the
        caller's to read; the loader takes it with ``take_shard`` instead, so the mapping can go once merged."""
        if index not in self._opened:
            self._opened[index] = open_shard(self.shards[index])
        return self._opened[index]

    def take_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard ``index``'s tensors, no longer held here: the loader releases each tensor as it merges it."""
        state_dict = self.shard(index)
        del self._opened[index]
        return dict(state_dict)


def read_checkpoint(ckpt_dir: str | Path) -> CheckpointInfo:
    """Read ``ckpt_dir``'s params.json, llama_offload.json and shard list, checking each; no weight is read."""
    path = Path(ckpt_dir).expanduser()
    shards = find_shards(path)  # a missing directory or shard is reported first, with the layout explained
    return CheckpointInfo(path, read_params(path / "params.json"), read_checkpoint_meta(path), shards)


def as_checkpoint(ckpt: CheckpointInfo | str | Path) -> CheckpointInfo:
    """``ckpt`` itself when it is a record already (a build passes one along), else the directory read now."""
    return ckpt if isinstance(ckpt, CheckpointInfo) else read_checkpoint(ckpt)


def context_length(ckpt: CheckpointInfo, args: ModelArgs) -> tuple[Optional[int], str]:
    """The context length the model was trained for, and where that comes from: a converted checkpoint's
    llama_offload.json (context_length), a ``max_seq_len`` that params.json records, else what its shape
    shows (Llama 2: 4096, Llama 3: 8192, Llama 3.1+: 131072). (None, "") when it is not known."""
    recorded = ckpt.meta.get("context_length")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return recorded, f"{ckpt.meta_path} (context_length)"
    value = ckpt.params.get("max_seq_len")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, f"{ckpt.params_path} (max_seq_len)"
    return infer_context_length(args)
