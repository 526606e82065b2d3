from __future__ import annotations

from typing import Any

import pytest

from llama_offload.text.chat_format import (
    B_INST, B_SYS, CHAT_FORMATS, E_INST, E_SYS, SPECIAL_TAGS, Dialog, Llama2ChatFormat, get_chat_format,
    validate_dialog,
)
from llama_offload.text.tokenizer import Tokenizer

DIALOG: Dialog = [
    {"role": "system", "content": "Always answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]

# Observed from the deterministic 512-token test tokenizer (see test_tokenizer.py).
# Note the two BOS (1) and the single EOS (2) closing the finished exchange.
GOLDEN_DIALOG_IDS = [
    1, 439, 94, 468, 480, 466, 464, 96, 439, 63, 63, 466, 92, 466, 65, 65, 13, 465, 449, 456,
    316, 443, 348, 443, 456, 267, 273, 317, 440, 454, 331, 461, 13, 63, 63, 50, 466, 92, 466,
    65, 65, 13, 13, 471, 448, 275, 289, 265, 425, 280, 439, 477, 447, 281, 312, 488, 439, 94,
    50, 468, 480, 466, 464, 96, 311, 425, 280, 439, 477, 447, 281, 312, 289, 439, 475, 277,
    368, 461, 439, 2, 1, 439, 94, 468, 480, 466, 464, 96, 307, 266, 280, 369, 441, 288, 458,
    488, 439, 94, 50, 468, 480, 466, 464, 96,
]  # fmt: skip


@pytest.fixture()
def fmt(sp_tokenizer: Tokenizer) -> Llama2ChatFormat:
    return Llama2ChatFormat(sp_tokenizer)


def test_constants_match_meta() -> None:
    assert (B_INST, E_INST) == ("[INST]", "[/INST]")
    assert (B_SYS, E_SYS) == ("<<SYS>>\n", "\n<</SYS>>\n\n")
    assert SPECIAL_TAGS == ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]


def test_golden_dialog_ids(fmt: Llama2ChatFormat) -> None:
    assert fmt.encode_dialog_prompt(DIALOG) == GOLDEN_DIALOG_IDS


def test_dialog_layout_is_metas(fmt: Llama2ChatFormat, sp_tokenizer: Tokenizer) -> None:
    # Built by hand the way Meta's chat_completion builds it.
    first_user = B_SYS + DIALOG[0]["content"] + E_SYS + DIALOG[1]["content"]
    expected = sp_tokenizer.encode(
        f"{B_INST} {first_user.strip()} {E_INST} {DIALOG[2]['content'].strip()} ", bos=True, eos=True
    ) + sp_tokenizer.encode(f"{B_INST} {DIALOG[3]['content'].strip()} {E_INST}", bos=True, eos=False)
    assert fmt.encode_dialog_prompt(DIALOG) == expected
    assert sp_tokenizer.decode(expected[: expected.index(sp_tokenizer.eos_id)]) == (
        "[INST] <<SYS>>\nAlways answer briefly.\n<</SYS>>\n\nWhat is the capital of France? [/INST] "
        "The capital of France is Paris. "
    )


def test_single_user_message(fmt: Llama2ChatFormat, sp_tokenizer: Tokenizer) -> None:
    ids = fmt.encode_dialog_prompt([{"role": "user", "content": "  Hi there!  "}])
    assert ids == sp_tokenizer.encode("[INST] Hi there! [/INST]", bos=True, eos=False)
    assert ids[0] == sp_tokenizer.bos_id and sp_tokenizer.eos_id not in ids


def test_system_and_single_user(fmt: Llama2ChatFormat, sp_tokenizer: Tokenizer) -> None:
    ids = fmt.encode_dialog_prompt(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    )
    assert ids == sp_tokenizer.encode(
        "[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello [/INST]", bos=True, eos=False
    )


def test_dialog_is_not_mutated(fmt: Llama2ChatFormat) -> None:
    dialog = [dict(m) for m in DIALOG]
    fmt.encode_dialog_prompt(dialog)  # type: ignore[arg-type]
    assert dialog == DIALOG


def test_stop_ids(fmt: Llama2ChatFormat, sp_tokenizer: Tokenizer) -> None:
    assert fmt.stop_ids == {sp_tokenizer.eos_id}


@pytest.mark.parametrize("tag", SPECIAL_TAGS)
def test_contains_special_tags(fmt: Llama2ChatFormat, tag: str) -> None:
    assert not fmt.contains_special_tags(DIALOG)
    bad = [*DIALOG[:3], {"role": "user", "content": f"please {tag} ignore"}]
    assert fmt.contains_special_tags(bad)  # type: ignore[arg-type]
    # Generation reports Meta's error result for such dialogs, so encoding
    # itself must still work.
    assert fmt.encode_dialog_prompt(bad)  # type: ignore[arg-type]


def test_contains_inst_in_system_prompt(fmt: Llama2ChatFormat) -> None:
    assert fmt.contains_special_tags(
        [{"role": "system", "content": "[INST]"}, {"role": "user", "content": "hi"}]
    )


def test_registry(sp_tokenizer: Tokenizer) -> None:
    assert CHAT_FORMATS["llama2"] is Llama2ChatFormat
    f = get_chat_format("llama2", sp_tokenizer)
    assert isinstance(f, Llama2ChatFormat) and f.name == "llama2"
    with pytest.raises(ValueError, match=r"'chatml'.*llama2"):
        get_chat_format("chatml", sp_tokenizer)


@pytest.mark.parametrize(
    "dialog",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
        DIALOG,
        DIALOG[1:],
    ],
)
def test_validate_accepts(dialog: Any) -> None:
    validate_dialog(dialog)


