"""The fine-tuning data of ``llama-offload finetune --data FILE.jsonl``: read, render to token ids, pack.

The file is JSONL: each non-blank line is one JSON object, either

- ``{"text": "..."}``: plain text, rendered as BOS (if the tokenizer uses one) + text + EOS, with the loss on
  every token the model has to predict (all but the BOS, which is given, never predicted), or
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat example in the checkpoint's chat format. The
  messages are an optional system message, then user and assistant turns alternating, ending with an
  assistant message. The loss counts only what the model writes at inference: each assistant message's
  content tokens and the tokens that end its turn (so that it learns to stop), never the system and user
  turns or the headers.

Chat examples are laid out exactly as inference lays out a prompt, because a model tuned on one layout and
prompted with another answers worse. Rather than re-implement each chat format, rendering uses only the
format's own ``encode_dialog_prompt``:

- the whole conversation is ``encode_dialog_prompt(messages + [empty user message])`` cut after the last
  assistant turn: every format renders a finished assistant turn the same whatever follows it;
- assistant message ``k``'s reply starts right after ``encode_dialog_prompt(messages[:k])``, which is checked
  to be a prefix of the conversation's ids (so the model is trained on exactly the ids it is prompted with),
  and ends at the format's end-of-turn token, the first one after the prompt (text never encodes to a
  special token: all tokenizer backends insert them by id only).

The only per-format knowledge is which token ends an assistant turn, and what untrained tokens follow it:
Llama 2 (Meta's layout: each finished exchange is ``[INST] user [/INST] answer `` between BOS and EOS) ends it
with EOS, Llama 3 with ``<|eot_id|>``, ChatML with ``<|im_end|>`` followed by an untrained ``"\\n"``.

The prefix property can fail where the tokenizer merges the reply's first characters with the prompt's last
ones (ChatML with a byte-level BPE merges ``"\\n"`` with a reply that starts with a newline); such an example
is refused with a ValueError rather than trained in a layout inference never produces.

``pack`` concatenates the examples into one stream and cuts it into rows for next-token prediction. Examples
are not masked from each other inside a row: the model attends across their boundary, as usual in packed
fine-tuning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_offload.text.chat_format import (
    ROLES, ChatFormat, ChatMLFormat, Llama2ChatFormat, Llama3ChatFormat, Message, validate_dialog,
)
from llama_offload.text.text_input import a_type, check_dialog, check_text, read_lines
from llama_offload.text.tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "Example", "pack", "read_examples", "render_chat", "render_text"]

# The target of a position the loss skips: torch's cross-entropy default ignore_index.
IGNORE_INDEX = -100

_KEYS = ("text", "messages")
_MESSAGE_KEYS = ("role", "content")


@dataclass
class Example:
    """One training example: its token ids and, for each, whether the loss counts it as a prediction target."""

    tokens: list[int]
    trained: list[bool]  # same length as tokens: True where the model is taught to predict this token

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.trained):
            raise ValueError(
                f"An Example needs one trained flag per token: {len(self.tokens)} tokens, {len(self.trained)} flags."
            )


# --- reading -------------------------------------------------------------------------------------------------


def read_examples(path: str | Path, tokenizer: Tokenizer, chat_format: ChatFormat) -> list[Example]:
    """The examples of the JSONL file ``path``, in file order, rendered with ``tokenizer`` and ``chat_format``.

    Every error names the file and the 1-based line number, and says what was expected and what was found.
    """
    path = Path(path)
    shown = repr(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"Fine-tuning data not found: {shown}. Pass a JSONL file with one example a line.")
    if not path.is_file():
        raise ValueError(f"Fine-tuning data {shown} is not a file; pass a JSONL file with one example a line.")

    with path.open("rb") as f:
        # Decoded strictly as UTF-8 here; an undecodable line is reported as "<file> line N".
        lines = read_lines(f, shown)

    examples: list[Example] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{shown} line {number}"
        try:
            examples.append(_parse_line(line, tokenizer, chat_format))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not examples:
        raise ValueError(
            f"Fine-tuning data {shown} has no examples: expected one JSON object a line, "
            '{"text": ...} or {"messages": [...]}, found only blank lines.'
        )
    return examples


def _parse_line(line: str, tokenizer: Tokenizer, chat_format: ChatFormat) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object a line.") from None
    if not isinstance(obj, dict):
        raise ValueError(f'expected a JSON object, {{"text": ...}} or {{"messages": [...]}}, found {a_type(obj)}.')
    present = [k for k in _KEYS if k in obj]
    unknown = sorted(k for k in obj if k not in _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; an example has exactly one of 'text' and 'messages'.")
    if len(present) != 1:
        found = "both" if present else "neither"
        raise ValueError(f"expected exactly one of 'text' and 'messages', found {found}.")
    if present == ["text"]:
        text = obj["text"]
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, found {a_type(text)}.")
        check_text(text, "'text'")
        if not text.strip():
            raise ValueError("'text' is empty; expected the text to train on.")
        return render_text(text, tokenizer)
    return render_chat(obj["messages"], tokenizer, chat_format)


# --- rendering -----------------------------------------------------------------------------------------------


def render_text(text: str, tokenizer: Tokenizer) -> Example:
    """BOS (only if the tokenizer uses one) + ``text`` + EOS; every token is trained but the BOS.

    The BOS is given at inference, never predicted: training it would teach the model to predict a BOS from
    the end of whatever example precedes it in the packed stream. The EOS is trained so that the model
    learns where a text ends.
    """
    head = tokenizer.encode("", bos=True, eos=False)  # [bos] if the tokenizer adds one, else []
    body = tokenizer.encode(text, bos=False, eos=True)
    return Example(tokens=head + body, trained=[False] * len(head) + [True] * len(body))


def render_chat(messages: Any, tokenizer: Tokenizer, chat_format: ChatFormat) -> Example:
    """``messages`` (a dialog ending with an assistant message) laid out as ``chat_format`` lays it out.

    Trained: each assistant message's content tokens and the token that ends its turn. The ids before each
    assistant message are exactly ``chat_format.encode_dialog_prompt`` of the messages before it.
    ``tokenizer`` is the one ``chat_format`` encodes with; it encodes nothing here itself.
    """
    dialog = _check_messages(messages)
    end_id, tail = _end_of_turn(chat_format)
    # A finished assistant turn renders the same whatever follows it, so the conversation's ids are the
    # prompt for an (empty) next user message, cut after the last assistant turn.
    probe: Message = {"role": "user", "content": ""}
    conversation = chat_format.encode_dialog_prompt([*dialog, probe])

    tokens: list[int] = []
    trained: list[bool] = []
    for k in (i for i, m in enumerate(dialog) if m["role"] == "assistant"):
        prompt = chat_format.encode_dialog_prompt(dialog[:k])
        if conversation[: len(prompt)] != prompt:
            raise ValueError(
                f"Message {k} (assistant): the tokenizer merges the reply's first characters with the end of "
                f"the prompt before it, so the reply cannot be trained in the {chat_format.name!r} layout the model "
                "is prompted with (the prompt's ids are not a prefix of the conversation's). Leading whitespace "
                "in the reply is the usual cause: remove it."
            )
        # Both are prefixes of the conversation; the previous turn ended before this prompt does.
        if len(prompt) < len(tokens):
            raise RuntimeError(f"Internal error: the prompt of message {k} ends inside the turn before it.")
        tokens += prompt[len(tokens) :]
        trained += [False] * (len(tokens) - len(trained))
        try:
            end = conversation.index(end_id, len(prompt))
        except ValueError:
            raise RuntimeError(
                f"Internal error: chat format {chat_format.name!r} rendered no end-of-turn token {end_id} after "
                f"message {k}."
            ) from None
        reply = conversation[len(prompt) : end + 1]  # the content's tokens and the end of turn
        if conversation[end + 1 : end + 1 + len(tail)] != tail:
            raise RuntimeError(
                f"Internal error: chat format {chat_format.name!r} does not follow the end of turn with {tail}."
            )
        tokens += reply + tail
        trained += [True] * len(reply) + [False] * len(tail)
    return Example(tokens=tokens, trained=trained)


def _end_of_turn(chat_format: ChatFormat) -> tuple[int, list[int]]:
    """The token that ends an assistant turn in ``chat_format`` (trained) and the tokens after it (not)."""
    if isinstance(chat_format, Llama2ChatFormat):
        return chat_format.tokenizer.eos_id, []
    if isinstance(chat_format, Llama3ChatFormat):
        return chat_format.eot_id, []
    if isinstance(chat_format, ChatMLFormat):
        # "<|im_end|>\n": the newline is part of the template, not of the answer; the model stops before it.
        return chat_format.im_end_id, chat_format.tokenizer.encode("\n", bos=False, eos=False)
    raise ValueError(
        f"Chat examples cannot be trained in chat format {getattr(chat_format, 'name', chat_format)!r}: it is not "
        "known where its assistant turns end. Known: llama2, llama3, chatml."
    )


def _check_messages(messages: Any) -> list[Message]:
    """``messages`` as a dialog: its shape, types and roles checked, with errors naming the message."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list of messages, found {a_type(messages)}.")
    if not messages:
        raise ValueError("'messages' is empty; expected user and assistant messages ending with an assistant one.")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"Message {i}: expected an object with 'role' and 'content', found {a_type(msg)}.")
        unknown = sorted(str(k) for k in msg if k not in _MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"Message {i}: unknown key(s) {unknown}; a message has only 'role' and 'content'.")
        missing = [k for k in _MESSAGE_KEYS if k not in msg]
        if missing:
            raise ValueError(f"Message {i}: missing key(s) {missing}; each message needs 'role' and 'content'.")
        if msg["role"] not in ROLES:
            raise ValueError(f"Message {i}: unknown role {msg['role']!r}; expected one of {list(ROLES)}.")
        if not isinstance(msg["content"], str):
            raise ValueError(f"Message {i}: 'content' must be a string, found {a_type(msg['content'])}.")
    check_dialog(messages, "'messages'")  # undecodable text (a lone surrogate from a JSON escape)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message; expected at least one, the reply the model is trained to write.")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise ValueError(
            f"Message {last}: the last message must be from 'assistant' (the reply to train on), "
            f"found {messages[last]['role']!r}."
        )
    # The messages before the last reply must form a prompt: [system], user, assistant, ..., user.
    validate_dialog(messages[:last])
    return [Message(role=m["role"], content=m["content"]) for m in messages]


