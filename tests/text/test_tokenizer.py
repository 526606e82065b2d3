from __future__ import annotations

from pathlib import Path

import pytest

from llama_offload.text.tokenizer import (
    BUNDLED_CORPUS_PATH, SentencePieceTokenizer, Tokenizer, check_vocab_size, load_tokenizer, train_sentencepiece,
)

TINY_VOCAB_SIZE = 512  # what the sp_tokenizer fixture in conftest.py trains

# Observed once from the deterministic trainer on assets/corpus.txt; if these
# change, either the corpus or the training options changed, and every golden id
# downstream (chat format, model tests) must be regenerated with them.
GOLDEN = [
    (
        "The capital of France is Paris.",
        True,
        True,
        [1, 311, 425, 280, 439, 477, 447, 281, 312, 289, 439, 475, 277, 368, 461, 2],
    ),
    (
        "Hello, world! 12345",
        True,
        False,
        [1, 439, 490, 314, 449, 444, 459, 402, 332, 510, 439, 474, 486, 491, 502, 482],
    ),
    (
        "Plants need light, water and soil.",
        False,
        True,
        [439, 475, 449, 281, 376, 395, 291, 361, 366, 459, 437, 274, 335, 304, 461, 2],
    ),
]

ROUND_TRIP = [
    "The capital of France is Paris.",
    "Hello, world!",
    "Digits: 0123456789 and 3.14159, 2024-11-21 at 09:15",
    "Ünïcödé café — naïve résumé",
    "日本語のテキスト and emoji 🙂🚀",
    "  leading spaces, tabs\tand\nnew lines  ",
    "def f(x):\n    return x * 2  # code",
    "",
]


def test_is_a_tokenizer(sp_tokenizer: Tokenizer) -> None:
    assert isinstance(sp_tokenizer, SentencePieceTokenizer)
    assert isinstance(sp_tokenizer, Tokenizer)


def test_special_ids_like_llama2(sp_tokenizer: Tokenizer) -> None:
    assert sp_tokenizer.n_words == TINY_VOCAB_SIZE == 512
    assert sp_tokenizer.bos_id == 1
    assert sp_tokenizer.eos_id == 2
    assert sp_tokenizer.pad_id == -1
    assert sp_tokenizer.stop_ids == {sp_tokenizer.eos_id}


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(sp_tokenizer: Tokenizer, text: str) -> None:
    ids = sp_tokenizer.encode(text, bos=False, eos=False)
    assert all(0 <= i < sp_tokenizer.n_words for i in ids)
    assert sp_tokenizer.decode(ids) == text
    # BOS/EOS are control tokens and must vanish from decoded text.
    assert sp_tokenizer.decode(sp_tokenizer.encode(text, bos=True, eos=True)) == sp_tokenizer.decode(ids)


def test_whitespace_is_preserved(sp_tokenizer: Tokenizer) -> None:
    # Identity normalisation (as in Llama 2) keeps runs of spaces, tabs and
    # newlines; the dummy-prefix space is removed again by decode.
    text = "  a  b\t\tc\n\nd   "
    assert sp_tokenizer.decode(sp_tokenizer.encode(text, bos=True, eos=True)) == text


def test_unknown_characters_use_byte_fallback(sp_tokenizer: Tokenizer) -> None:
    ids = sp_tokenizer.encode("🙂", bos=False, eos=False)
    assert 0 not in ids  # never <unk>
    assert sp_tokenizer.decode(ids) == "🙂"


@pytest.mark.parametrize(("text", "bos", "eos", "expected"), GOLDEN)
def test_golden_ids(sp_tokenizer: Tokenizer, text: str, bos: bool, eos: bool, expected: list[int]) -> None:
    assert sp_tokenizer.encode(text, bos=bos, eos=eos) == expected


def test_bos_eos_flags(sp_tokenizer: Tokenizer) -> None:
    text = "The capital of France is Paris."
    plain = sp_tokenizer.encode(text, bos=False, eos=False)
    assert plain and sp_tokenizer.bos_id not in plain and sp_tokenizer.eos_id not in plain
    assert sp_tokenizer.encode(text, bos=True, eos=False) == [sp_tokenizer.bos_id] + plain
    assert sp_tokenizer.encode(text, bos=False, eos=True) == plain + [sp_tokenizer.eos_id]
    assert sp_tokenizer.encode(text, bos=True, eos=True) == [sp_tokenizer.bos_id] + plain + [sp_tokenizer.eos_id]
    assert sp_tokenizer.encode("", bos=True, eos=True) == [sp_tokenizer.bos_id, sp_tokenizer.eos_id]


def test_decode_accepts_non_list_int_sequences(sp_tokenizer: Tokenizer) -> None:
    import numpy as np
    import torch

    ids = sp_tokenizer.encode("Paris", bos=False, eos=False)
    assert sp_tokenizer.decode(tuple(ids)) == "Paris"
    assert sp_tokenizer.decode(np.array(ids)) == "Paris"
    assert sp_tokenizer.decode(torch.tensor(ids).tolist()) == "Paris"
    assert sp_tokenizer.decode(list(torch.tensor(ids))) == "Paris"


def test_training_is_deterministic(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    a = load_tokenizer(train_sentencepiece(BUNDLED_CORPUS_PATH, tmp_path / "a" / "tok", TINY_VOCAB_SIZE))
    b = load_tokenizer(train_sentencepiece(BUNDLED_CORPUS_PATH, tmp_path / "b" / "tok", TINY_VOCAB_SIZE))
    for text in ROUND_TRIP + [g[0] for g in GOLDEN]:
        ids = sp_tokenizer.encode(text, bos=True, eos=True)
        assert a.encode(text, bos=True, eos=True) == ids
        assert b.encode(text, bos=True, eos=True) == ids
    assert isinstance(a, SentencePieceTokenizer) and isinstance(b, SentencePieceTokenizer)
    assert [a.sp_model.id_to_piece(i) for i in range(a.n_words)] == [
        b.sp_model.id_to_piece(i) for i in range(b.n_words)
    ]


def test_train_returns_model_path(sp_tokenizer_path: Path) -> None:
    assert sp_tokenizer_path.suffix == ".model"
    assert sp_tokenizer_path.is_file()


def test_load_from_directory(sp_tokenizer_path: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sp_tokenizer_path.read_bytes())
    assert load_tokenizer(tmp_path).n_words == TINY_VOCAB_SIZE


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as exc:
        load_tokenizer(missing)
    msg = str(exc.value)
    assert str(missing) in msg
    assert "tokenizer.model" in msg and "checkpoint" in msg


def test_missing_file_in_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"this is not a sentencepiece model\x00\xff\xfe", b"", b'{"model": {"type": "BPE"}}'],
    ids=["garbage", "empty", "json"],
)
def test_invalid_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        load_tokenizer(bad)
    msg = str(exc.value)
    assert str(bad) in msg
    assert "SentencePiece" in msg and "Supported formats" in msg


def test_check_vocab_size(sp_tokenizer: Tokenizer) -> None:
    check_vocab_size(sp_tokenizer, 512, source="params.json")
    # params.json from Meta uses -1 for "whatever the tokenizer has".
    check_vocab_size(sp_tokenizer, -1, source="params.json")
    with pytest.raises(ValueError) as exc:
        check_vocab_size(sp_tokenizer, 32000, source="consolidated.00.pth")
    msg = str(exc.value)
    assert "32000" in msg and "512" in msg
    assert "consolidated.00.pth" in msg
    assert "tokenizer that came with" in msg
