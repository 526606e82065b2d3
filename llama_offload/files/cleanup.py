"""Kills leave no debris: temporary directories named after their owner, and SIGTERM handled like Ctrl-C.

Everything this package writes that is not finished yet (a conversion, the default model, its download)
lives in a hidden sibling of its final place, ``.NAME.KIND-HOST-PID-XXXXXXXX``, and is renamed into place
only when complete. Two things remove such a directory when the work stops early:

- SIGINT and SIGTERM: :func:`interruptible` turns SIGTERM into the same exception as Ctrl-C
  (:class:`Interrupted`, a ``KeyboardInterrupt``), so the ``finally`` blocks that remove the temporary
  directory run for both. The removal itself runs with signals deferred (:func:`deferred_signals`), so a
  second Ctrl-C cannot cut it short. A command then exits with 128 + the signal's number
  (:func:`interrupt_exit_code`): 130 for SIGINT, 143 for SIGTERM.
- SIGKILL and power loss run no code at all: the next run removes the leftovers
  (:func:`remove_stale`), those whose owner (the PID in the name, on this host) is no longer running,
  or is a later process that reuses the PID (it started after the directory was last changed).

This module imports nothing heavy, so an entry point can install the handlers before importing torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "Interrupted",
    "deferred_signals",
    "exit_on_signal",
    "install_signal_handlers",
    "interrupt_exit_code",
    "interrupt_message",
    "interruptible",
    "is_temp_dir_name",
    "new_temp_dir",
    "remove_stale",
    "remove_tree",
    "temp_dir",
]

TEMP_KINDS = ("partial", "old", "download")
# Directories older than this whose name carries no owner (written by earlier versions, with mkdtemp)
# are taken as leftovers too: no conversion runs that long without finishing.
LEGACY_MAX_AGE_S = 24 * 3600


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT through our handler), raised where the main thread was; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def interrupt_exit_code(exc: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C (a plain KeyboardInterrupt), 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def interrupt_message(exc: BaseException, prog: str) -> str:
    """The one line a command prints when a signal stops it."""
    name = signal.Signals(int(getattr(exc, "signum", signal.SIGINT))).name
    return f"{prog}: stopped by {name}; nothing partial was left behind."


@contextlib.contextmanager
def exit_on_signal(prog: str) -> Iterator[None]:
    """For a command's body: SIGTERM and Ctrl-C unwind it (``finally`` blocks remove what was begun), then
    the process exits with 128 + the signal's number after one line on stderr, no traceback."""
    with interruptible():
        try:
            yield
        except KeyboardInterrupt as e:
            print(file=sys.stderr)  # off the line a ^C may have left the cursor on
            print(interrupt_message(e, prog), file=sys.stderr, flush=True)
            sys.exit(interrupt_exit_code(e))


# --- signal handlers -----------------------------------------------------------------------------------

_defer_depth = 0
_pending: Optional[int] = None


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _defer_depth > 0:
        if _pending is None:
            _pending = signum  # raised when the critical section ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Run a critical section (a rename, a cleanup) whole: a SIGINT/SIGTERM that arrives meanwhile is
    raised when it ends. Only where our handlers are installed (see :func:`interruptible`)."""
    global _defer_depth, _pending
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            if not sys.exc_info()[0]:  # already unwinding from an exception: that one goes on
                raise Interrupted(signum)


def _ours(handler: Any) -> bool:
    return handler is _handler


def install_signal_handlers() -> None:
    """Make SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, for the whole process.

    For an entry point, first thing. Handlers someone else installed are kept; an ignored signal stays
    ignored. Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        current = signal.getsignal(signum)
        if current is default:
            signal.signal(signum, _handler)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM is raised like Ctrl-C (as :class:`Interrupted`), so ``finally`` blocks
    run for both; the previous handlers come back afterwards. Handlers someone else installed are kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_signal_handlers()
    try:
        yield
    finally:
        with deferred_signals():
            for signum, handler in saved.items():
                if not _ours(handler) and _ours(signal.getsignal(signum)) and handler is not None:
                    signal.signal(signum, handler)


# --- temporary directories -------------------------------------------------------------------------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


_NAME_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>%s)-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{8}$"
                      % "|".join(TEMP_KINDS))
