"""The Llama 3 tokenizer (TiktokenTokenizer) against Meta's real tokenizer.model, and format detection.

The real file ships in the PyPI wheel llama-models==0.3.0 (llama_models/llama3/tokenizer.model, 2.2 MB),
next to Meta's own tokenizer code. It is fetched once with ``pip download --no-deps`` into the pytest cache
(``.pytest_cache/d/llama3_tokenizer``), or taken from LLAMA_OFFLOAD_LLAMA3_TOKENIZER. Tests that need it
are skipped, with the reason, only when it cannot be had. Tests on a tiny tiktoken file made here need
nothing.

The helpers here are imported by other tests; the fixtures on them (the real file, a tiny one) are in tests/conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from llama_offload.text.tokenizer import (
    LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, MAX_NO_WHITESPACES_CHARS, SUPPORTED_FORMATS, TIKTOKEN_MAX_ENCODE_CHARS,
    HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, _split_whitespaces_or_nonwhitespaces,
    detect_tokenizer_format, load_tokenizer, read_tiktoken_ranks,
)
from test_tokenizer_json import byte_chars, write_tiny_tokenizer

LLAMA_MODELS = "llama-models==0.3.0"
WHEEL_DIR = "llama_models/"
TOKENIZER_MEMBER = "llama_models/llama3/tokenizer.model"
# Meta's code that ships with the file: the reference the ids are checked against.
REFERENCE_MEMBERS = ("llama_models/llama3/tokenizer.py", "llama_models/tokenizer_utils.py")
TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
ENV_VAR = "LLAMA_OFFLOAD_LLAMA3_TOKENIZER"


# --- getting the real file ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(cache: Path) -> None:
    """pip download the wheel and keep only the tokenizer and Meta's code for it."""
    wheels = cache / "wheel"
    wheels.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", LLAMA_MODELS,
         "-d", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )
    found = sorted(wheels.glob("llama_models-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"pip download {LLAMA_MODELS} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    with zipfile.ZipFile(found[0]) as whl:
        for member in (TOKENIZER_MEMBER, *REFERENCE_MEMBERS):
            target = cache / "ref" / member
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")
            tmp.write_bytes(whl.read(member))
            os.replace(tmp, target)  # a cut-off run never leaves a half file that looks complete
    for w in found:
        w.unlink()


def llama3_files(config: pytest.Config) -> Path:
    """The pytest-cache folder holding ref/llama_models/... (the tokenizer and Meta's code), fetched once."""
    cache = Path(config.cache.mkdir("llama3_tokenizer"))
    model = cache / "ref" / TOKENIZER_MEMBER
    if not (model.is_file() and _sha256(model) == TOKENIZER_SHA256):
        _download(cache)
        if _sha256(model) != TOKENIZER_SHA256:
            raise RuntimeError(f"{model} from {LLAMA_MODELS} has an unexpected sha256 {_sha256(model)}.")
    return cache


# The fixtures llama3_cache, llama3_tokenizer_path, llama3_tok (and tiny_tik below) are in tests/conftest.py, as
# other folders' tests use them; the download they rest on is here.


@pytest.fixture(scope="session")
def meta_tokenizer(llama3_cache: Path, llama3_tokenizer_path: Path):
    """Meta's own llama3 Tokenizer class, imported from the wheel's source, on the same file."""
    ref = llama3_cache / "ref"
    if not all((ref / m).is_file() for m in REFERENCE_MEMBERS):
        pytest.skip(f"Meta's tokenizer code from {LLAMA_MODELS} is not in {ref} (the tokenizer came from {ENV_VAR}).")
    # llama_models/__init__.py and llama3/__init__.py are not extracted: the namespace packages import only
    # the two modules, without the rest of llama-models' dependencies.
    # Another test may have imported a llama_models package from elsewhere (Meta's model code): set it aside.
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "llama_models" or m.startswith("llama_models.")}
    sys.path.insert(0, str(ref))
    try:
        module = importlib.import_module("llama_models.llama3.tokenizer")
    finally:
        sys.path.remove(str(ref))
        for m in [m for m in sys.modules if m == "llama_models" or m.startswith("llama_models.")]:
            del sys.modules[m]
        sys.modules.update(saved)
    return module.Tokenizer(llama3_tokenizer_path)


# --- a tiny tiktoken file ----------------------------------------------------------------------------------

TINY_MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"  ", b"12", b"123"]


def write_tiny_tiktoken(path: Path) -> Path:
    """A tiktoken file of the 256 bytes (rank = byte value) and a few merges after them."""
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


TINY_N_RANKS = 256 + len(TINY_MERGES)


# --- format detection --------------------------------------------------------------------------------------


