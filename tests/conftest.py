from __future__ import annotations

import contextlib
import io
import runpy
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from llama_offload.args import ModelArgs
from llama_offload.checkpoint import random_state_dict, save_checkpoint
from llama_offload.tokenizer import BUNDLED_CORPUS_PATH, Tokenizer, load_tokenizer, train_sentencepiece


# --- tokenizer fixtures -------------------------------------------------------
# Training takes well under a second, but once per session is enough: every test
# only reads the model.


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("sp_tokenizer")
    return train_sentencepiece(BUNDLED_CORPUS_PATH, out_dir / "tokenizer", 512)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(sp_tokenizer_path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> Path:
    """A tiny random checkpoint in Meta's download layout: the tokenizer beside the model folder."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(sp_tokenizer_path, root / "tokenizer.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    save_checkpoint(random_state_dict(args, seed=0), args, root / "tiny")
    return root / "tiny"


# --- a command run in this process ------------------------------------------------------------------------
# A subprocess pays 2-4 s of interpreter and torch import. Where a test is about what a command does (its
# output, its exit code, its one-line errors) rather than about the process itself (signals, kills, the
# interpreter's own decoding of argv), ``run_cli`` runs the real entry point here: ``cli.main()`` (fire
# included) or a script as ``__main__``, with argv, stdin and the environment as given.


@dataclass
class Ran:
    """What subprocess.run(..., capture_output=True, text=True) would give: exit status, stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(*argv: Any, stdin: bytes | str = b"", env: Optional[dict[str, Optional[str]]] = None,
                   script: Optional[Path] = None, strict_stdin: bool = False) -> Ran:
    """``llama-offload ARGV`` (or ``python SCRIPT ARGV``) in this process, its output captured. stdin is a UTF-8
    text stream over the given bytes, its error handler ``surrogateescape`` as under a C.UTF-8 locale, or
    ``strict`` (PYTHONIOENCODING=utf-8:strict). ``env`` entries are set (a value of None removes the variable);
    LLAMA_OFFLOAD_TRACEBACK and WORLD_SIZE are always removed. Everything is restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key in ("LLAMA_OFFLOAD_TRACEBACK", "WORLD_SIZE"):
            m.delenv(key, raising=False)
        for key, value in (env or {}).items():
            if value is None:
                m.delenv(key, raising=False)
            else:
                m.setenv(key, value)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        m.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8",
                                                 errors="strict" if strict_stdin else "surrogateescape"))
        # Python decodes argv with surrogateescape: bytes arrive as the same str a shell's argument would.
        args = [a.decode("utf-8", "surrogateescape") if isinstance(a, bytes) else str(a) for a in argv]
        code = 0
        try:
            if script is not None:
                m.setattr(sys, "argv", [str(script), *args])
                runpy.run_path(str(script), run_name="__main__")
            else:
                from llama_offload.cli import main

                m.setattr(sys, "argv", ["llama-offload", *args])
                main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Ran(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli() -> Callable[..., Ran]:
    """conftest.run_in_process, as a fixture."""
    return run_in_process
