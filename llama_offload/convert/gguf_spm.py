"""SentencePiece vocabularies in GGUF files (``tokenizer.ggml.model == "llama"``) back to a ``tokenizer.model``.

Why: most Llama 2 and Code Llama GGUFs (and Mistral's, which llama.cpp also calls ``llama``) carry the
vocabulary of Meta's SentencePiece ``tokenizer.model`` rather than a byte-level BPE one. llama.cpp's converter
copies each SentencePiece piece into ``tokenizer.ggml.tokens``, its score into ``tokenizer.ggml.scores`` and
its kind into ``tokenizer.ggml.token_type`` (the GGUF types are SentencePiece's own enum: 1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte). A SentencePiece BPE model *is* those pieces, scores and types
plus a normalizer, so writing them back as a ``ModelProto`` gives a ``tokenizer.model`` that the package's
existing :class:`~llama_offload.text.tokenizer.SentencePieceTokenizer` reads, with the same ids as the original
file and no GGUF needed at run time. The normalizer is Llama's: identity (no Unicode normalisation),
whitespace escaped to U+2581, runs of whitespace kept, and a leading space added unless the GGUF says
``tokenizer.ggml.add_space_prefix`` false.

The ``ModelProto`` is serialized here, with the protobuf wire format written out by hand (a few varints,
floats and strings), not through ``sentencepiece.sentencepiece_model_pb2``: that module needs the
``protobuf`` package, which is not a dependency of this one (``sentencepiece`` itself does not need it). The
field numbers are those of sentencepiece's ``sentencepiece_model.proto``; the tests check the bytes against
``sentencepiece_model_pb2`` where protobuf is installed, and every result is loaded by SentencePiece itself
before it is written.

What a SentencePiece file cannot say, and how it is handled:

- Which token a sequence starts or ends with is found by SentencePiece from the piece's *text* and *type*
  (``bos_id()`` is the id of ``trainer_spec.bos_piece`` if that piece is a control piece). The BOS and EOS
  tokens must therefore be control pieces: a GGUF that types them normal or user-defined has them made
  control (and says so); an unknown, byte or unused one is refused.
- There is no "add BOS" switch: the package's SentencePiece tokenizer, like Meta's Llama code, puts BOS
  before every prompt. ``add_bos_token`` false and ``add_eos_token`` true are reported, not followed.
- The padding token is kept only when it is a control token of its own; one that is also the unknown, BOS
  or EOS token (common in Llama 2 GGUFs: ``padding_token_id`` 0) becomes "no padding token" (-1), as in
  Meta's own ``tokenizer.model``. Nothing in this package pads with it.
"""

from __future__ import annotations

import math
import numbers
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from llama_offload.text.tokenizer import SentencePieceTokenizer

__all__ = [
    "GGUF_TOKEN_TYPES",
    "sentencepiece_chat_format",
    "sentencepiece_model_from_gguf",
]

# GGUF token type (llama.cpp's llama_token_type) -> name; the numbers are SentencePiece's piece types.
GGUF_TOKEN_TYPES: dict[int, str] = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused",
                                    6: "byte"}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# SentencePiece keeps two maps: text pieces (normal, user-defined, unused) and reserved ones (unknown,
# control, byte). A text may appear once in each, never twice in the same one.
_RESERVED = (_UNKNOWN, _CONTROL, _BYTE)
_BPE = 2  # TrainerSpec.ModelType.BPE

# llama.cpp's defaults for SentencePiece ("llama") vocabularies when a GGUF names no id: Llama 2's layout.
_DEFAULT_IDS = {"unknown": 0, "bos": 1, "eos": 2}

# Field numbers of sentencepiece_model.proto.
_MODEL_PIECES, _MODEL_TRAINER_SPEC, _MODEL_NORMALIZER_SPEC = 1, 2, 3
_PIECE_PIECE, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_UNK_ID, _TRAINER_BOS_ID, _TRAINER_EOS_ID, _TRAINER_PAD_ID = 40, 41, 42, 43
_TRAINER_UNK_PIECE, _TRAINER_BOS_PIECE, _TRAINER_EOS_PIECE, _TRAINER_PAD_PIECE = 45, 46, 47, 48
_NORM_NAME, _NORM_ADD_DUMMY_PREFIX, _NORM_REMOVE_EXTRA_WHITESPACES, _NORM_ESCAPE_WHITESPACES = 1, 3, 4, 5

