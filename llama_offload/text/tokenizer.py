"""Tokenizers for Meta-format LLaMA checkpoints.

Every backend exposes the same small interface (:class:`Tokenizer`) so that the
model, the chat formats and generation never need to know which file format the
vocabulary came from. Three backends exist: SentencePiece (Llama 1/2
``tokenizer.model``), tiktoken (Llama 3.x ``tokenizer.model``, a text file of
base64 tokens and ranks) and Hugging Face ``tokenizers`` (``tokenizer.json``:
byte-level BPE models such as SmolLM2, converted from GGUF or copied from a
Hugging Face model). :func:`load_tokenizer` picks one from the file's content.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional, Protocol, Sequence, runtime_checkable

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from llama_offload.checkpoint.meta import read_checkpoint_meta  # no torch: the tokenizer does not need it
from llama_offload.text.text_input import check_text

__all__ = [
    "BUNDLED_CORPUS_PATH",
    "DEFAULT_TOKENIZER_FILENAME",
    "HF_SIDECAR_FILENAMES",
    "HF_TOKENIZER_FILENAME",
    "HFTokenizer",
    "LLAMA3_PAT_STR",
    "LLAMA3_SPECIAL_TOKENS",
    "MAX_NO_WHITESPACES_CHARS",
    "SUPPORTED_FORMATS",
    "SentencePieceTokenizer",
    "TIKTOKEN_MAX_ENCODE_CHARS",
    "TiktokenTokenizer",
    "Tokenizer",
    "check_vocab_size",
    "tokenizer_copy_files",
    "tokenizer_file",
    "detect_tokenizer_format",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "train_sentencepiece",
]

# Meta ships the tokenizer next to the checkpoint folders under this name.
DEFAULT_TOKENIZER_FILENAME = "tokenizer.model"
# Hugging Face's name for a `tokenizers` file; GGUF conversion writes one too.
HF_TOKENIZER_FILENAME = "tokenizer.json"
# Files a tokenizer.json is read with (HFTokenizer), copied along with it when a checkpoint is written.
HF_SIDECAR_FILENAMES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Small original English text shipped with the package, enough to train a tiny
# vocabulary for tests and for the toy default model without any download.
BUNDLED_CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "corpus.txt"

# Shown in error messages; extend when a new backend is added to load_tokenizer.
SUPPORTED_FORMATS: tuple[str, ...] = (
    "SentencePiece model (tokenizer.model, as shipped with Llama 1/2)",
    "tiktoken BPE ranks (tokenizer.model, as shipped with Llama 3.x: one line per token, "
    "'<base64 bytes> <rank>')",
    "Hugging Face tokenizers JSON (tokenizer.json, as written by `llama-offload convert` or shipped with a "
    "Hugging Face model), with its tokenizer_config.json beside it when there is one",
)


# How encode() names its input in the error for text that is not valid Unicode (see text_input.py): the
# callers check their input where it enters, naming its source; this is the last line of defence.
_ENCODE_INPUT = "The text to encode"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the package relies on from any tokenizer backend."""

    n_words: int
    bos_id: int
    eos_id: int
    # -1 when the vocabulary has no padding token (true for Llama 2).
    pad_id: int
    # Generation stops at any of these; a set because Llama 3 style vocabularies
    # have several end-of-turn tokens, even though Llama 2 only uses eos.
    # Treat it as read-only.
    stop_ids: set[int]

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """SentencePiece backend, token-for-token compatible with Meta's llama/tokenizer.py."""

    def __init__(self, model_path: str | Path, *, data: Optional[bytes] = None) -> None:
        """``data``: the file's bytes, when the caller has read them already (load_tokenizer reads a file once)."""
        self.model_path = Path(model_path)
        self.sp_model = SentencePieceProcessor()
        # Load() raises a bare RuntimeError/OSError that does not say what went
        # wrong; load_tokenizer() wraps it with an actionable message.
        if data is None:
            self.sp_model.Load(os.fspath(self.model_path))
        else:
            self.sp_model.LoadFromSerializedProto(data)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.stop_ids: set[int] = {self.eos_id}
        # Meta asserts this too: the embedding table is sized by n_words, so the
        # two counts must agree or ids would index past the table.
        assert self.sp_model.vocab_size() == self.sp_model.get_piece_size()

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        check_text(s, _ENCODE_INPUT)  # no bytes, no surrogates: the backend would fail on them obscurely
        t: list[int] = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, ids: Sequence[int]) -> str:
        # sentencepiece only accepts plain Python ints (not numpy/torch scalars).
        return self.sp_model.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({os.fspath(self.model_path)!r}, n_words={self.n_words})"


