"""The README's code examples, run, so that the README cannot drift from the code.

- Each ```python block runs, in order and in one namespace (the second block uses the first one's
  ``llama``), against a tiny random checkpoint and the test tokenizer: the ``"checkpoints/..."`` paths in it
  are replaced by those.
- Each ```bash block's commands (``llama-offload ...``, ``python scripts/X.py ...``, ``torchrun ...
  scripts/X.py ...``) are parsed, and every ``--flag`` given must be one the command takes: the flags are
  read from the command's own ``-- --help``, which is what fire parses.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from llama_offload.cli import main as cli
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(language: str, text: Optional[str] = None) -> list[str]:
    """The bodies of the README's fenced blocks marked ``language``, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return [body for lang, body in _BLOCK.findall(text) if lang == language]


# --- the Python examples ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> tuple[Path, Path]:
    """(checkpoint directory, tokenizer): Meta's download layout, the tokenizer beside the model folder."""
    root = tmp_path_factory.mktemp("readme_models")
    tokenizer = root / "tokenizer.model"
    shutil.copy(sp_tokenizer_path, tokenizer)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    save_checkpoint(random_state_dict(args, seed=0), args, root / "tiny-chat")
    return root / "tiny-chat", tokenizer


_CHECKPOINT_PATH = re.compile(r"""(["'])checkpoints/[^"']*\1""")


def with_tiny_paths(code: str, ckpt: Path, tokenizer: Path) -> str:
    """``code`` with each ``"checkpoints/..."`` literal replaced: a tokenizer file by ``tokenizer``, anything
    else by ``ckpt``."""
    def replace(m: re.Match) -> str:
        path = tokenizer if m.group(0)[1:-1].endswith(("tokenizer.model", "tokenizer.json")) else ckpt
        return repr(str(path))
    return _CHECKPOINT_PATH.sub(replace, code)


def test_readme_has_python_examples() -> None:
    blocks = code_blocks("python")
    assert len(blocks) >= 2 and "Llama.build" in blocks[0]


SERVER_URL = "http://127.0.0.1:8000/v1"  # what the README's client examples connect to


@contextlib.contextmanager
def serving(llama, model_name: str):
    """``llama-offload serve``'s app for ``llama`` on a free local port; yields its /v1 URL."""
    import socket
    import threading
    import time

    import uvicorn

    from llama_offload.serve.app import create_app
    from llama_offload.serve.server import engine_for, served_from

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine_for(llama, max_queue=4), served_from(llama, model_name))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(20)