# mkdtemp names of earlier versions: .NAME.partial-XXXXXXXX, .NAME.old-XXXXXXXX, .download-XXXXXXXX
_LEGACY_RE = re.compile(r"^\.(?:.+\.)?(?:partial|old|download)-[A-Za-z0-9_]{8}$")
# An adapter save of earlier versions (now checkpoint/adapter.py): .NAME.tmp-PID, .NAME.old-PID, with no host in the name.
_LEGACY_PID_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp_dir(parent: str | Path, name: str, kind: str = "partial") -> Path:
    """Create ``parent/.NAME.KIND-HOST-PID-XXXXXXXX`` (mode as the umask allows) and return it.

    Stale leftovers of killed runs in ``parent`` are removed first (:func:`remove_stale`). The caller
    removes the directory (or renames it into place); a hard kill leaves it to the next run.
    """
    if kind not in TEMP_KINDS:
        raise ValueError(f"kind must be one of {TEMP_KINDS}, found {kind!r}.")
    parent = Path(parent)
    remove_stale(parent)
    made: Optional[Path] = None
    try:
        with deferred_signals():  # created and returned, or neither
            while made is None:
                path = parent / f".{name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    path.mkdir(mode=0o777 & ~_umask())
                    made = path
                except FileExistsError:
                    continue
    except BaseException:
        # A signal that arrived while the directory was made is raised as the block ends: nobody would own it.
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return made


def is_temp_dir_name(name: str) -> bool:
    """Is ``name`` one of this module's temporary directory names (or an earlier version's)?"""
    return bool(_NAME_RE.match(name) or _LEGACY_RE.match(name) or _LEGACY_PID_RE.match(name))


def remove_tree(path: str | Path) -> None:
    """``shutil.rmtree`` that a signal cannot cut short; a missing path is fine."""
    with deferred_signals():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_dir(parent: str | Path, name: str, kind: str = "partial") -> Iterator[Path]:
    """:func:`new_temp_dir`, removed when the block ends however it ends (unless it was renamed away)."""
    path: Optional[Path] = None
    try:
        path = new_temp_dir(parent, name, kind)
        yield path
    finally:
        if path is not None:
            remove_tree(path)


def _process_start(pid: int) -> Optional[float]:
    """When ``pid`` started (seconds since the epoch), on Linux; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, after "pid (comm)"
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, mtime: float) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    except OSError:
        return True
    started = _process_start(pid)
    # A process that started after the directory was last changed cannot have made it: the PID was reused.
    return started is None or started <= mtime + 5


def remove_stale(parent: str | Path) -> list[Path]:
    """Remove the temporary directories in ``parent`` that killed runs left; return what was removed.

    Only names this module gives (``.NAME.KIND-HOST-PID-XXXXXXXX``) of this host whose process is gone,
    mkdtemp-named ones of earlier versions older than a day, and the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` of
    earlier versions' adapter saves whose process is gone (or a day old). Nothing else is touched. A stale
    ``old`` directory whose NAME is missing holds the previous output of a run killed mid-swap: it is put back
    as NAME instead of being removed.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    host, now = _host(), time.time()
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            mtime = entry.stat().st_mtime
        except OSError:
            continue
        m = _NAME_RE.match(entry.name)
        legacy = _LEGACY_PID_RE.match(entry.name)
        if m:
            stale = m["host"] == host and not _owner_alive(int(m["pid"]), mtime)
        elif legacy:  # no host in the name: its PID is taken as this host's, or a day old is stale anyway
            m = legacy
            stale = not _owner_alive(int(m["pid"]), mtime) or now - mtime > LEGACY_MAX_AGE_S
        else:
            stale = bool(_LEGACY_RE.match(entry.name)) and now - mtime > LEGACY_MAX_AGE_S
        if stale and m is not None and m["kind"] == "old" and not (Path(parent) / m["name"]).exists():
            # Killed between moving the previous output aside and putting the new one in its place: the
            # previous one goes back, so nothing the user had is lost. It waits in OLD/NAME (this module's
            # names) or is OLD itself (an adapter save of earlier versions).
            inner = entry / m["name"] if m is not legacy else entry
            try:
                holds = inner.is_dir() and any(inner.iterdir())
            except OSError:
                holds = False
            if holds:
                with deferred_signals():
                    try:
                        inner.rename(Path(parent) / m["name"])
                    except OSError:
                        continue  # left alone: better debris than a lost output
        if stale:
            remove_tree(entry)
            if not entry.exists():
                removed.append(entry)
    return removed
