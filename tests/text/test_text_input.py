"""Input text that is not valid UTF-8: refused where it enters, named by where it came from, never a
traceback; the chat REPL reports it and goes on. Also the small CLI items of issue 11 that live beside it
(--version, the tied parameter count, the empty-completion hint, the tokenizer-mismatch hint)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.cli.main import empty_completion_hint, version
from llama_offload.model.args import param_counts
from llama_offload.model.transformer import Transformer
from llama_offload.text.text_input import (
    TextInputError, a_type, check_dialog, check_text, check_texts, decode_text, read_lines, read_stdin_lines,
)
from llama_offload.text.tokenizer import Tokenizer, check_vocab_size, load_tokenizer

from test_tiktoken import write_tiny_tiktoken  # noqa: E402
from test_tokenizer_json import write_tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LATIN1 = "Caf\xe9 au lait is".encode("latin-1")  # b"Caf\xe9 au lait is": not UTF-8
ESCAPED = LATIN1.decode("utf-8", "surrogateescape")  # what Python makes of it in argv: "Caf\udce9 au lait is"
HINT = "iconv -f latin1 -t utf-8"


# --- text_input itself -----------------------------------------------------------------------------------


def test_valid_text_passes_unchanged() -> None:
    for text in ("", "plain ascii", "Café au lait, 東京, 🦙"):
        assert check_text(text, "argument 1") == text
    assert decode_text("Café".encode(), "stdin line 1") == "Café"


def test_surrogate_escapes_are_named_by_source_and_byte() -> None:
    with pytest.raises(TextInputError) as e:
        check_text(ESCAPED, "argument 2")
    msg = str(e.value)
    assert msg.startswith("argument 2 is not valid UTF-8: byte 0xe9 at character 3")
    assert r"b'Caf\xe9 au lait is'" in msg and HINT in msg
    assert isinstance(e.value, ValueError)  # a user error: one line, no traceback, in fire_main


def test_raw_bytes() -> None:
    with pytest.raises(TextInputError, match=r"stdin line 3 is not valid UTF-8: byte 0xe9 at byte 3"):
        decode_text(LATIN1, "stdin line 3")
    with pytest.raises(TextInputError, match="--text arrived as bytes"):
        check_text(b"Hello", "--text")  # undecoded bytes never pass as text
    with pytest.raises(TextInputError, match=r"not valid UTF-8: byte 0xed"):
        decode_text(b"\xed\xa0\x80", "x")  # an encoded surrogate is not UTF-8 either


def test_lone_surrogate_from_json() -> None:
    text = json.loads('"Caf\\ud800"')
    with pytest.raises(TextInputError, match=r"--prompts item 1 holds a lone surrogate U\+D800 at character 3"):
        check_texts(["fine", text], "--prompts")


def test_non_text() -> None:
    with pytest.raises(TextInputError, match="must be text .a str., found an int: 42"):
        check_text(42, "--system")


def test_check_dialog_names_the_message() -> None:
    check_dialog([{"role": "user", "content": "Café"}], "--dialog")
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": ESCAPED}]
    with pytest.raises(TextInputError, match="--dialogs item 0 message 2 content is not valid UTF-8"):
        check_dialog(dialog, "--dialogs item 0")


def test_read_lines_counts_every_line() -> None:
    data = b"\xef\xbb\xbffirst\n\nthird \xe9\r\nfourth\n\xff\n"
    with pytest.raises(TextInputError) as e:
        read_lines(io.BytesIO(data))
    assert str(e.value).startswith("stdin line 3 is not valid UTF-8: byte 0xe9")
    assert "(1 more line(s) are not valid either)" in str(e.value)
    assert read_lines(io.BytesIO("\ufeffa\n\nCafé\r\nb".encode())) == ["a", "", "Café", "b"]
    # A text stream (already decoded with surrogateescape) gives the same answer.
    with pytest.raises(TextInputError, match="stdin line 2 is not valid UTF-8: byte 0xe9"):
        read_lines(io.StringIO("ok\n" + ESCAPED + "\n"))
    assert read_stdin_lines(io.StringIO("x\ny\n")) == ["x", "y"]


def test_a_type() -> None:
    assert [a_type(v) for v in (1, "s", 1.0, [], None, ())] == [
        "an int", "a str", "a float", "a list", "a NoneType", "a tuple"]


# --- the tokenizers' own guard ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer: Tokenizer) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("guard")
    return {
        "sentencepiece": sp_tokenizer,
        "json": load_tokenizer(write_tiny_tokenizer(root / "bpe")),
        "tiktoken": load_tokenizer(write_tiny_tiktoken(root / "tik" / "tokenizer.model")),
    }


@pytest.mark.parametrize("kind", ["sentencepiece", "json", "tiktoken"])
def test_tokenizers_refuse_bytes_and_surrogates(tokenizers: dict[str, Tokenizer], kind: str) -> None:
    tok = tokenizers[kind]
    assert tok.encode("Café", bos=False, eos=False)  # valid text still encodes
    with pytest.raises(TextInputError, match="The text to encode is not valid UTF-8: byte 0xe9 at character 3"):
        tok.encode(ESCAPED, bos=True, eos=False)
    with pytest.raises(TextInputError, match="lone surrogate"):
        tok.encode("\ud800", bos=False, eos=False)
    with pytest.raises(TextInputError, match="arrived as bytes") as e:
        tok.encode(b"Caf\xc3\xa9", bos=False, eos=False)  # type: ignore[arg-type]
    assert isinstance(e.value, TypeError)  # what a caller passing bytes has always been told


def test_vocab_mismatch_names_the_tokenizer_file(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["json"]
    with pytest.raises(ValueError) as e:
        check_vocab_size(tok, 32000, source="params.json")
    msg = str(e.value)
    assert "tokenizer.json" in msg and "tokenizer.model" not in msg
    assert "tokenizer that came with this checkpoint (the tokenizer.json shipped with it)" in msg


# --- the commands -----------------------------------------------------------------------------------------
# One run goes through a real interpreter (argv bytes decoded by Python itself); the others run the same entry
# point in this process (conftest.run_cli), with argv as Python decodes it (surrogateescape) and stdin a UTF-8
# stream over the same bytes, with the locale's error handler or a strict one.


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    e = dict(os.environ, LLAMA_OFFLOAD_CHECKPOINTS=str(tmp_path_factory.mktemp("checkpoints")),
             LLAMA_OFFLOAD_DEFAULT_MODEL="tiny-random")
    for key in ("LLAMA_OFFLOAD_TRACEBACK", "WORLD_SIZE"):
        e.pop(key, None)
    return e


@pytest.fixture
def run(run_cli, env: dict[str, str]):
    """``run(args, stdin=None, strict=False)``: the command in this process, under the isolated ``env``."""
    isolated = {key: env[key] for key in ("LLAMA_OFFLOAD_CHECKPOINTS", "LLAMA_OFFLOAD_DEFAULT_MODEL")}

    def go(args: list[bytes | str], stdin: Optional[bytes] = None, strict: bool = False):
        return run_cli(*args, stdin=stdin or b"", env=isolated, strict_stdin=strict)

    return go


def run_process(args: list[bytes | str], env: dict[str, str], stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llama_offload.cli.main", *args]
    p = subprocess.run(cmd, input=stdin or b"", capture_output=True, env=env, cwd=REPO, timeout=120)
    p.stdout, p.stderr = (p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))
    return p


def refused(p: Any, *fragments: str) -> str:
    assert p.returncode == 1, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    for fragment in fragments:
        assert fragment in p.stderr, p.stderr
    assert "loaded in" not in p.stderr  # refused before the model was loaded
    return p.stderr


def test_complete_stdin_line(tiny_ckpt: Path, run) -> None:
    p = run(["complete", "--ckpt_dir", str(tiny_ckpt)], stdin=b"The sea is\n\n" + LATIN1 + b"\n")
    refused(p, "llama-offload: error: stdin line 3 is not valid UTF-8: byte 0xe9", HINT)


def test_complete_argument_in_a_subprocess(tiny_ckpt: Path, env: dict[str, str]) -> None:
    # The raw bytes reach a real interpreter's argv: Python's own decoding, then ours.
    p = run_process(["complete", "The sea is", LATIN1, "--ckpt_dir", str(tiny_ckpt)], env)
    refused(p, "llama-offload: error: argument 2 is not valid UTF-8: byte 0xe9 at character 3", HINT)


def test_complete_stdin_under_a_strict_locale(tiny_ckpt: Path, run) -> None:
    # Under most UTF-8 locales stdin decodes strictly: the same message, not a UnicodeDecodeError.
    p = run(["complete", "--ckpt_dir", str(tiny_ckpt)], stdin=LATIN1 + b"\n", strict=True)
    refused(p, "stdin line 1 is not valid UTF-8: byte 0xe9")


def test_tokenize_text(tiny_ckpt: Path, run) -> None:
    p = run(["tokenize", "--ckpt_dir", str(tiny_ckpt), "--text", LATIN1])
    refused(p, "llama-offload: error: --text is not valid UTF-8: byte 0xe9", HINT)
    dialog = b'[{"role": "user", "content": "' + LATIN1 + b'"}]'
    p = run(["tokenize", "--ckpt_dir", str(tiny_ckpt), "--dialog", dialog])
    refused(p, "--dialog message 0 content is not valid UTF-8")


@pytest.mark.parametrize("strict", [False, True])
def test_chat_repl_goes_on_after_a_bad_line(tiny_ckpt: Path, run, strict: bool) -> None:
    p = run(["chat", "--ckpt_dir", str(tiny_ckpt), "--max_gen_len", "4", "--temperature", "0"],
            stdin=LATIN1 + b"\nThe sea is\n/exit\n", strict=strict)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert "That line is not valid UTF-8: byte 0xe9 at character 3" in p.stdout
    assert "It was not sent; the conversation goes on." in p.stdout
    assert p.stdout.count("tokens/s") == 1  # the good line after it was answered


def test_version(run) -> None:
    p = run(["--version"])
    assert p.returncode == 0 and p.stdout == f"llama-offload {version()}\n", p
    assert version()[:1].isdigit()


# --- complete's hint for an empty completion from a chat model ---------------------------------------------


def _eos_model(ckpt: Path, tokenizer: Path, *, chat_format: Optional[str]) -> None:
    """A checkpoint whose greedy first token is always EOS (2): the blocks add nothing, every embedding is
    the same vector and only EOS's output row is not zero. Its completions are all empty."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    sd = random_state_dict(args, seed=0)
    for key in sd:
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[key].zero_()
    sd["tok_embeddings.weight"].fill_(1.0)
    sd["output.weight"].zero_()
    sd["output.weight"][2] = 1.0
    save_checkpoint(sd, args, ckpt)
    shutil.copy(tokenizer, ckpt / "tokenizer.model")
    if chat_format is not None:
        (ckpt / "llama_offload.json").write_text(json.dumps(
            {"format_version": 1, "chat_format": chat_format, "tokenizer": "tokenizer.model"}))