_FIX = ("The file's vocabulary is damaged or was not written by llama.cpp's converter; convert the model from "
        "Meta's download or its Hugging Face directory (which have the tokenizer.model itself) instead.")


# --- protobuf wire format ------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as their 64-bit two's complement (10 bytes)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:  # int32, enum and bool: wire type 0
    return _varint(number << 3) + _varint(int(value))


def _float_field(number: int, value: float) -> bytes:  # float: wire type 5, little-endian IEEE single
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _bytes_field(number: int, value: bytes) -> bytes:  # string, bytes and sub-messages: wire type 2
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _str_field(number: int, value: str) -> bytes:
    return _bytes_field(number, value.encode("utf-8"))


# --- the vocabulary ------------------------------------------------------------------------------------

def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"  # SentencePiece's name for a byte piece (and the only one it accepts)


_BYTE_PIECES = {_byte_piece(b): b for b in range(256)}


def _vocab(fields: Mapping[str, Any], source: str) -> tuple[list[str], list[float], list[int]]:
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens: it does not carry its vocabulary. {_FIX}")
    tokens = list(tokens)
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError(
            f"{source} has a SentencePiece vocabulary (tokenizer.ggml.model 'llama') without tokenizer.ggml.scores. "
            "A SentencePiece BPE vocabulary needs one score per token (the scores decide which pieces merge "
            f"first); without them the text would be split differently from the model's training. {_FIX}"
        )
    types = fields.get("tokenizer.ggml.token_type")
    if types is None:
        raise ValueError(
            f"{source} has a SentencePiece vocabulary without tokenizer.ggml.token_type: which tokens are the "
            f"unknown, control and byte tokens cannot be told. {_FIX}"
        )
    scores, types = list(scores), list(types)
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(
            f"{source}: the vocabulary fields differ in length: {len(tokens)} tokenizer.ggml.tokens, {len(scores)} "
            f"tokenizer.ggml.scores and {len(types)} tokenizer.ggml.token_type; each should have one entry per "
            f"token. {_FIX}"
        )
    for i, (tok, score, kind) in enumerate(zip(tokens, scores, types)):
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"{source}: token {i} is {tok!r}; SentencePiece needs a non-empty text for every "
                             f"token. {_FIX}")
        if isinstance(kind, bool) or not isinstance(kind, numbers.Integral) or int(kind) not in GGUF_TOKEN_TYPES:
            known = ", ".join(f"{k} {v}" for k, v in GGUF_TOKEN_TYPES.items())
            raise ValueError(f"{source}: token {i} ({tok!r}) has token type {kind!r}, which a SentencePiece "
                             f"vocabulary does not have. Expected one of: {known}. {_FIX}")
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or math.isnan(score):
            raise ValueError(f"{source}: token {i} ({tok!r}) has the score {score!r}; expected a number. {_FIX}")
        if kind == _BYTE and tok not in _BYTE_PIECES:
            raise ValueError(f"{source}: token {i} ({tok!r}) is typed byte (6), but byte tokens are named <0x00> to "
                             f"<0xFF>. {_FIX}")
    return tokens, [float(s) for s in scores], [int(t) for t in types]