# Special tokens that end a turn or a document in the byte-level BPE vocabularies we know of (ChatML,
# GPT-2/StarCoder/SmolLM, Llama 3). Generation stops at any of them that the vocabulary has as a special
# token: a model that emits one is done, whichever of them its tokenizer_config calls "eos".
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e}); restore it from the model's files.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} should hold a JSON object, found {type(data).__name__}.")
    return data


def _token_content(value: Any) -> Optional[str]:
    # tokenizer_config.json spells a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """Hugging Face ``tokenizers`` backend for ``tokenizer.json`` files (byte-level BPE and others).

    The special tokens come from ``tokenizer_config.json`` beside the file when there is one (Hugging Face's
    layout, and what GGUF conversion writes), else from what the file itself adds (its post-processor)
    and the usual end-of-turn tokens.

    Decisions that differ from a plain ``tokenizers`` call, and why:

    - ``encode(s, bos=True)`` adds ``bos_id`` only when the model adds one (``add_bos``): SmolLM2, like
      other GPT-2 style models, is trained without a BOS, and llama.cpp (``tokenizer.ggml.add_bos_token``)
      and Hugging Face (``add_bos_token`` / the post-processor) both leave it out. ``eos=True`` always
      appends ``eos_id``: callers only ask for it to close a finished turn.
    - Text never turns into special tokens: ``"<|im_end|>"`` typed by a user is encoded as plain text,
      as SentencePiece and Meta's Llama 3 tokenizer do. Chat formats insert special tokens by id.
    - ``pad_id`` is -1. Generation uses pad_id to mark "no token here" in its token buffer, so it must
      never appear in a prompt; the files' pad token (SmolLM2: ``<|im_end|>``) appears in every chat.
    - ``decode`` drops special tokens, as SentencePiece drops its control tokens.
    """

    def __init__(self, path: str | Path, *, data: Optional[bytes] = None) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:  # a dependency, but keep the message actionable if it was left out
            raise ImportError("Reading tokenizer.json needs the `tokenizers` package: pip install tokenizers") from e
        self.path = Path(path)
        # from_file raises a bare Exception on a bad file; load_tokenizer() turns it into a clear one.
        self._tok = (_Tokenizer.from_file(os.fspath(self.path)) if data is None
                     else _Tokenizer.from_str(data.decode("utf-8")))
        self._tok.encode_special_tokens = True
        config = _read_sidecar(self.path.parent / "tokenizer_config.json")
        generation = _read_sidecar(self.path.parent / "generation_config.json")

        vocab = self._tok.get_vocab(with_added_tokens=True)
        # The embedding table must cover the largest id, even if the file leaves holes.
        self.n_words: int = max(vocab.values()) + 1 if vocab else 0
        added = self._tok.get_added_tokens_decoder()
        self._specials = {t.content: i for i, t in added.items() if t.special}
        self.chat_template: Optional[str] = self._chat_template(config.get("chat_template"))

        # What the file's own post-processor puts before a sequence: its BOS, if it has one.
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []

        self.bos_id: int = self._config_token(config, "bos_token")
        if self.bos_id < 0 and len(prefix) == 1:
            self.bos_id = prefix[0]
        add_bos = config.get("add_bos_token")
        self.add_bos: bool = bool(add_bos) if isinstance(add_bos, bool) else len(prefix) == 1
        if self.add_bos and self.bos_id < 0:
            raise ValueError(f"{os.fspath(self.path)!r}: the tokenizer is set to add a BOS token but does not say "
                             "which one; set bos_token in tokenizer_config.json beside it.")

        gen_eos = generation.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
        ends = [self._specials[t] for t in END_OF_TURN_TOKENS if t in self._specials]
        self.eos_id: int = self._config_token(config, "eos_token")
        if self.eos_id < 0:
            candidates = gen_eos_ids + ends
            if not candidates:
                raise ValueError(
                    f"{os.fspath(self.path)!r}: cannot tell which token ends a sequence: there is no "
                    "tokenizer_config.json beside it naming eos_token, and none of the special tokens "
                    f"{list(END_OF_TURN_TOKENS)} is in the vocabulary. Put the model's tokenizer_config.json next to it."
                )
            self.eos_id = candidates[0]
        self.pad_id: int = -1
        self.stop_ids: set[int] = {self.eos_id, *gen_eos_ids, *ends}

    @staticmethod
    def _chat_template(value: Any) -> Optional[str]:
        if isinstance(value, list):  # newer configs: [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
            value = named.get("default")
        return value if isinstance(value, str) else None

    def _config_token(self, config: dict[str, Any], key: str) -> int:
        content = _token_content(config.get(key))
        if content is None:
            return -1
        token_id = self._tok.token_to_id(content)
        if token_id is None:
            raise ValueError(
                f"tokenizer_config.json beside {os.fspath(self.path)!r} names {key} {content!r}, which is not in "
                "the vocabulary. The two files come from different models: use the pair shipped together."
            )
        return token_id

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a vocabulary entry (e.g. a special token such as ``<|im_start|>``), None if absent."""
        return self._tok.token_to_id(token)

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        check_text(s, _ENCODE_INPUT)  # no bytes, no surrogates: the backend would fail on them obscurely
        t: list[int] = self._tok.encode(s, add_special_tokens=False).ids
        if bos and self.add_bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({os.fspath(self.path)!r}, n_words={self.n_words})"