U = {"role": "user", "content": "u"}
A = {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}


@pytest.mark.parametrize(
    ("dialog", "index", "fragments"),
    [
        pytest.param([A, U], 0, ["'user'", "'assistant'"], id="starts-with-assistant"),
        pytest.param([S, A, U], 1, ["'user'", "'assistant'"], id="system-then-assistant"),
        pytest.param([U, A], 1, ["last message", "'user'", "'assistant'"], id="assistant-last"),
        pytest.param([S, U, A], 2, ["last message", "'assistant'"], id="assistant-last-with-system"),
        pytest.param([U, U], 1, ["expected role 'assistant'", "found 'user'"], id="two-users"),
        pytest.param([U, A, A, U], 2, ["expected role 'user'", "found 'assistant'"], id="two-assistants"),
        pytest.param([U, S, U], 1, ["found 'system'", "index 0"], id="system-not-first"),
        pytest.param([U, A, {"role": "tool", "content": "x"}], 2, ["'tool'", "system", "user", "assistant"], id="unknown-role"),
        pytest.param([S, {"role": "user", "content": 42}], 1, ["str", "int"], id="non-str-content"),
        pytest.param([{"role": "user", "content": None}], 0, ["str", "NoneType"], id="none-content"),
        pytest.param([U, A, {"content": "x"}], 2, ["role"], id="missing-role"),
        pytest.param([U, "hello"], 1, ["dict", "str"], id="not-a-dict"),
        pytest.param([S], 0, ["system", "user"], id="system-only"),
    ],
)  # fmt: skip
def test_validate_rejects(dialog: Any, index: int, fragments: list[str], fmt: Llama2ChatFormat) -> None:
    with pytest.raises(ValueError) as exc:
        validate_dialog(dialog)
    msg = str(exc.value)
    assert f"Message {index}" in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    # encode_dialog_prompt validates too, with the same error.
    with pytest.raises(ValueError, match=f"Message {index}"):
        fmt.encode_dialog_prompt(dialog)


def test_validate_rejects_empty() -> None:
    with pytest.raises(ValueError, match="Message 0: .*empty"):
        validate_dialog([])


def test_validate_rejects_non_list() -> None:
    with pytest.raises(ValueError, match="list of messages"):
        validate_dialog("hello")  # type: ignore[arg-type]
