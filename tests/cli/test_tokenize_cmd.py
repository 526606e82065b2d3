"""``llama-offload tokenize``: the ids printed equal what the Python API gives, for every tokenizer kind.

One run is a real process (``python -m llama_offload.cli.main tokenize ...``, an error: its exit status and stderr);
the others run ``main()`` in this process (conftest.run_in_process), as do the error cases below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llama_offload.cli.main as cli
from conftest import run_in_process
from llama_offload.text.chat_format import Dialog, default_chat_format_name, get_chat_format
from llama_offload.text.tokenizer import load_tokenizer
from test_llama3_chat import DIALOG as LLAMA3_DIALOG
from test_llama3_chat import GOLDEN_DIALOG_IDS
from test_tiktoken import write_tiny_tiktoken
from test_tokenizer_json import write_tiny_tokenizer

# Text that fire would mangle if it evaluated it: a comma makes a tuple, parentheses vanish, None is None.
TEXT = "Hello, world (a) None 1234567 naïve café 日本語 <|eot_id|>"
DIALOG: Dialog = [
    {"role": "system", "content": "Be brief, true to facts."},
    {"role": "user", "content": "Hello, world! null"},
    {"role": "assistant", "content": "Hi (there)."},
    {"role": "user", "content": "a\\/b 日本語"},
]
KINDS = ("sentencepiece", "tiktoken", "json")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenize_cmd")
    (root / "sp").mkdir()
    sp = shutil.copy(sp_tokenizer_path, root / "sp" / "tokenizer.model")
    return {
        "sentencepiece": Path(sp),
        "tiktoken": write_tiny_tiktoken(root / "tik" / "tokenizer.model"),
        "json": write_tiny_tokenizer(root / "json"),  # a ChatML vocabulary, as SmolLM2's
    }


def expected_text(path: Path, text: str = TEXT) -> list[int]:
    return load_tokenizer(path).encode(text, bos=True, eos=False)


def expected_dialog(path: Path, dialog: Dialog = DIALOG, chat_format: str | None = None) -> list[int]:
    tok = load_tokenizer(path)
    return get_chat_format(chat_format or default_chat_format_name(tok), tok).encode_dialog_prompt(dialog)


def _start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_OFFLOAD_TRACEBACK"}
    return subprocess.Popen([sys.executable, "-m", "llama_offload.cli.main", "tokenize", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env)


def _finish(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str, str]]:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (proc.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def runs(tokenizers: dict[str, Path]) -> dict[str, tuple[int, str, str]]:
    """The text and dialog of each kind through main() in this process; the error through a real process."""
    error = _start("--tokenizer_path", str(tokenizers["tiktoken"]), "--dialog", "[{")  # runs while the rest do
    out = {}
    for kind, path in tokenizers.items():
        out[f"{kind}-text"] = _in_process("--tokenizer_path", str(path), "--text", TEXT)
        out[f"{kind}-dialog"] = _in_process("--tokenizer_path", str(path), "--dialog", json.dumps(DIALOG))
    out.update(_finish({"error": error}))
    return out


def _in_process(*args: str) -> tuple[int, str, str]:
    ran = run_in_process("tokenize", *args)
    return ran.returncode, ran.stdout, ran.stderr


def one_json_line(stdout: str) -> list[int]:
    lines = stdout.split("\n")
    assert len(lines) == 2 and lines[1] == "", f"expected exactly one line, got {stdout!r}"
    ids = json.loads(lines[0])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    return ids


@pytest.mark.parametrize("kind", KINDS)
def test_text(runs, tokenizers: dict[str, Path], kind: str) -> None:
    rc, stdout, stderr = runs[f"{kind}-text"]
    assert rc == 0, stderr
    assert one_json_line(stdout) == expected_text(tokenizers[kind])


@pytest.mark.parametrize(("kind", "chat_format"), [("sentencepiece", "llama2"), ("tiktoken", "llama3"),
                                                   ("json", "chatml")])
def test_dialog(runs, tokenizers: dict[str, Path], kind: str, chat_format: str) -> None:
    rc, stdout, stderr = runs[f"{kind}-dialog"]
    assert rc == 0, stderr
    ids = one_json_line(stdout)
    assert default_chat_format_name(load_tokenizer(tokenizers[kind])) == chat_format
    assert ids == expected_dialog(tokenizers[kind], chat_format=chat_format)


def test_bos_only_where_the_tokenizer_adds_one(runs, tokenizers: dict[str, Path]) -> None:
    for kind in KINDS:
        tok = load_tokenizer(tokenizers[kind])
        ids = one_json_line(runs[f"{kind}-text"][1])
        assert (ids[0] == tok.bos_id) is (kind != "json"), kind  # the tiny ChatML vocabulary adds no BOS
        assert ids[int(kind != "json"):] == tok.encode(TEXT, bos=False, eos=False)
        assert tok.decode(ids).endswith(TEXT)


def test_error_in_a_subprocess(runs) -> None:
    rc, stdout, stderr = runs["error"]
    assert rc == 1 and stdout == ""
    assert stderr.startswith("llama-offload: error: --dialog is not valid JSON"), stderr
    assert "Traceback" not in stderr


def test_real_llama3_file(llama3_tokenizer_path: Path) -> None:
    path = str(llama3_tokenizer_path)
    got = {"text": _in_process("--tokenizer_path", path, "--text", "Hello, world!"),
           "dialog": _in_process("--tokenizer_path", path, "--dialog", json.dumps(LLAMA3_DIALOG))}
    assert got["text"][0] == 0 and got["dialog"][0] == 0, got
    assert one_json_line(got["text"][1]) == [128000, 9906, 11, 1917, 0]
    assert one_json_line(got["dialog"][1]) == GOLDEN_DIALOG_IDS


# --- in this process, through main() ------------------------------------------------------------------------


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["llama-offload", "tokenize", *args])
    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    try:
        cli.main()
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ckpt_dir_uses_the_recorded_chat_format(monkeypatch, capsys, tokenizers: dict[str, Path],
                                                tmp_path: Path) -> None:
    ckpt = tmp_path / "converted"
    shutil.copytree(tokenizers["json"].parent, ckpt)
    (ckpt / "llama_offload.json").write_text(
        json.dumps({"format_version": 1, "chat_format": "llama2", "tokenizer": "tokenizer.json"}))
    rc, out, err = run_main(monkeypatch, capsys, "--ckpt_dir", str(ckpt), "--dialog", json.dumps(DIALOG))
    assert rc == 0, err
    assert one_json_line(out) == expected_dialog(tokenizers["json"], chat_format="llama2")
    # --chat_format wins over the record.
    rc, out, err = run_main(monkeypatch, capsys, "--ckpt_dir", str(ckpt), "--dialog", json.dumps(DIALOG),
                            "--chat_format", "chatml")
    assert one_json_line(out) == expected_dialog(tokenizers["json"], chat_format="chatml")


def test_ckpt_dir_in_metas_layout(monkeypatch, capsys, tokenizers: dict[str, Path], tmp_path: Path) -> None:
    # Meta's download: tokenizer.model beside the model folder, no llama_offload.json: chosen by tokenizer.
    (tmp_path / "llama-3-tiny").mkdir()
    shutil.copy(tokenizers["tiktoken"], tmp_path / "tokenizer.model")
    rc, out, err = run_main(monkeypatch, capsys, "--ckpt_dir", str(tmp_path / "llama-3-tiny"),
                            "--dialog", json.dumps(DIALOG))
    assert rc == 0, err
    assert one_json_line(out) == expected_dialog(tokenizers["tiktoken"], chat_format="llama3")
    rc, out, err = run_main(monkeypatch, capsys, f"--ckpt_dir={tmp_path / 'llama-3-tiny'}", f"--text={TEXT}")
    assert one_json_line(out) == expected_text(tokenizers["tiktoken"])


def test_chat_format_flag(monkeypatch, capsys, tokenizers: dict[str, Path]) -> None:
    rc, out, err = run_main(monkeypatch, capsys, "--tokenizer_path", str(tokenizers["tiktoken"]),
                            "--dialog", json.dumps(DIALOG), "--chat_format", "llama2")
    assert rc == 0, err
    assert one_json_line(out) == expected_dialog(tokenizers["tiktoken"], chat_format="llama2")


@pytest.mark.parametrize("text", ["(a)", "None", "True", "1e3", "[1, 2]", "a, b", "-5", "", "x\ny", "--not-a-flag"])
def test_text_is_taken_as_typed(monkeypatch, capsys, tokenizers: dict[str, Path], text: str) -> None:
    path = tokenizers["sentencepiece"]
    rc, out, err = run_main(monkeypatch, capsys, "--tokenizer_path", str(path), f"--text={text}")
    assert rc == 0, err
    assert one_json_line(out) == expected_text(path, text)
    if not text.startswith("--"):
        rc, out, err = run_main(monkeypatch, capsys, "--text", text, "--tokenizer_path", str(path))
        assert one_json_line(out) == expected_text(path, text)


def test_python_api_takes_a_parsed_dialog(tokenizers: dict[str, Path]) -> None:
    path = tokenizers["json"]
    assert cli.token_ids(dialog=DIALOG, tokenizer_path=str(path)) == expected_dialog(path)
    assert cli.token_ids(dialog=json.dumps(DIALOG), tokenizer_path=str(path)) == expected_dialog(path)
    assert cli.token_ids(text=TEXT, tokenizer_path=str(path)) == expected_text(path)


def test_default_model_without_paths(monkeypatch, capsys, tokenizers: dict[str, Path]) -> None:
    # Like the other commands, no path means the default model's tokenizer.
    monkeypatch.setattr(cli, "resolve_paths", lambda ckpt, tok: (None, tokenizers["tiktoken"]))
    rc, out, err = run_main(monkeypatch, capsys, "--text", TEXT)
    assert rc == 0, err
    assert one_json_line(out) == expected_text(tokenizers["tiktoken"])


GOOD_DIALOG = json.dumps([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param([], ["exactly one of --text", "--dialog", "neither"], id="neither"),
        pytest.param(["--text", "hi", "--dialog", GOOD_DIALOG], ["exactly one of", "both"], id="both"),
        pytest.param(["--text"], ["--text must be a string", "bool"], id="bare-text"),
        pytest.param(["--dialog", '[{"role": "user"'], ["--dialog is not valid JSON", "character"], id="bad-json"),
        pytest.param(["--dialog", '{"role": "user", "content": "hi"}'], ["one message", "wrap it in a list"],
                     id="one-message"),
        pytest.param(["--dialog", json.dumps([[{"role": "user", "content": "hi"}]])], ["list of dialogs"],
                     id="list-of-dialogs"),
        pytest.param(["--dialog", '"hello"'], ["--dialog must be", "str"], id="not-a-list"),
        pytest.param(["--dialog", json.dumps([{"role": "bot", "content": "hi"}])],
                     ["--dialog: Message 0", "unknown role 'bot'"], id="bad-role"),
        pytest.param(["--dialog", GOOD_DIALOG, "--chat_format", "llama9"],
                     ["Unknown chat format 'llama9'", "chatml, llama2, llama3"], id="unknown-chat-format"),
        pytest.param(["--dialog", GOOD_DIALOG, "--chat_format", "chatml"], ["'chatml' needs the special tokens"],
                     id="chat-format-not-in-vocabulary"),
        pytest.param(["--text", "hi", "--chat_format", "llama3"], ["only applies to --dialog"], id="chat-format-with-text"),
    ],
)  # fmt: skip
def test_errors(monkeypatch, capsys, tokenizers: dict[str, Path], args: list[str], fragments: list[str]) -> None:
    rc, out, err = run_main(monkeypatch, capsys, "--tokenizer_path", str(tokenizers["tiktoken"]), *args)
    assert rc == 1 and out == ""
    first = err.splitlines()[0]
    assert first.startswith("llama-offload: error: "), err
    for frag in fragments:
        assert frag in first, first


def test_missing_files(monkeypatch, capsys, tmp_path: Path) -> None:
    cases = [
        (["--tokenizer_path", str(tmp_path / "nope.model")], ["Tokenizer file not found", "nope.model"]),
        (["--ckpt_dir", str(tmp_path / "nowhere")], ["--ckpt_dir", "nowhere", "not a directory"]),
        (["--ckpt_dir", str(tmp_path)], ["No tokenizer", "--tokenizer_path"]),
    ]
    for args, fragments in cases:
        rc, out, err = run_main(monkeypatch, capsys, *args, "--text", "hi")
        assert rc == 1 and out == "", args
        first = err.splitlines()[0]
        assert first.startswith("llama-offload: error: ")
        for frag in fragments:
            assert frag in first, first