# --- Llama 3 (tiktoken) ---------------------------------------------------------------------------------
# All of this is Meta's llama_models/llama3/tokenizer.py (llama-models 0.3.0, the code that ships with the
# tokenizer.model file), so that ids match Meta's token for token.

# The pre-tokenizer split, verbatim: any change moves token boundaries and so changes ids.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# tiktoken panics (pyo3_runtime.PanicException) on longer inputs, so Meta encodes in pieces of this size...
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ...and cuts runs of whitespace or non-whitespace longer than this, whose regex matching is quadratic
# (https://github.com/openai/tiktoken/issues/195).
MAX_NO_WHITESPACES_CHARS = 25_000

_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",  # Llama 3.2 Vision
)
# Releases named some of these ids differently (Llama 3.0 had reserved tokens where 3.1 has <|eom_id|> and
# <|python_tag|>, 3.1 a reserved token where 3.2 has <|image|>); the ids, and so the model's view, are the same.
# The 256 special tokens, in id order from the first id after the BPE ranks (128000 for Llama 3).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _LLAMA3_NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED_SPECIALS))
)

# "<base64 of the token's bytes> <rank>": a line of a tiktoken file.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def read_tiktoken_ranks(path: str | Path, data: Optional[bytes] = None) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file: one ``<base64 token> <rank>`` per line, ranks 0..n-1.

    Stricter than Meta's loader, which logs and skips lines it cannot parse: a damaged file would then load
    with shifted special-token ids and give wrong answers without a word.
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    if data is None:
        data = path.read_bytes()
    lines = data.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        line = line.strip()
        if not _TIKTOKEN_LINE.fullmatch(line):
            raise ValueError(
                f"{os.fspath(path)!r} line {lineno}: expected '<base64 token> <rank>', found {line[:80]!r}. "
                "The file is damaged or not a tiktoken tokenizer; use the tokenizer.model of the checkpoint."
            )
        token, rank = line.split(b" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except binascii.Error as e:
            raise ValueError(f"{os.fspath(path)!r} line {lineno}: bad base64 token {token[:80]!r} ({e}).") from None
    if not ranks:
        raise ValueError(f"{os.fspath(path)!r} holds no tokens.")
    # Special tokens take the ids right after the ranks, so the ranks must be exactly 0..n-1.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{os.fspath(path)!r}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1} each once "
            "(a token or a rank is repeated or missing). The file is damaged; use the checkpoint's own."
        )
    return ranks