@pytest.mark.parametrize("chat_format", ["llama2", None])
def test_empty_completion_hint(tmp_path: Path, sp_tokenizer_path: Path, run,
                               chat_format: Optional[str]) -> None:
    ckpt = tmp_path / "eos"
    _eos_model(ckpt, sp_tokenizer_path, chat_format=chat_format)
    p = run(["complete", "What is the capital of France?", "--ckpt_dir", str(ckpt), "--temperature", "0",
             "--max_gen_len", "4"])
    assert p.returncode == 0, p.stderr
    assert "> \n" in p.stdout  # the completion is empty
    hint = "llama-offload: note: the completion came back empty: this is a chat model (chat format llama2)"
    if chat_format is None:  # a base model that stops at once: no chat model to point to
        assert "note: " not in p.stderr, p.stderr
    else:
        assert hint in p.stderr and f"`llama-offload chat --ckpt_dir {ckpt}`" in p.stderr, p.stderr


def test_empty_completion_hint_counts() -> None:
    chat = SimpleNamespace(options=None, tokenizer=SimpleNamespace(chat_template="{{ messages }}"))
    assert empty_completion_hint(chat, ["a", "b"]) is None
    hint = empty_completion_hint(chat, ["a", " ", ""])
    assert hint is not None and hint.startswith("2 of the 3 completions came back empty: this is a chat model, ")
    assert empty_completion_hint(SimpleNamespace(options=None, tokenizer=SimpleNamespace()), [""]) is None


# --- param_counts with a tied output head ------------------------------------------------------------------


def test_tied_head_counted_once() -> None:
    # SmolLM2-135M's shape: 134.5 M parameters, 162.8 M when the tied head is counted twice.
    args = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
                     ffn_dim_multiplier=None)
    untied, tied = param_counts(args), param_counts(args, tied=True)
    assert untied["total"] == untied["held"]
    assert tied["held"] == untied["total"]  # the checkpoint still holds both matrices
    assert untied["total"] - tied["total"] == args.vocab_size * args.dim
    with torch.device("meta"):
        model = Transformer(args)
    distinct = sum(p.numel() for name, p in model.named_parameters() if name != "output.weight")
    assert tied["total"] == distinct