def test_detects_all_three_kinds(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    tik = write_tiny_tiktoken(tmp_path / "tik" / "tokenizer.model")
    js = write_tiny_tokenizer(tmp_path / "json")
    assert detect_tokenizer_format(sp_tokenizer_path) == "sentencepiece"
    assert detect_tokenizer_format(tik) == "tiktoken"
    assert detect_tokenizer_format(js) == "json"
    assert isinstance(load_tokenizer(sp_tokenizer_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tik), TiktokenTokenizer)
    assert isinstance(load_tokenizer(js), HFTokenizer)
    # The name says nothing: each is recognised under any name, and through its directory.
    for src in (sp_tokenizer_path, tik):
        other = tmp_path / "renamed" / src.parent.name / "tokenizer.bin"
        other.parent.mkdir(parents=True)
        other.write_bytes(src.read_bytes())
        assert type(load_tokenizer(other)) is type(load_tokenizer(src))
    assert isinstance(load_tokenizer(tik.parent), TiktokenTokenizer)


def test_detects_the_real_file(llama3_tokenizer_path: Path) -> None:
    assert detect_tokenizer_format(llama3_tokenizer_path) == "tiktoken"


def test_supported_formats_name_tiktoken() -> None:
    text = " ".join(SUPPORTED_FORMATS)
    assert "SentencePiece" in text and "tiktoken" in text and "Llama 3" in text and "tokenizer.json" in text


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        pytest.param(b"IQ== 0\nIg== 1\nnot base64 at all\n", ["line 3", "base64"], id="bad-line"),
        pytest.param(b"IQ== 0\nIg== 0\n", ["ranks", "repeated or missing"], id="repeated-rank"),
        pytest.param(b"IQ== 0\nIg== 2\n", ["ranks", "0..1"], id="gap-in-ranks"),
        pytest.param(b"IQ== 0\nIQ== 1\n", ["repeated or missing"], id="repeated-token"),
        pytest.param(b"IQ= 0\n", ["line 1", "base64"], id="bad-padding"),
    ],
)
def test_damaged_tiktoken_file(tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        load_tokenizer(bad)
    msg = str(exc.value)
    assert str(bad) in msg, msg
    for frag in fragments:
        assert frag in msg, msg


def test_text_that_is_no_tokenizer(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_text("hello world\nthis is prose\n")
    with pytest.raises(ValueError, match="neither JSON nor tiktoken.*Supported formats"):
        load_tokenizer(bad)


# --- the tiny file: the layout, without any download ---------------------------------------------------------


def test_tiny_layout(tiny_tik: TiktokenTokenizer) -> None:
    assert isinstance(tiny_tik, Tokenizer)
    assert tiny_tik.n_words == TINY_N_RANKS + 256
    assert tiny_tik.bos_id == TINY_N_RANKS and tiny_tik.eos_id == TINY_N_RANKS + 1
    assert tiny_tik.special_tokens["<|eot_id|>"] == TINY_N_RANKS + 9
    assert tiny_tik.pad_id == -1
    assert tiny_tik.stop_ids == {TINY_N_RANKS + 1, TINY_N_RANKS + 8, TINY_N_RANKS + 9}
    assert tiny_tik.encode("hello world", bos=True, eos=True) == [
        tiny_tik.bos_id, 256 + TINY_MERGES.index(b"hello"), 256 + TINY_MERGES.index(b" world"), tiny_tik.eos_id
    ]
    assert tiny_tik.encode("12345", bos=False, eos=False) == [256 + TINY_MERGES.index(b"123"), ord("4"), ord("5")]
    assert tiny_tik.token_to_id("hello") == 256 + TINY_MERGES.index(b"hello")
    assert tiny_tik.token_to_id("<|start_header_id|>") == TINY_N_RANKS + 6
    assert tiny_tik.token_to_id("<|im_start|>") is None and tiny_tik.token_to_id("xyz") is None


@pytest.mark.parametrize("text", ["", "hello world", "日本語 🙂 naïve", "  a\n\n\tb  ", "<|eot_id|>"])
def test_tiny_round_trip(tiny_tik: TiktokenTokenizer, text: str) -> None:
    ids = tiny_tik.encode(text, bos=False, eos=False)
    assert all(0 <= i < TINY_N_RANKS for i in ids)  # never a special token
    assert tiny_tik.decode(ids) == text


def test_decode_rejects_ids_out_of_range(tiny_tik: TiktokenTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[-1\].*0\.\.%d" % (tiny_tik.n_words - 1)):
        tiny_tik.decode([104, -1])
    with pytest.raises(ValueError, match=str(tiny_tik.n_words)):
        tiny_tik.decode([tiny_tik.n_words])


def test_encode_rejects_non_str(tiny_tik: TiktokenTokenizer) -> None:
    with pytest.raises(TypeError, match="str"):
        tiny_tik.encode(b"hello", bos=False, eos=False)  # type: ignore[arg-type]


# --- Meta's chunking ---------------------------------------------------------------------------------------


def test_split_is_metas() -> None:
    assert list(_split_whitespaces_or_nonwhitespaces("", 3)) == [""]
    assert list(_split_whitespaces_or_nonwhitespaces("abc de", 3)) == ["abc de"]
    assert list(_split_whitespaces_or_nonwhitespaces("abcdefg  hi", 3)) == ["abc", "def", "g  hi"]
    assert list(_split_whitespaces_or_nonwhitespaces("a" + " " * 7 + "b", 3)) == ["a   ", "   ", " b"]
    n = MAX_NO_WHITESPACES_CHARS
    assert [len(p) for p in _split_whitespaces_or_nonwhitespaces("x" * (2 * n + 5), n)] == [n, n, 5]


def test_long_run_without_whitespace(tiny_tik: TiktokenTokenizer) -> None:
    text = "hello" * 6000  # 30,000 characters, no whitespace: cut at 25,000 as Meta does
    ids = tiny_tik.encode(text, bos=False, eos=False)
    assert tiny_tik.decode(ids) == text
    first, second = text[:MAX_NO_WHITESPACES_CHARS], text[MAX_NO_WHITESPACES_CHARS:]
    assert ids == tiny_tik.encode(first, bos=False, eos=False) + tiny_tik.encode(second, bos=False, eos=False)


# --- the real file -------------------------------------------------------------------------------------------

# Ids of Meta's Llama 3.x tokenizer.model (llama-models 0.3.0), from this backend; test_matches_meta and
# test_matches_hf_tokenizers check them against Meta's code and against an independent BPE implementation.
# "This is a test sentence." is also in Meta's own tests (llama3/tests/api/test_tokenizer.py).
GOLDEN = [
    ("Hello, world!", [9906, 11, 1917, 0]),
    ("The capital of France is Paris.", [791, 6864, 315, 9822, 374, 12366, 13]),
    ("1234567", [4513, 10961, 22]),  # digits in groups of at most three
    ("naïve café 日本語", [3458, 38672, 588, 53050, 105180, 102158]),
    ("This is a test sentence.", [2028, 374, 264, 1296, 11914, 13]),
    (" I'm here\n\n  x", [358, 2846, 1618, 271, 220, 865]),
    ("🙂", [9468, 19044]),
    ("<|eot_id|>", [27, 91, 68, 354, 851, 91, 29]),  # typed by a user: plain text, not 128009
]

ROUND_TRIP = [
    "Hello, world!",
    "Digits: 0123456789 and 3.14159, 2024-11-21 at 09:15",
    "Ünïcödé café — naïve résumé; Ελληνικά; русский; العربية",
    "日本語のテキスト and emoji 🙂🚀👩‍👩‍👧",
    "  leading spaces, tabs\tand\nnew lines  \r\n",
    "def f(x):\n    return x * 2  # code\n",
    "I'M SURE IT'S FINE, THEY'RE HERE, WE'LL SEE, YOU'D KNOW, I'VE GOT IT",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "",
]


def test_special_tokens_are_metas(llama3_tok: TiktokenTokenizer) -> None:
    assert llama3_tok.n_words == 128256
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 == len(set(LLAMA3_SPECIAL_TOKENS))
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|image|>": 128011, "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    for token, i in expected.items():
        assert llama3_tok.special_tokens[token] == i, token
        assert llama3_tok.token_to_id(token) == i
    assert (llama3_tok.bos_id, llama3_tok.eos_id, llama3_tok.pad_id) == (128000, 128001, -1)
    assert (llama3_tok.eot_id, llama3_tok.eom_id, llama3_tok.python_tag_id) == (128009, 128008, 128010)
    assert llama3_tok.stop_ids == {128001, 128008, 128009}


def test_special_tokens_match_metas_code(llama3_tok: TiktokenTokenizer, meta_tokenizer) -> None:
    assert llama3_tok.special_tokens == meta_tokenizer.special_tokens
    assert llama3_tok.n_words == meta_tokenizer.n_words
    assert llama3_tok.stop_ids == set(meta_tokenizer.stop_tokens)
    assert LLAMA3_PAT_STR == meta_tokenizer.pat_str
    module = type(meta_tokenizer).__init__.__globals__  # the module's namespace, wherever it was imported from
    assert (TIKTOKEN_MAX_ENCODE_CHARS, MAX_NO_WHITESPACES_CHARS) == (
        module["TIKTOKEN_MAX_ENCODE_CHARS"], module["MAX_NO_WHITESPACES_CHARS"])


@pytest.mark.parametrize(("text", "ids"), GOLDEN)
def test_golden_ids(llama3_tok: TiktokenTokenizer, text: str, ids: list[int]) -> None:
    assert llama3_tok.encode(text, bos=False, eos=False) == ids
    assert llama3_tok.encode(text, bos=True, eos=True) == [128000, *ids, 128001]
    assert llama3_tok.decode(ids) == text


def test_user_typed_special_tokens_stay_text(llama3_tok: TiktokenTokenizer) -> None:
    for token in ("<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|reserved_special_token_5|>"):
        ids = llama3_tok.encode(f"a {token} b", bos=False, eos=False)
        assert all(i < 128000 for i in ids), (token, ids)
        assert llama3_tok.decode(ids) == f"a {token} b"


def test_decode_writes_special_tokens_out_like_meta(llama3_tok: TiktokenTokenizer) -> None:
    # Meta's own test: decode keeps special tokens as text.
    assert llama3_tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )


def test_decode_of_a_partial_character(llama3_tok: TiktokenTokenizer) -> None:
    ids = llama3_tok.encode("🙂", bos=False, eos=False)
    assert llama3_tok.decode(ids[:1]).endswith("\ufffd")  # streaming waits for the rest of the character


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(llama3_tok: TiktokenTokenizer, text: str) -> None:
    ids = llama3_tok.encode(text, bos=False, eos=False)
    assert all(0 <= i < 128000 for i in ids)
    assert llama3_tok.decode(ids) == text


def _long_inputs() -> dict[str, str]:
    words = "The quick brown fox jumps over the lazy dog; 1234 naïve 日本語 🙂.\n"
    return {
        "30k-no-whitespace": "x1y2z3é" * (30_000 // 7 + 1),
        "60k-whitespace-run": "a" + " " * 60_000 + "b",
        "410k-text": words * (410_000 // len(words) + 1),  # more than one TIKTOKEN_MAX_ENCODE_CHARS piece
    }


@pytest.mark.parametrize("name", list(_long_inputs()))
def test_long_inputs_round_trip(llama3_tok: TiktokenTokenizer, name: str) -> None:
    text = _long_inputs()[name]
    ids = llama3_tok.encode(text, bos=False, eos=False)
    assert max(ids) < 128000
    assert llama3_tok.decode(ids) == text


def test_matches_meta(llama3_tok: TiktokenTokenizer, meta_tokenizer) -> None:
    """Meta's Tokenizer class (llama-models 0.3.0) gives the same ids, chunking of long inputs included."""
    texts = [t for t, _ in GOLDEN] + ROUND_TRIP + list(_long_inputs().values())
    for text in texts:
        for bos, eos in ((False, False), (True, True)):
            assert llama3_tok.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(text, bos=bos, eos=eos), text[:50]
    ids = [128000, *GOLDEN[0][1], 128009, 128255]
    assert llama3_tok.decode(ids) == meta_tokenizer.decode(ids)
    for text in ["", "abc de", "abcdefg  hi", "a" + " " * 7 + "b", " \n\t xy\u3000z  "]:
        assert list(_split_whitespaces_or_nonwhitespaces(text, 3)) == list(
            meta_tokenizer._split_whitespaces_or_nonwhitespaces(text, 3)), text


def _hf_tokenizer_from_ranks(ranks: dict[bytes, int]):
    """The same vocabulary as a Hugging Face ``tokenizers`` BPE: a second, independent implementation.

    Merges are recovered from the ranks the way Hugging Face converts tiktoken files
    (transformers' TikTokenConverter): each token is the merge of two shorter tokens, ordered by its rank.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFRaw

    chars = byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = HFRaw(models.BPE({text(t): r for t, r in ranks.items()}, [(text(m[3]), text(m[4])) for m in merges],
                           ignore_merges=True))  # a piece that is a whole token is taken as is, as tiktoken does
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def test_matches_hf_tokenizers(llama3_tok: TiktokenTokenizer, llama3_tokenizer_path: Path) -> None:
    start = time.perf_counter()
    hf = _hf_tokenizer_from_ranks(read_tiktoken_ranks(llama3_tokenizer_path))
    assert time.perf_counter() - start < 60  # a hint if this ever becomes slow, not a benchmark
    texts = [t for t, _ in GOLDEN] + ROUND_TRIP + [_long_inputs()["30k-no-whitespace"][:20_000]]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == llama3_tok.encode(text, bos=False, eos=False), text[:50]
    for text, ids in GOLDEN:
        assert hf.decode(ids) == text
