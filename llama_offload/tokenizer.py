"""Tokenizers for Meta-format LLaMA checkpoints.

Every backend exposes the same small interface (:class:`Tokenizer`) so that the
model, the chat formats and generation never need to know which file format the
vocabulary came from. Only SentencePiece (Llama 1/2 ``tokenizer.model``) exists
today; other backends plug in through :func:`load_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

__all__ = [
    "BUNDLED_CORPUS_PATH",
    "DEFAULT_TOKENIZER_FILENAME",
    "SUPPORTED_FORMATS",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab_size",
    "load_tokenizer",
    "train_sentencepiece",
]

# Meta ships the tokenizer next to the checkpoint folders under this name.
DEFAULT_TOKENIZER_FILENAME = "tokenizer.model"

# Small original English text shipped with the package, enough to train a tiny
# vocabulary for tests and for the toy default model without any download.
BUNDLED_CORPUS_PATH = Path(__file__).resolve().parent / "assets" / "corpus.txt"

# Shown in error messages; extend when a new backend is added to load_tokenizer.
SUPPORTED_FORMATS: tuple[str, ...] = ("SentencePiece model (tokenizer.model, as shipped with Llama 1/2)",)


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

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        self.sp_model = SentencePieceProcessor()
        # Load() raises a bare RuntimeError/OSError that does not say what went
        # wrong; load_tokenizer() wraps it with an actionable message.
        self.sp_model.Load(os.fspath(self.model_path))

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.stop_ids: set[int] = {self.eos_id}
        # Meta asserts this too: the embedding table is sized by n_words, so the
        # two counts must agree or ids would index past the table.
        assert self.sp_model.vocab_size() == self.sp_model.get_piece_size()

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode() expects a str, got {type(s).__name__}")
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


def _supported_formats_text() -> str:
    return "; ".join(SUPPORTED_FORMATS)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open the tokenizer stored at ``path``, choosing the backend from the file.

    ``path`` may also be a directory, in which case ``tokenizer.model`` inside it
    is used (Meta's download layout puts it in the model's parent directory).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DEFAULT_TOKENIZER_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer file not found: expected {os.fspath(path)!r}. "
            f"Pass the path of the {DEFAULT_TOKENIZER_FILENAME} that was downloaded together "
            "with the checkpoint (Meta's download script places it next to the model folders)."
        )

    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{os.fspath(path)!r} is not a tokenizer this package can read "
            f"(the SentencePiece loader said: {e}). Supported formats: {_supported_formats_text()}."
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
        raise ValueError(
            f"Vocabulary size mismatch: {source} says vocab_size={vocab_size}, but the tokenizer "
            f"has {tokenizer.n_words} tokens. Use the tokenizer that came with this checkpoint."
        )


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
