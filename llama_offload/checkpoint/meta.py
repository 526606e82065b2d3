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

import json
import time
from pathlib import Path
from typing import Any, Optional

from llama_offload.files.cleanup import is_temp_dir_name



META_FILENAME = "llama_offload.json"


META_VERSION = 2


# Version 2 adds the "quantization" record. Only quantized checkpoints are written as 2, so that a reader from
# before quantization refuses them with its format_version message instead of misreading their int8 bytes,
# while every other checkpoint stays readable by it.
QUANTIZED_META_VERSION = 2


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
    where = Path(str(path))
    if is_temp_dir_name(where.parent.name):  # a download made for the conversion (earlier versions recorded it)
        return f"{fmt} {name}{title}, downloaded for the conversion and not kept"
    if not where.exists():
        return f"{fmt} {name}{title}, from {where} (no longer there)"
    return f"{fmt} {where}{title}"


def write_derived_meta(out_dir: Path, meta: dict[str, Any], *, source_dir: Path, num_shards: int, dtype: str,
                       tokenizer: str, **extra: Any) -> dict[str, Any]:
    """llama_offload.json of a checkpoint made from another (quantized, or an adapter merged in): the input's own
    records are carried over, its source is recorded as a Meta checkpoint (with what that was converted from), and
    ``extra`` (the quantization, the merged adapters) is added."""
    carried = {k: v for k, v in meta.items()
               if k not in ("format_version", "chat_format", "tokenizer", "source", "converted_at", *extra)}
    source: dict[str, Any] = {"format": "meta", "path": str(source_dir.resolve()), "num_shards": num_shards,
                              "dtype": dtype}
    if meta.get("source"):
        source["converted_from"] = meta["source"]
    carried.setdefault("dtype", dtype)  # what the 16-bit parts (norms, ...) are stored in
    return write_checkpoint_meta(out_dir, chat_format=meta.get("chat_format"), tokenizer=tokenizer, source=source,
                                 **carried, **extra)
