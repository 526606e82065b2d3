"""Where a new checkpoint directory goes: its place checked before any work (writable, room on the disk, not
the source), written into a temporary sibling, and renamed into place only when complete. An existing non-empty
directory is replaced only with ``force=True``, only when it holds a checkpoint this package wrote, and only
after the new one is complete; an interrupted write leaves nothing behind (cleanup.py)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional


from llama_offload.checkpoint.meta import META_FILENAME
from llama_offload.files.cleanup import deferred_signals, interruptible, new_temp_dir, remove_tree


def is_inside(path: Path, parent: Path) -> bool:
    """Whether ``path`` (resolved) is ``parent`` (resolved) or lies under it."""
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# What a checkpoint written by a conversion holds: --force replaces a directory holding nothing else.
_OWN_FILES = {META_FILENAME, "params.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json"}


_OWN_SHARD = re.compile(r"consolidated\.\d+\.pth")
# A fully fine-tuned checkpoint keeps its optimizer state beside it (checkpoint/trained.py).
_OWN_STATE = re.compile(r"trainer_state(\.rank\d+|\.stage\d+)?\.pt")


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
    foreign = [n for n in names if n not in _OWN_FILES and not _OWN_SHARD.fullmatch(n) and not _OWN_STATE.fullmatch(n)]
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
        if is_inside(Path(src), out_dir):
            raise ValueError(
                f"{src} lies inside the output directory {out_dir}, which --force would delete. "
                "Choose an output directory that does not hold the model being converted."
            )


def existing_ancestor(out_dir: Path) -> Path:
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
    where = existing_ancestor(out_dir)
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
    where = existing_ancestor(out_dir)
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