def _split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Meta's split of ``s`` into pieces without a run of more than ``max_consecutive_slice_len``
    whitespace or non-whitespace characters, where each cut falls."""
    if len(s) <= max_consecutive_slice_len:  # no run can be too long: skip the per-character loop
        yield s
        return
    current_slice_len = 0
    current_slice_is_space = s[0].isspace()
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


class TiktokenTokenizer:
    """tiktoken backend for Llama 3.x's ``tokenizer.model``, token-for-token Meta's llama3 ``Tokenizer``.

    The special tokens are Llama 3's 256 (``LLAMA3_SPECIAL_TOKENS``), with ids from the number of BPE ranks
    on (128000..128255 for the real file: ``n_words`` 128256). Where it differs from Meta's class, and why:

    - ``pad_id`` is -1 (Meta's is ``<|finetune_right_pad_id|>``): generation uses pad_id to mark "no token
      here" in its token buffer, so it must be an id no prompt holds, as in Meta's Llama 3 reference repo.
    - ``stop_ids`` is a set: ``eos_id``, ``<|eot_id|>`` and ``<|eom_id|>`` (Meta's ``stop_tokens``).

    As in Meta's, text never turns into special tokens (``"<|eot_id|>"`` in a message is plain text: chat
    formats insert special tokens by id), and ``decode`` writes special tokens out as their text.
    """

    special_tokens: dict[str, int]

    def __init__(self, model_path: str | Path, *, mergeable_ranks: Optional[dict[bytes, int]] = None,
                 data: Optional[bytes] = None) -> None:
        try:
            import tiktoken
        except ImportError as e:  # a dependency, but keep the message actionable if it was left out
            raise ImportError("Reading a Llama 3 tokenizer.model needs the `tiktoken` package: pip install tiktoken") from e
        self.model_path = Path(model_path)
        ranks = read_tiktoken_ranks(self.model_path, data) if mergeable_ranks is None else mergeable_ranks
        num_base_tokens = len(ranks)
        self.special_tokens = {token: num_base_tokens + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=self.model_path.name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._ranks = ranks
        self.n_words: int = num_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = -1
        self.stop_ids: set[int] = {self.eos_id, self.eot_id, self.eom_id}

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a special token (``<|eot_id|>``) or of a token whose UTF-8 bytes are one BPE rank; else None."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._ranks.get(token.encode("utf-8"))

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        check_text(s, _ENCODE_INPUT)  # no bytes, no surrogates: the backend would fail on them obscurely
        t: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for substr in _split_whitespaces_or_nonwhitespaces(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                               MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=(): special-token text is encoded as text, never refused.
                t.extend(self.model.encode(substr, allowed_special=set(), disallowed_special=()))
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"Cannot decode ids {bad[:5]}: this tokenizer's ids are 0..{self.n_words - 1}.")
        # Bytes that end mid-character come out as U+FFFD, which streaming relies on to wait for the rest.
        return self.model.decode(ids)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({os.fspath(self.model_path)!r}, n_words={self.n_words})"


def _supported_formats_text() -> str:
    return "; ".join(SUPPORTED_FORMATS)


def _tokenizer_in_dir(directory: Path) -> Path:
    # A converted checkpoint says which file to use; otherwise Meta's tokenizer.model comes first, so a
    # Meta download behaves as it always has, then Hugging Face's tokenizer.json.
    meta_path = directory / "llama_offload.json"
    if meta_path.is_file():
        name = read_checkpoint_meta(directory).get("tokenizer")
        if name:
            return directory / name
    for name in (DEFAULT_TOKENIZER_FILENAME, HF_TOKENIZER_FILENAME):
        if (directory / name).is_file():
            return directory / name
    return directory / DEFAULT_TOKENIZER_FILENAME  # reported as missing below


TokenizerFormat = Literal["sentencepiece", "tiktoken", "json"]


def detect_tokenizer_format(path: str | Path, head: Optional[bytes] = None) -> TokenizerFormat:
    """Which backend reads the file, from its first bytes (the name says nothing: Meta calls both the
    SentencePiece and the tiktoken file ``tokenizer.model``).

    ``"json"``: a JSON object (tokenizer.json). ``"tiktoken"``: a text line ``<base64> <rank>``.
    ``"sentencepiece"``: anything else, which should be a SentencePiece protobuf (binary; it starts with
    the tag of its first field, never with base64 text or ``{``).
    """
    if head is None:
        with Path(path).open("rb") as f:
            head = f.read(4096)
    head = head[:4096]
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "json"
    first_line = head.split(b"\n", 1)[0].strip()
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return "tiktoken"
    return "sentencepiece"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open the tokenizer stored at ``path``, choosing the backend from the file's content.

    A JSON file is read with Hugging Face ``tokenizers``, a text file of base64 tokens and ranks with
    tiktoken (Llama 3), anything else as a SentencePiece model (Llama 1/2); see
    :func:`detect_tokenizer_format`. ``path`` may also be a directory: the tokenizer named by its
    ``llama_offload.json``, else its ``tokenizer.model``, else its ``tokenizer.json`` is used (Meta's
    download layout puts ``tokenizer.model`` in the model's parent directory).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = _tokenizer_in_dir(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer file not found: expected {os.fspath(path)!r}. "
            f"Pass the path of the {DEFAULT_TOKENIZER_FILENAME} that was downloaded together "
            "with the checkpoint (Meta's download script places it next to the model folders), "
            f"or of the {HF_TOKENIZER_FILENAME} written by the conversion of a GGUF or Hugging Face model."
        )

    data = path.read_bytes()  # once: the format is told from its first bytes, and the backend reads the rest
    kind = detect_tokenizer_format(path, data)
    if kind == "json":
        try:
            return HFTokenizer(path, data=data)
        except ImportError:
            raise
        except ValueError as e:
            if os.fspath(path) in str(e):
                raise
            raise ValueError(f"{os.fspath(path)!r}: {e}") from e
        except Exception as e:  # tokenizers raises a bare Exception for files it cannot parse
            raise ValueError(
                f"{os.fspath(path)!r} is JSON but not a tokenizer file the Hugging Face tokenizers library can "
                f"read (it said: {e}). Supported formats: {_supported_formats_text()}."
            ) from e
    if kind == "tiktoken":
        # read_tiktoken_ranks names the file and the line in its errors.
        return TiktokenTokenizer(path, data=data)
    try:
        return SentencePieceTokenizer(path, data=data)
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{os.fspath(path)!r} is not a tokenizer this package can read "
            f"(it is neither JSON nor tiktoken text, and the SentencePiece loader said: {e}). "
            f"Supported formats: {_supported_formats_text()}."
        ) from e


def check_vocab_size(tokenizer: Tokenizer, vocab_size: int, *, source: str) -> None:
    """Fail early when a checkpoint was built for a different vocabulary.

    A mismatch would otherwise surface later as a shape error while loading the
    embedding table, or, worse, as garbage text. A negative ``vocab_size`` is
    Meta's params.json convention for "take it from the tokenizer" and passes.
    """
    if vocab_size < 0:
        return
    if vocab_size != tokenizer.n_words:
        path = tokenizer_file(tokenizer)
        which = f"the tokenizer {os.fspath(path)!r}" if path is not None else "the tokenizer"
        # Name the kind of file the user passed: "tokenizer.model" for a tokenizer.json would send them
        # looking for a file their model never had.
        shipped = f" (the {path.name} shipped with it)" if path is not None else ""
        raise ValueError(
            f"Vocabulary size mismatch: {source} says vocab_size={vocab_size}, but {which} "
            f"has {tokenizer.n_words} tokens. Use the tokenizer that came with this checkpoint{shipped}."
        )


def tokenizer_file(tokenizer: Tokenizer) -> Optional[Path]:
    """The file ``tokenizer`` was read from (tokenizer.model or tokenizer.json), None if it does not say."""
    path = getattr(tokenizer, "model_path", None) or getattr(tokenizer, "path", None)
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


def tokenizer_copy_files(tok: str | Path) -> tuple[str, dict[str, Path]]:
    """What a checkpoint written from the tokenizer file ``tok`` holds of it: the tokenizer's name there, and the
    files to copy (name -> source): a tokenizer.json with the files it is read with, when present beside it."""
    tok = Path(tok)
    if detect_tokenizer_format(tok) == "json":
        files = {HF_TOKENIZER_FILENAME: tok}
        files.update({n: tok.parent / n for n in HF_SIDECAR_FILENAMES if (tok.parent / n).is_file()})
        return HF_TOKENIZER_FILENAME, files
    return DEFAULT_TOKENIZER_FILENAME, {DEFAULT_TOKENIZER_FILENAME: tok}


def train_sentencepiece(text_path: str | Path, model_prefix: str | Path, vocab_size: int) -> Path:
    """Train a small Llama-2-style BPE SentencePiece model and return its ``.model`` path.

    Meant for tests and for building a tiny default model, not for real training.
    """
    text_path = Path(text_path)
    if not text_path.is_file():
        raise FileNotFoundError(f"Training text not found: {os.fspath(text_path)!r}")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    SentencePieceTrainer.Train(
        input=os.fspath(text_path),
        model_prefix=os.fspath(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        # Same special-token layout as Llama 2, so code exercised with the tiny
        # model behaves as it will with the real 32000-token vocabulary.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Any string must encode (unicode, emoji) even though the corpus is
        # English; unknown characters become their UTF-8 bytes as in Llama 2.
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Llama 2 does no normalisation, which keeps decode(encode(s)) == s.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        # Determinism: read every sentence in file order on one thread, so the
        # same corpus always gives the same vocabulary and the same ids.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=1_000_000,
        # The trainer is very chatty on stderr; only report errors.
        minloglevel=2,
    )
    return model_prefix.with_name(model_prefix.name + ".model")
