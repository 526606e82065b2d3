"""The tokenizer.json backend (HFTokenizer) on a tiny byte-level BPE vocabulary built here.

The vocabulary is given the way a GGUF file carries it (tokenizer.ggml.tokens / merges / token types),
so the same builder that converts GGUF files is what makes it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from llama_offload.convert.gguf import tokenizer_json_from_gguf
from llama_offload.text.tokenizer import SUPPORTED_FORMATS, HFTokenizer, Tokenizer, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few merges so that words of the tests become single tokens; each result joins the vocabulary in order.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ i", "Ġi s", "Ġ a", "u s", "e r", "a s", "s s",
          "Ġ P", "a r", "2 0", "T he", "Ċ Ċ", "r i", "Ġc a"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=None)
def byte_chars() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value, in byte order (its bytes_to_unicode table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def tiny_bpe_fields(*, pre: str = "smollm", add_bos: bool = False,
                    chat_template: str | None = CHATML_TEMPLATE) -> dict[str, Any]:
    """GGUF tokenizer metadata (as plain values) of a tiny SmolLM2-like vocabulary."""
    tokens = SPECIALS + list(byte_chars())
    merges = list(MERGES)
    for m in merges:
        left, right = m.split(" ")
        assert left in tokens and right in tokens and left + right not in tokens, m
        tokens.append(left + right)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
    }
    if chat_template is not None:
        fields["tokenizer.chat_template"] = chat_template
    return fields


def write_tiny_tokenizer(directory: Path, **kwargs: Any) -> Path:
    tokenizer_json, config = tokenizer_json_from_gguf(tiny_bpe_fields(**kwargs))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    t = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("bpe")))
    assert isinstance(t, HFTokenizer)
    return t


def ids_of(tok: HFTokenizer, pieces: list[str]) -> list[int]:
    out = [tok.token_to_id(p) for p in pieces]
    assert None not in out, pieces
    return out  # type: ignore[return-value]


def test_is_a_tokenizer(tok: HFTokenizer) -> None:
    assert isinstance(tok, Tokenizer)
    assert tok.n_words == len(tiny_bpe_fields()["tokenizer.ggml.tokens"]) == 3 + 256 + 20
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.add_bos is False
    assert tok.stop_ids == {0, 2}  # eos (<|im_end|>) and <|endoftext|>
    assert tok.chat_template == CHATML_TEMPLATE


# Golden ids, worked out by hand from the vocabulary: 0-2 specials, 3 + byte for byte tokens, then the
# merge results from 259 on (Ġt=259, he=260, Ġthe=261, Ġc=262, at=263, Ġcat=264, Ġi=265, Ġis=266, ...).
GOLDEN = [
    ("The cat is", ["The", "Ġcat", "Ġis"], [275, 264, 266]),
    ("the cat", ["t", "he", "Ġcat"], [119, 260, 264]),
    # Digits are split one by one before BPE (SmolLM's pre-tokenizer), so the "2 0" merge never fires.
    ("2024", ["2", "0", "2", "4"], [53, 51, 53, 55]),
    ("\n\n", ["ĊĊ"], [276]),
    ("é", ["Ã", "©"], [198, 172]),
]


@pytest.mark.parametrize(("text", "pieces", "ids"), GOLDEN)
def test_golden_ids(tok: HFTokenizer, text: str, pieces: list[str], ids: list[int]) -> None:
    assert ids_of(tok, pieces) == ids
    assert tok.encode(text, bos=False, eos=False) == ids
    assert tok.decode(ids) == text


def test_gpt2_pre_tokenizer_keeps_digit_runs(tmp_path: Path) -> None:
    gpt2 = load_tokenizer(write_tiny_tokenizer(tmp_path, pre="gpt-2"))
    assert gpt2.encode("2024", bos=False, eos=False) == ids_of(gpt2, ["20", "2", "4"])


def test_bos_only_when_the_model_uses_one(tok: HFTokenizer, tmp_path: Path) -> None:
    plain = tok.encode("the cat", bos=False, eos=False)
    assert tok.encode("the cat", bos=True, eos=False) == plain  # SmolLM2: add_bos_token false
    assert tok.encode("the cat", bos=True, eos=True) == plain + [tok.eos_id]
    with_bos = load_tokenizer(write_tiny_tokenizer(tmp_path, add_bos=True))
    assert with_bos.encode("the cat", bos=True, eos=False) == [1] + plain
    assert with_bos.encode("the cat", bos=False, eos=False) == plain


def test_bos_from_post_processor_without_config(tmp_path: Path) -> None:
    path = write_tiny_tokenizer(tmp_path, add_bos=True)
    (tmp_path / "tokenizer_config.json").unlink()
    t = load_tokenizer(path)
    assert (t.bos_id, t.add_bos, t.eos_id) == (1, True, 2)  # eos: the first end-of-turn special (<|im_end|>)
    assert t.chat_template is None


def test_special_text_is_not_a_special_token(tok: HFTokenizer) -> None:
    ids = tok.encode("<|im_end|>", bos=False, eos=False)
    assert tok.token_to_id("<|im_end|>") not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|im_end|>"


@pytest.mark.parametrize("text", ["The cat is here.", "  spaces\tand\nnew lines  ", "日本語 🙂 naïve", "", "x" * 50])
def test_round_trip(tok: HFTokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=False)
    assert all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == text


def test_decode_drops_special_tokens(tok: HFTokenizer) -> None:
    assert tok.decode([1] + tok.encode("the cat", bos=False, eos=True)) == "the cat"


def test_load_from_directory(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    # A Meta tokenizer.model beside it wins, as it always has, unless llama_offload.json says otherwise.
    (tmp_path / "tokenizer.model").write_bytes(sp_tokenizer_path.read_bytes())
    assert not isinstance(load_tokenizer(tmp_path), HFTokenizer)
    (tmp_path / "llama_offload.json").write_text(json.dumps({"format_version": 1, "tokenizer": "tokenizer.json"}))
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_missing_in_directory_names_both(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_json_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"dim": 64}')
    with pytest.raises(ValueError, match="tokenizers library") as exc:
        load_tokenizer(bad)
    assert str(bad) in str(exc.value) and "Supported formats" in str(exc.value)


def test_config_naming_a_token_not_in_vocab(tmp_path: Path) -> None:
    path = write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="'</s>'.*not in the vocabulary"):
        load_tokenizer(path)


def test_generation_config_adds_stop_ids(tmp_path: Path) -> None:
    path = write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert load_tokenizer(path).stop_ids == {0, 1, 2}


def test_supported_formats_mention_both() -> None:
    text = " ".join(SUPPORTED_FORMATS)
    assert "SentencePiece" in text and "tokenizer.json" in text


def test_unsupported_pre_tokenizer_is_named() -> None:
    with pytest.raises(ValueError, match="'qwen2'.*smollm"):
        tokenizer_json_from_gguf(tiny_bpe_fields(pre="qwen2"))


def test_sentencepiece_vocab_in_gguf_is_refused() -> None:
    fields = tiny_bpe_fields()
    fields["tokenizer.ggml.model"] = "llama"
    with pytest.raises(ValueError, match="'llama'.*'gpt2'"):
        tokenizer_json_from_gguf(fields)