def _check_distinct(tokens: Sequence[str], types: Sequence[int], source: str) -> None:
    seen: dict[tuple[bool, str], int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        key = (kind in _RESERVED, tok)
        if key in seen:
            raise ValueError(f"{source}: token {tok!r} appears twice (ids {seen[key]} and {i}); a SentencePiece "
                             f"vocabulary maps each piece to one id. {_FIX}")
        seen[key] = i


def _token_id(fields: Mapping[str, Any], name: str, n: int, source: str, *, required: bool) -> Optional[int]:
    key = f"tokenizer.ggml.{name}_token_id"
    value = fields.get(key, _DEFAULT_IDS.get(name))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < n:
        if not required:
            return None
        raise ValueError(f"{source}: {key} is {value!r}, which is not a token id (the vocabulary has ids 0..{n - 1}). "
                         f"{_FIX}")
    return int(value)


def _say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def sentencepiece_model_from_gguf(fields: Mapping[str, Any], source: str = "GGUF", *,
                                  say: Optional[Callable[[str], None]] = None) -> bytes:
    """A serialized SentencePiece ``ModelProto`` (the bytes of a ``tokenizer.model``) from GGUF tokenizer metadata.

    ``fields`` maps metadata keys to plain values, as ``convert_gguf`` reads them: ``tokenizer.ggml.tokens``,
    ``.scores``, ``.token_type``, the ``bos``/``eos``/``unknown``/``padding`` ``_token_id`` keys (llama.cpp's
    defaults 1, 2, 0 and none when absent), ``add_bos_token``, ``add_eos_token`` and ``add_space_prefix``.
    ``source`` names the file in errors. ``say`` receives notes on GGUF settings a SentencePiece model cannot
    express (default: printed to stderr).

    Why a ``tokenizer.model`` and not a ``tokenizer.json``: the pieces, scores and types *are* a SentencePiece
    BPE model, so writing them back gives the original file's ids exactly, through the SentencePiece library
    the package already uses for Meta's Llama 2 downloads. Raises ``ValueError`` naming the field for a
    vocabulary SentencePiece could not load or would tokenize differently (missing scores or types, fields of
    different lengths, unknown token types, duplicate or empty pieces, no unknown token, incomplete byte tokens).
    """
    say = say or _say
    model = fields.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only 'llama' (SentencePiece) vocabularies can "
                         "be written as a SentencePiece tokenizer.model.")
    tokens, scores, types = _vocab(fields, source)
    n = len(tokens)
    _check_distinct(tokens, types, source)

    unknown = [i for i, kind in enumerate(types) if kind == _UNKNOWN]
    if len(unknown) != 1:
        which = f"{len(unknown)} (ids {unknown[:5]})" if unknown else "none"
        raise ValueError(f"{source}: a SentencePiece vocabulary has exactly one token of type unknown (2), this one "
                         f"has {which}. {_FIX}")
    unk = unknown[0]
    named_unk = _token_id(fields, "unknown", n, source, required=False)
    if "tokenizer.ggml.unknown_token_id" in fields and named_unk != unk:
        raise ValueError(f"{source}: tokenizer.ggml.unknown_token_id is {fields['tokenizer.ggml.unknown_token_id']!r}, "
                         f"but the token of type unknown is {unk} ({tokens[unk]!r}). {_FIX}")

    byte_ids = {_BYTE_PIECES[tok]: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _BYTE}
    if byte_ids and len(byte_ids) != 256:
        missing = [_byte_piece(b) for b in range(256) if b not in byte_ids]
        raise ValueError(f"{source}: the vocabulary has {len(byte_ids)} byte tokens; byte fallback needs all 256, "
                         f"<0x00> to <0xFF> (missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}). "
                         f"{_FIX}")

    specials: dict[str, int] = {}
    for name in ("bos", "eos"):
        i = _token_id(fields, name, n, source, required=True)
        assert i is not None  # required, and llama.cpp's default applies when the key is absent
        if types[i] in (_NORMAL, _USER_DEFINED):
            say(f"{tokens[i]!r} (id {i}, the {name.upper()} token) is typed {GGUF_TOKEN_TYPES[types[i]]} in the GGUF; "
                "written as a control token, which SentencePiece needs for BOS/EOS (it is then never read out of "
                "the text, as other special tokens are not).")
            types[i] = _CONTROL
        elif types[i] != _CONTROL:
            raise ValueError(f"{source}: the {name.upper()} token (tokenizer.ggml.{name}_token_id {i}, {tokens[i]!r}) is "
                             f"typed {GGUF_TOKEN_TYPES[types[i]]}; it should be a control token (3). {_FIX}")
        specials[name] = i
    if specials["bos"] == specials["eos"]:
        raise ValueError(f"{source}: BOS and EOS are the same token ({specials['bos']}, {tokens[specials['bos']]!r}); "
                         f"SentencePiece models keep them apart. {_FIX}")
    pad = _token_id(fields, "padding", n, source, required=False)
    if pad is not None and (types[pad] != _CONTROL or pad in specials.values()):
        pad = None  # Llama 2 GGUFs often name <unk> (0); Meta's tokenizer.model has no padding token
    _check_distinct(tokens, types, source)  # again: a token made control may now clash with another

    if fields.get("tokenizer.ggml.add_bos_token", True) is False:
        say("the GGUF sets add_bos_token false, but a SentencePiece tokenizer.model cannot say so: prompts will "
            "start with BOS, as Meta's Llama code and llama.cpp's default for these vocabularies do.")
    if fields.get("tokenizer.ggml.add_eos_token", False) is True:
        say("the GGUF sets add_eos_token true, which is not followed: EOS is only put where a chat format ends "
            "a turn.")
    add_space_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(add_space_prefix, bool):
        raise ValueError(f"{source}: tokenizer.ggml.add_space_prefix is {add_space_prefix!r}; expected true or "
                         f"false. {_FIX}")

    out = bytearray()
    for tok, score, kind in zip(tokens, scores, types):
        piece = _str_field(_PIECE_PIECE, tok) + _float_field(_PIECE_SCORE, score) + _int_field(_PIECE_TYPE, kind)
        out += _bytes_field(_MODEL_PIECES, piece)
    trainer = (
        _int_field(_TRAINER_MODEL_TYPE, _BPE)
        + _int_field(_TRAINER_VOCAB_SIZE, n)
        + _int_field(_TRAINER_BYTE_FALLBACK, bool(byte_ids))
        + _int_field(_TRAINER_UNK_ID, unk)
        + _int_field(_TRAINER_BOS_ID, specials["bos"])
        + _int_field(_TRAINER_EOS_ID, specials["eos"])
        + _int_field(_TRAINER_PAD_ID, -1 if pad is None else pad)
        + _str_field(_TRAINER_UNK_PIECE, tokens[unk])
        + _str_field(_TRAINER_BOS_PIECE, tokens[specials["bos"]])
        + _str_field(_TRAINER_EOS_PIECE, tokens[specials["eos"]])
        + (b"" if pad is None else _str_field(_TRAINER_PAD_PIECE, tokens[pad]))
    )
    out += _bytes_field(_MODEL_TRAINER_SPEC, trainer)
    normalizer = (
        _str_field(_NORM_NAME, "identity")
        + _int_field(_NORM_ADD_DUMMY_PREFIX, add_space_prefix)
        + _int_field(_NORM_REMOVE_EXTRA_WHITESPACES, False)
        + _int_field(_NORM_ESCAPE_WHITESPACES, True)
    )
    out += _bytes_field(_MODEL_NORMALIZER_SPEC, normalizer)
    data = bytes(out)
    _check_loads(data, n, specials, source)
    return data


