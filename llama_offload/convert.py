"""What every converter (GGUF, Hugging Face) shares: where the result goes and what it records.

A conversion writes a complete checkpoint directory (``params.json``, ``consolidated.00.pth``, the
tokenizer and ``llama_offload.json``) into a temporary sibling of the output directory and renames it
into place only when everything is written, so an interrupted conversion never leaves a directory that
looks complete; a kill leaves nothing behind either (cleanup.py). The output's place is checked before
any work (writable, room on the disk). An existing non-empty output directory is only replaced with
``force=True``, only when it holds a checkpoint a conversion wrote, and only after the new one is complete.

``llama_offload.json`` records what a Meta checkpoint does not say: which chat format the model was
tuned on and which tokenizer file to use. :func:`read_checkpoint_meta` reads it back for generation
and the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from .args import ModelArgs
from .cleanup import deferred_signals, interruptible, new_temp_dir, remove_tree

__all__ = [
    "DTYPES",
    "META_FILENAME",
    "check_free_space",
    "check_out_dir",
    "detect_chat_format",
    "dtype_name",
    "ffn_params",
    "output_dir",
    "parse_dtype",
    "read_checkpoint_meta",
    "write_checkpoint_meta",
]

META_FILENAME = "llama_offload.json"
META_VERSION = 2
# Version 2 adds the "quantization" record. Only quantized checkpoints are written as 2, so that a reader from
# before quantization refuses them with its format_version message instead of misreading their int8 bytes,
# while every other checkpoint stays readable by it.
QUANTIZED_META_VERSION = 2

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A dtype given by name (``bf16``, ``float16``, ...) or as a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: expected bfloat16, float16 or float32 (or bf16, fp16, fp32).")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# What a checkpoint written by a conversion holds: --force replaces a directory holding nothing else.
_OWN_FILES = {META_FILENAME, "params.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json"}
_OWN_SHARD = re.compile(r"consolidated\.\d+\.pth")


def _fmt_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _check_existing(out_dir: Path, *, force: bool, sources: Iterable[str | Path]) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is a file; the output of a conversion is a directory. "
                              "Choose another --out.")
    if not out_dir.is_dir():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in _OWN_FILES and not _OWN_SHARD.fullmatch(n)]
    ours = META_FILENAME in names
    if not ours or foreign:
        what = (f"holds files a conversion does not write ({', '.join(foreign[:8])}"
                f"{f' and {len(foreign) - 8} more' if len(foreign) > 8 else ''})" if foreign
                else f"holds no {META_FILENAME}, so it is not a checkpoint written by llama_offload")
        raise FileExistsError(
            f"{out_dir} is not empty and {what}; refusing to write into it"
            f"{' even with --force, which only replaces a checkpoint this tool wrote' if force else ''}. "
            "Nothing was changed. Choose another --out (a new or empty directory)."
        )
    if not force:
        raise FileExistsError(
            f"{out_dir} already holds a converted checkpoint; refusing to overwrite it. "
            "Pass --force (force=True) to replace it, or choose another output directory."
        )
    for src in sources:
        if _is_inside(Path(src), out_dir):
            raise ValueError(
                f"{src} lies inside the output directory {out_dir}, which --force would delete. "
                "Choose an output directory that does not hold the model being converted."
            )


def _existing_ancestor(out_dir: Path) -> Path:
    """The directory the conversion writes in (out_dir's parent), or its nearest ancestor that exists."""
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"Cannot create {out_dir}: {parent} is a file, not a directory. Choose another --out.")
    return parent


def check_free_space(out_dir: str | Path, needed_bytes: Optional[int]) -> None:
    """Refuse when the disk ``out_dir`` goes to has less room than ``needed_bytes`` (plus a margin)."""
    if not needed_bytes:
        return
    out_dir = Path(out_dir).expanduser()
    where = _existing_ancestor(out_dir)
    free = shutil.disk_usage(where).free
    need = int(needed_bytes * 1.02) + (16 << 20)
    if free < need:
        raise OSError(f"Not enough free disk space for {out_dir}: the checkpoint needs about {_fmt_size(need)}, "
                      f"and the disk of {where} has {_fmt_size(free)} free. Free some space, or choose an --out on "
                      "another disk (or a smaller --dtype).")


def check_out_dir(out_dir: str | Path, *, force: bool, sources: Iterable[str | Path] = (),
                  needed_bytes: Optional[int] = None) -> Path:
    """Refuse an output directory that a conversion must not write, before any work is done.

    - a non-empty ``out_dir`` is replaced only with ``force``, and only when it holds a checkpoint written by
      a conversion (``llama_offload.json`` and the files conversions write, nothing else): nothing a user put
      there is ever deleted;
    - ``sources`` (the files being converted) must not lie inside a directory ``force`` would delete;
    - the place it goes must be writable (tried with a directory made and removed at once), and, when
      ``needed_bytes`` is given, its disk must have that much room.
    """
    sources = list(sources)
    out_dir = Path(out_dir).expanduser()
    _check_existing(out_dir, force=force, sources=sources)
    where = _existing_ancestor(out_dir)
    try:
        remove_tree(new_temp_dir(where, out_dir.name))
    except OSError as e:
        reason = e.strerror or str(e)
        raise PermissionError(
            f"Cannot write {out_dir}: {where} is not writable ({reason}). Choose an --out in a directory you "
            "can write to."
        ) from None
    check_free_space(out_dir, needed_bytes)
    return out_dir