def test_python_examples_run(tiny_ckpt: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, tokenizer = tiny_ckpt
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(code_blocks("python")):
        code = with_tiny_paths(block, ckpt, tokenizer)
        assert "checkpoints/" not in code, code
        try:
            if SERVER_URL in code:  # a client of `llama-offload serve`: served by the first block's model
                model = re.search(r'model="([^"]+)"', code)
                assert model is not None, block
                with serving(namespace["llama"], model.group(1)) as url:
                    exec(compile(code.replace(SERVER_URL, url), f"README.md python block {i}", "exec"), namespace)
            else:
                exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md python block {i} failed on the tiny model: {type(e).__name__}: {e}\n{block}")
    out = capsys.readouterr().out
    assert "tokens/s" in out  # llama.last_stats.summary() ran


def test_python_example_paths_are_substituted() -> None:
    code = with_tiny_paths('Llama.build("checkpoints/llama-2-7b-chat", "checkpoints/tokenizer.model")',
                           Path("/m"), Path("/t.model"))
    assert code == "Llama.build('/m', '/t.model')"


# --- the shell commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One README command: the program whose flags count, its subcommand, and the flags given."""

    program: str  # "llama-offload" or the script's path from the repository root, "scripts/X.py"
    subcommand: Optional[str]
    flags: tuple[str, ...]
    text: str

    @property
    def name(self) -> str:
        return " ".join(filter(None, (self.program, self.subcommand)))


_OPERATORS = {"&&", "||", "|", ";", "&"}
_SKIPPED = {"bash", "sh", "pip", "echo", "cd", "export", "git"}


def _words(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``|``, ``;``."""
    commands: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for word in lexer:
            if word in _OPERATORS:
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def _flags(args: list[str]) -> tuple[str, ...]:
    flags = []
    for arg in args:
        if arg == "--":  # what follows is fire's own (--help)
            break
        if arg.startswith("--"):
            flags.append(arg[2:].split("=", 1)[0])
    return tuple(flags)


def parse_commands(block: str) -> list[Command]:
    """The commands of a shell block whose flags this project defines; others (setup, pytest) are left out."""
    out = []
    for words in _words(block):
        text = " ".join(words)
        if words[0] == "llama-offload":
            if len(words) < 2 or words[1].startswith("-"):
                raise AssertionError(f"llama-offload without a command in the README: {text}")
            out.append(Command("llama-offload", words[1], _flags(words[2:]), text))
            continue
        if words[0] in _SKIPPED:
            continue
        if words[0] == "torchrun" or Path(words[0]).name.startswith("python"):
            scripts = [i for i, w in enumerate(words) if w.startswith("scripts/") and w.endswith(".py")]
            if not scripts:
                continue  # python3 -m pytest, ...
            i = scripts[0]
            rest = words[i + 1 :]
            # A subcommand is the first word after the script when the script has commands (convert.py gguf).
            sub = rest[0] if rest and not rest[0].startswith("-") else None
            out.append(Command(words[i], sub, _flags(rest), text))
    return out


_FLAG = re.compile(r"^\s+(?:-\w, )?--(\w+)(?:=|\s*$)", re.MULTILINE)
_SECTION = re.compile(r"^([A-Z][A-Z ]+)$", re.MULTILINE)


def _help(program: str, subcommand: Optional[str]) -> str:
    """``program [subcommand] -- --help``, run in this process (a subprocess per command costs seconds of
    imports): the script as ``__main__`` with that argv, or llama-offload's ``main``."""
    argv = [program, *([subcommand] if subcommand else []), "--", "--help"]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if program == "llama-offload":
                    cli.main()
                else:
                    runpy.run_path(str(REPO / program), run_name="__main__")
            except SystemExit:  # fire exits after showing the help
                pass
    finally:
        sys.argv = saved
    text = out.getvalue() + err.getvalue()
    assert "NAME" in text, f"{' '.join(argv)} gave no help:\n{text}"
    return text


def _sections(help_text: str) -> dict[str, str]:
    parts = _SECTION.split(help_text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def known_flags(help_text: str) -> set[str]:
    """The flags a fire command's help lists: its FLAGS, and its positional arguments (fire takes those as
    flags too)."""
    sections = _sections(help_text)
    flags = set(_FLAG.findall(sections.get("FLAGS", "")))
    positional = sections.get("POSITIONAL ARGUMENTS", "")
    flags |= {name.lower() for name in re.findall(r"^    ([A-Z][A-Z0-9_]*)\s*$", positional, re.MULTILINE)}
    return flags


def has_commands(help_text: str) -> bool:
    return "COMMANDS" in _sections(help_text)


def test_shell_command_parsing() -> None:
    block = """# a comment
bash scripts/setup.sh && python3 scripts/example_chat_completion.py --seed 3
echo "x" | llama-offload complete --ckpt_dir d --temperature=0 -- --help
torchrun --nproc_per_node 2 scripts/example_chat_completion.py --ckpt_dir c \\
    --gpu_memory_gb 8          # the budget is per GPU
python scripts/convert.py gguf model.gguf --out o
python3 -m pytest -q
"""
    got = [(c.name, c.subcommand, c.flags) for c in parse_commands(block)]
    assert got == [
        ("scripts/example_chat_completion.py", None, ("seed",)),
        ("llama-offload complete", "complete", ("ckpt_dir", "temperature")),
        ("scripts/example_chat_completion.py", None, ("ckpt_dir", "gpu_memory_gb")),
        ("scripts/convert.py gguf", "gguf", ("out",)),
    ]


def test_known_flags_from_help() -> None:
    help_text = _help("llama-offload", "complete")
    flags = known_flags(help_text)
    assert {"prompts", "temperature", "ckpt_dir", "num_slices", "gpu_memory_gb"} <= flags
    assert "temprature" not in flags


def test_readme_shell_flags_exist() -> None:
    commands = [c for block in code_blocks("bash") for c in parse_commands(block)]
    names = {c.name for c in commands}
    # The README shows these; if the parser stops finding them, it has stopped checking them.
    assert {"llama-offload complete", "llama-offload chat", "llama-offload info",
            "llama-offload convert", "llama-offload tokenize", "scripts/example_chat_completion.py",
            "scripts/example_text_completion.py", "scripts/convert.py gguf"} <= names, names
    helps: dict[tuple[str, Optional[str]], set[str]] = {}
    wrong = []
    for c in commands:
        sub = c.subcommand
        if c.program != "llama-offload" and sub is not None:
            # A script's first word is a subcommand only when the script has commands.
            if (c.program, None) not in helps:
                top = _help(c.program, None)
                helps[(c.program, None)] = set() if has_commands(top) else known_flags(top)
            if helps[(c.program, None)]:
                sub = None
        if (c.program, sub) not in helps:
            helps[(c.program, sub)] = known_flags(_help(c.program, sub))
        known = helps[(c.program, sub)]
        assert known, f"no flags found in the help of {c.name}"
        for flag in c.flags:
            if flag not in known and not (flag.startswith("no") and flag[2:] in known):
                wrong.append(f"--{flag} in `{c.text}` is not a flag of {c.name}")
    assert not wrong, "\n".join(wrong)