def _check_loads(data: bytes, n: int, specials: Mapping[str, int], source: str) -> None:
    """SentencePiece's own check of the model: it loads, with the vocabulary size and special ids meant."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{source}: SentencePiece cannot load the tokenizer.model built from the GGUF's vocabulary "
                         f"({e}). {_FIX}") from e
    got = (sp.get_piece_size(), sp.bos_id(), sp.eos_id())
    if got != (n, specials["bos"], specials["eos"]):  # the checks above should make this impossible
        raise RuntimeError(f"{source}: the SentencePiece model built from the GGUF has (size, bos, eos) {got}, "
                           f"expected {(n, specials['bos'], specials['eos'])}.")


def sentencepiece_chat_format(chat_format: Optional[str], *, say: Optional[Callable[[str], None]] = None
                              ) -> Optional[str]:
    """The chat format to record for a checkpoint with a SentencePiece tokenizer, given the detected one.

    Formats that insert special tokens by their text (``chatml``'s ``<|im_start|>``, Llama 3's headers) need
    ``token_to_id`` from the tokenizer, which the SentencePiece backend does not offer: recording one would
    give a checkpoint whose chat fails to start. Such a format is reported and recorded as null (the user can
    pick one by hand); ``llama2`` (Llama 2 chat GGUFs) and null pass unchanged.
    """
    if chat_format in (None, "llama2") or callable(getattr(SentencePieceTokenizer, "token_to_id", None)):
        return chat_format
    (say or _say)(f"the GGUF's chat template is {chat_format!r}, which this package's SentencePiece tokenizer cannot "
                  "build (it needs its special tokens by name); chat_format recorded as null.")
    return None