@contextlib.contextmanager
def output_dir(out_dir: str | Path, *, force: bool, sources: Iterable[str | Path] = (),
               needed_bytes: Optional[int] = None) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without error, it becomes ``out_dir``.

    On error, Ctrl-C or SIGTERM the temporary directory is removed and ``out_dir`` is left as it was (see
    cleanup.py; a SIGKILLed run's leftover is removed by the next run). With ``force`` an existing
    ``out_dir`` (a converted checkpoint) is moved aside first and deleted once the new one is in place.
    """
    sources = list(sources)
    out_dir = check_out_dir(out_dir, force=force, sources=sources, needed_bytes=needed_bytes)
    with interruptible():
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"Cannot create {out_dir.parent} ({e.strerror or e}). Choose another --out.") from None
        # A sibling, so the final rename stays within one file system and is atomic.
        tmp = new_temp_dir(out_dir.parent, out_dir.name)
        try:
            yield tmp
            # Tests stop a conversion here, with its files written but not published, at a known moment.
            time.sleep(float(os.environ.get("LLAMA_OFFLOAD_PAUSE_BEFORE_PUBLISH", "0")))
            with deferred_signals():
                _publish(tmp, out_dir, force=force, sources=sources)
        finally:
            remove_tree(tmp)  # gone already after a successful publish


def _publish(tmp: Path, out_dir: Path, *, force: bool, sources: list) -> None:
    # Checked again: something may have appeared in out_dir while we converted.
    _check_existing(out_dir, force=force, sources=sources)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = new_temp_dir(out_dir.parent, out_dir.name, "old")
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / out_dir.name, out_dir)  # put the old checkpoint back
        remove_tree(old)
        raise
    remove_tree(old)


def write_checkpoint_meta(ckpt_dir: str | Path, *, chat_format: Optional[str], tokenizer: str,
                          source: dict[str, Any], **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format_version": QUANTIZED_META_VERSION if extra.get("quantization") else 1,
        "chat_format": chat_format,
        "tokenizer": tokenizer,
        "source": source,
        **extra,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (Path(ckpt_dir) / META_FILENAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``llama_offload.json`` of a checkpoint directory as a dict; ``{}`` when there is none.

    Keys: ``chat_format`` (a name in ``CHAT_FORMATS``, or None when the conversion found no known chat
    template), ``tokenizer`` (file name inside ``ckpt_dir``), ``source`` (what was converted), and
    informational extras such as ``dtype``, ``context_length`` and ``add_bos``. Meta's own downloads
    have no such file: callers fall back to their defaults (``tokenizer.model``, ``llama2``).
    """
    path = Path(ckpt_dir) / META_FILENAME
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Re-run the conversion, or delete the file to use "
                         "the defaults (tokenizer.model, llama2 chat format).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(meta).__name__}. Re-run the conversion.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > META_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this version of llama_offload reads up to "
                         f"{META_VERSION}. Upgrade llama_offload or re-run the conversion with this one.")
    chat_format = meta.get("chat_format")
    if chat_format is not None and not isinstance(chat_format, str):
        raise ValueError(f"{path}: chat_format must be a name or null, found {chat_format!r}.")
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, str) or Path(tokenizer).name != tokenizer:
            raise ValueError(f"{path}: tokenizer must be a file name inside {ckpt_dir}, found {tokenizer!r}.")
        if not (Path(ckpt_dir) / tokenizer).is_file():
            raise FileNotFoundError(f"{path} names the tokenizer {tokenizer}, but {Path(ckpt_dir) / tokenizer} "
                                    "does not exist. Re-run the conversion.")
    return meta


def describe_source(source: Any) -> str:
    """What a checkpoint was converted from, as ``info`` shows it: only what is true now. A GGUF downloaded for the
    conversion (the default model's) is named by its file and origin, not by the temporary path it had; a recorded
    path that no longer exists is said to be gone."""
    if not isinstance(source, dict):
        return str(source) if source else "?"
    fmt = {"gguf": "GGUF", "huggingface": "Hugging Face", "meta": "the Meta checkpoint"}.get(str(source.get("format")), str(source.get("format", "?")))
    path = source.get("path")
    name = source.get("file") or (Path(str(path)).name if path else None)
    title = f", {source['name']!r}" if isinstance(source.get("name"), str) and source["name"] else ""
    if source.get("origin"):
        kept = "" if source.get("kept", True) else "; the download was not kept"
        return f"{fmt} {name} from {source['origin']}{title}{kept}"
    if not path:
        return f"{fmt} {name or '?'}{title}"
    from .cleanup import is_temp_dir_name

    where = Path(str(path))
    if is_temp_dir_name(where.parent.name):  # a download made for the conversion (earlier versions recorded it)
        return f"{fmt} {name}{title}, downloaded for the conversion and not kept"
    if not where.exists():
        return f"{fmt} {name}{title}, from {where} (no longer there)"
    return f"{fmt} {where}{title}"


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
