"""Where every input text is decoded and checked: arguments, stdin lines, flags, REPL lines, dialogs.

Python decodes ``sys.argv`` (and, under a C/POSIX or C.UTF-8 locale, stdin) with the ``surrogateescape``
error handler: a byte that is not valid UTF-8 arrives as a lone surrogate ``\\udc80``..``\\udcff`` instead of
an error. Such a string goes on to fail deep inside a tokenizer ("TextInputSequence must be str", "Unable
to cast Python instance of type <class 'str'> to C++ type"), after the model has been loaded. A JSON
``"\\ud800"`` escape without its pair gives a lone surrogate too. Here each text is checked where it enters,
so the error says where it came from ("argument 2", "stdin line 3", "--text") and what to do about it.

Bytes are decoded here as UTF-8, strictly; nothing below (chat formats, tokenizers) ever sees bytes or
surrogates: the tokenizers call :func:`check_text` again as a last line of defence.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any, Optional

__all__ = [
    "TextInputError",
    "TextTypeError",
    "a_type",
    "check_dialog",
    "check_text",
    "check_texts",
    "decode_text",
    "read_lines",
    "read_stdin_lines",
    "tolerate_undecodable_stdin",
]

REENCODE_HINT = ("Give the text as UTF-8: re-encode it, e.g. with `iconv -f latin1 -t utf-8` for Latin-1 "
                 "text, or save the file as UTF-8.")


class TextInputError(ValueError):
    """An input text that is not valid Unicode (undecodable bytes, lone surrogates): a user error."""


class TextTypeError(TextInputError, TypeError):
    """Bytes, or no text at all, where text was expected: a TypeError for code that passed it, and still a
    TextInputError (a ValueError), so that a command shows it as one line."""


def a_type(value: object) -> str:
    """``"a str"``, ``"an int"``: the article and the type name of ``value``, for error messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _shown(text: str, limit: int = 60) -> str:
    # repr shows undecodable bytes as \udcXX; as \xXX they read as the bytes the user has in the file.
    raw = text.encode("utf-8", "surrogateescape") if _only_escaped_bytes(text) else None
    shown = repr(raw)[1:] if raw is not None else repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _only_escaped_bytes(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def _first_surrogate(text: str) -> Optional[int]:
    if text.isascii():  # the common case, at C speed
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:  # only surrogates cannot be encoded as UTF-8
        return e.start


def check_text(text: Any, where: str) -> str:
    """``text`` itself when it is a str that encodes as UTF-8; else a :class:`TextInputError` that names
    ``where`` it came from. Bytes are refused too: decode them with :func:`decode_text` first."""
    if isinstance(text, (bytes, bytearray)):
        raise TextTypeError(f"{where} arrived as bytes ({_shown_bytes(bytes(text))}); it must be decoded text "
                            "(a str). Decode it as UTF-8 first (llama_offload.text.text_input.decode_text).")
    if not isinstance(text, str):
        raise TextTypeError(f"{where} must be text (a str), found {a_type(text)}: {text!r}.")
    at = _first_surrogate(text)
    if at is None:
        return text
    char = text[at]
    if "\udc80" <= char <= "\udcff":  # surrogateescape: a byte the decoder could not read
        raw = text.encode("utf-8", "surrogateescape") if _only_escaped_bytes(text) else None
        what = f"byte 0x{ord(char) - 0xDC00:02x} at character {at}"
        if raw is not None:
            what += f" ({_shown_bytes(raw)})"
        raise TextInputError(f"{where} is not valid UTF-8: {what}. {REENCODE_HINT}")
    raise TextInputError(
        f"{where} holds a lone surrogate U+{ord(char):04X} at character {at} ({_shown(text)}), which is not text "
        "(a JSON \\uD800-\\uDFFF escape without its pair?). Write the character itself, or both halves of the pair."
    )


def _shown_bytes(raw: bytes, limit: int = 60) -> str:
    shown = repr(raw)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def decode_text(value: Any, where: str) -> str:
    """``value`` as checked text: bytes are decoded as UTF-8 (strictly), a str is checked as it is.

    The one place input text is decoded; the error names ``where`` it came from and the bad byte.
    """
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        try:
            return check_text(raw.decode("utf-8"), where)  # a valid "\xed\xa0\x80" is refused by decode already
        except UnicodeDecodeError as e:
            raise TextInputError(f"{where} is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start} "
                                 f"({_shown_bytes(raw)}). {REENCODE_HINT}") from None
    return check_text(value, where)


def check_texts(values: Iterable[Any], where: str) -> list[str]:
    """Each of ``values`` checked, named ``where item i`` (``--prompts item 2``)."""
    return [decode_text(v, f"{where} item {i}") for i, v in enumerate(values)]


def check_dialog(dialog: Sequence[Mapping[str, Any]], where: str) -> None:
    """Check the text of every message of ``dialog`` (its content and role) for undecodable input.

    The dialog's shape is ``chat_format.validate_dialog``'s to check; this only checks the strings in it.
    """
    for i, message in enumerate(dialog):
        if isinstance(message, Mapping):
            for key in ("role", "content"):
                if isinstance(message.get(key), (str, bytes, bytearray)):
                    check_text(message[key], f"{where} message {i} {key}")


def read_lines(stream: IO[Any], where: str = "stdin") -> list[str]:
    """The lines of ``stream``, each decoded and checked as ``{where} line N`` (counting every line, blank
    ones too, from 1). A binary stream is decoded as UTF-8; a text one is taken as decoded, surrogates refused.

    Every line is checked before any is returned, and the error names the first bad line and how many
    others are bad, so one fix covers the input.
    """
    data = stream.read()
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the text
        lines: list[Any] = data.splitlines()
    else:
        lines = data.removeprefix("\ufeff").splitlines()
    texts: list[str] = []
    errors: list[TextInputError] = []
    for number, line in enumerate(lines, 1):
        try:
            texts.append(decode_text(line, f"{where} line {number}"))
        except TextInputError as e:
            errors.append(e)
    if errors:
        more = f" ({len(errors) - 1} more line(s) are not valid either)" if len(errors) > 1 else ""
        raise TextInputError(f"{errors[0]}{more}")
    return texts


def read_stdin_lines(stdin: Optional[IO[str]] = None) -> list[str]:
    """The lines of stdin (``sys.stdin``), read as bytes where it has them and decoded as UTF-8 here, so
    the result is the same whatever the locale's error handler."""
    stream = sys.stdin if stdin is None else stdin
    buffer = getattr(stream, "buffer", None)
    return read_lines(buffer if buffer is not None else stream, "stdin")


def tolerate_undecodable_stdin(stdin: Optional[IO[str]] = None) -> None:
    """Make ``input()`` return an undecodable line with surrogate escapes instead of raising
    UnicodeDecodeError (the default under a UTF-8 locale other than C.UTF-8), so that the caller can report
    it with :func:`check_text` and go on reading: the chat REPL keeps its session."""
    stream = sys.stdin if stdin is None else stdin
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None and getattr(stream, "errors", None) == "strict":
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # already read from in a way that forbids it; the default stays
            pass