# --- packing -------------------------------------------------------------------------------------------------


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``examples`` as training rows: ``(inputs, targets)``, each ``(n, seq_len)`` int64.

    The examples are concatenated in order into one stream and cut into rows of ``seq_len + 1`` tokens that
    overlap by one: row ``r`` covers ``stream[r*seq_len : r*seq_len + seq_len + 1]``, its first ``seq_len``
    tokens are the inputs and its last ``seq_len`` the targets, so every token after the first is predicted
    exactly once. ``targets[i, j]`` is the next token where that token is trained, else ``IGNORE_INDEX``
    (-100). The last row is padded with ``pad_id`` inputs and ``IGNORE_INDEX`` targets. No token is dropped:
    ``n = ceil((len(stream) - 1) / seq_len)``, the fewest rows whose targets cover the whole stream.

    ``pad_id`` must be a real id (padded inputs still go through the embedding), e.g. the EOS for tokenizers
    without a pad token (pad_id -1); padded positions come after every real one and are never trained.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, found {seq_len}.")
    if pad_id < 0:
        raise ValueError(
            f"pad_id must be a token id (>= 0), found {pad_id}; a tokenizer without a pad token can pad with its "
            "EOS id (padded positions are never trained)."
        )
    tokens = [t for ex in examples for t in ex.tokens]
    trained = [f for ex in examples for f in ex.trained]
    if len(tokens) < 2:
        raise ValueError(
            f"Nothing to train on: the examples hold {len(tokens)} token(s) in all; at least 2 are needed."
        )

    n = -(-(len(tokens) - 1) // seq_len)  # rows: their targets cover stream[1:], and no row is all padding
    length = n * seq_len + 1  # the stream padded to the end of the last row
    stream = torch.full((length,), pad_id, dtype=torch.int64)  # (n*seq_len + 1,)
    stream[: len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.int64)  # (n*seq_len + 1,)
    labels[: len(tokens)] = torch.where(
        torch.tensor(trained, dtype=torch.bool), stream[: len(tokens)], IGNORE_INDEX
    )
    inputs = stream[:-1].view(n, seq_len)  # (n, seq_len): row r starts at stream[r*seq_len]
    targets = labels[1:].view(n, seq_len)  # (n, seq_len): one token later, so rows overlap by one
    return inputs, targets
