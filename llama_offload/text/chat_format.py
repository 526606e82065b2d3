"""Prompt formats that turn a chat dialog into token ids.

The Llama 2 format reproduces ``chat_completion`` in Meta's
facebookresearch/llama ``generation.py`` token for token, because the chat
models were fine-tuned on exactly that layout and drift from it (an extra
space, a missing BOS) degrades their answers. Llama 3 reproduces Meta's llama3
``ChatFormat.encode_dialog_prompt`` the same way, and ChatML (SmolLM2, Qwen and
many others) follows the model's own Hugging Face chat template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Protocol, TypedDict, get_args

from llama_offload.text.tokenizer import Tokenizer

__all__ = [
    "B_INST",
    "B_SYS",
    "CHAT_FORMATS",
    "CHATML_TAGS",
    "ChatFormat",
    "ChatMLFormat",
    "Dialog",
    "E_INST",
    "E_SYS",
    "LLAMA3_SPECIAL_TAG_RE",
    "Llama2ChatFormat",
    "Llama3ChatFormat",
    "Message",
    "Role",
    "SPECIAL_TAGS",
    "SPECIAL_TAGS_ERROR",
    "default_chat_format_name",
    "default_system_prompt",
    "get_chat_format",
    "validate_dialog",
]

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
# Meta's chat_completion answers with this text instead of a generation when a
# user smuggles format tags into a message; kept verbatim for compatibility.
SPECIAL_TAGS_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog: Sequence[Mapping[str, object]]) -> None:
    """Raise ValueError unless ``dialog`` is: [system], user, assistant, user, ..., user.

    Meta's code checks this with asserts that vanish under ``python -O`` and
    whose messages do not point at the offending message, so it is redone here.
    """
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ValueError(f"A dialog must be a list of messages, got {type(dialog).__name__}.")
    if len(dialog) == 0:
        raise ValueError("Message 0: expected a 'user' message, found an empty dialog.")

    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping):
            raise ValueError(
                f"Message {i}: expected a dict with 'role' and 'content', found {type(msg).__name__}."
            )
        missing = [k for k in ("role", "content") if k not in msg]
        if missing:
            raise ValueError(f"Message {i}: missing key(s) {missing}; each message needs 'role' and 'content'.")
        if msg["role"] not in ROLES:
            raise ValueError(
                f"Message {i}: unknown role {msg['role']!r}; expected one of {list(ROLES)}."
            )
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"Message {i}: 'content' must be a str, found {type(msg['content']).__name__}."
            )

    # After an optional leading system message the turns must alternate
    # user/assistant, because each user turn is paired with the answer after it.
    start = 1 if dialog[0]["role"] == "system" else 0
    if start == 1 and len(dialog) == 1:
        raise ValueError(
            "Message 0 is a system message with nothing after it; expected a user message at index 1."
        )
    for i in range(start, len(dialog)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        found = dialog[i]["role"]
        if found != expected:
            where = " (a system message is only allowed at index 0)" if found == "system" else ""
            raise ValueError(
                f"Message {i}: expected role {expected!r}, found {found!r}{where}. Messages must be an "
                "optional system message, then user and assistant turns alternating, starting with user."
            )
    last = len(dialog) - 1
    if dialog[last]["role"] != "user":
        raise ValueError(
            f"Message {last}: the last message must be from 'user', found {dialog[last]['role']!r}; "
            "the model answers the final user message."
        )


class ChatFormat(Protocol):
    """What generation needs from any chat format."""

    name: str

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]: ...

    def contains_special_tags(self, dialog: Sequence[Message]) -> bool: ...

    @property
    def stop_ids(self) -> set[int]: ...


class Llama2ChatFormat:
    name = "llama2"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def stop_ids(self) -> set[int]:
        return self.tokenizer.stop_ids

    def contains_special_tags(self, dialog: Sequence[Message]) -> bool:
        # Same test as Meta's "unsafe_requests"; generation turns a True into
        # SPECIAL_TAGS_ERROR rather than refusing the whole batch.
        # Non-str content is left for validate_dialog to report with its index.
        return any(
            isinstance(msg["content"], str) and tag in msg["content"]
            for msg in dialog
            for tag in SPECIAL_TAGS
        )

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        validate_dialog(dialog)
        turns: list[Message] = list(dialog)
        if turns[0]["role"] == "system":
            # Llama 2 has no system turn; the system prompt is folded into the
            # first user message, unstripped, exactly as Meta does.
            turns = [
                Message(
                    role=turns[1]["role"],
                    content=B_SYS + turns[0]["content"] + E_SYS + turns[1]["content"],
                )
            ] + turns[2:]

        tokens: list[int] = []
        # Each finished exchange is its own BOS...EOS sequence.
        for prompt, answer in zip(turns[::2], turns[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
        # The open turn has no EOS: the model continues it with the answer.
        tokens += self.tokenizer.encode(
            f"{B_INST} {(turns[-1]['content']).strip()} {E_INST}",
            bos=True,
            eos=False,
        )
        return tokens


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TAGS = [IM_START, IM_END]

# The branch of a ChatML Jinja template that fills in a system turn when the dialog has none, e.g.
# SmolLM2's {% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are ...<|im_end|>\n' }}
_DEFAULT_SYSTEM_RE = re.compile(
    r"""!=\s*['"]system['"]\s*%\}\s*\{\{-?\s*(['"])<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>""",
    re.DOTALL,
)


def default_system_prompt(chat_template: Optional[str]) -> Optional[str]:
    """The system prompt a ChatML chat template inserts when a dialog has none; None if it inserts none.

    Only the literal form that Hugging Face templates use is recognised (SmolLM2, Qwen2); anything else
    gives None, so a template we cannot read never invents a prompt.
    """
    if not chat_template:
        return None
    m = _DEFAULT_SYSTEM_RE.search(chat_template)
    if m is None:
        return None
    text = m.group(2)
    if m.group(1) in text:  # the quoted literal ended before <|im_end|>: not a plain string
        return None
    return text.replace("\\n", "\n")


_NOT_GIVEN = object()


def _special_ids(tokenizer: Tokenizer, format_name: str, tags: Sequence[str]) -> list[int]:
    """The ids of a chat format's special tokens, or an error saying the tokenizer lacks them."""
    to_id = getattr(tokenizer, "token_to_id", None)
    ids = [to_id(tag) if to_id is not None else None for tag in tags]
    if any(i is None for i in ids):
        raise ValueError(
            f"Chat format {format_name!r} needs the special tokens {', '.join(tags)}, which {tokenizer!r} does not "
            f"have. Use the chat format the model was tuned with (known formats: "
            f"{', '.join(sorted(CHAT_FORMATS))}; converted checkpoints record theirs in llama_offload.json)."
        )
    return ids


class ChatMLFormat:
    """``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, then ``<|im_start|>assistant\n``.

    This is what the Hugging Face templates of ChatML models render with ``add_generation_prompt=True``.
    Contents are used as given (the templates do not strip them). When the dialog has no system message,
    the model's own default is inserted if its template has one: SmolLM2's inserts "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face", and the model was tuned with it. The default comes
    from ``tokenizer.chat_template`` (the tokenizer_config.json beside tokenizer.json, which conversion
    writes), or is passed as ``default_system``.

    Special tokens are inserted by id, never parsed out of the text, so a message cannot forge a turn;
    messages that contain the tags are still reported by ``contains_special_tags``, as for Llama 2.
    A BOS is put first only if the tokenizer adds one to every sequence (SmolLM2 does not).
    """

    name = "chatml"

    def __init__(self, tokenizer: Tokenizer, default_system: object = _NOT_GIVEN) -> None:
        self.tokenizer = tokenizer
        self.im_start_id, self.im_end_id = _special_ids(tokenizer, "chatml", CHATML_TAGS)
        if default_system is _NOT_GIVEN:
            default_system = default_system_prompt(getattr(tokenizer, "chat_template", None))
        self.default_system: Optional[str] = default_system  # type: ignore[assignment]

    @property
    def stop_ids(self) -> set[int]:
        return {self.im_end_id, self.tokenizer.eos_id}

    def contains_special_tags(self, dialog: Sequence[Message]) -> bool:
        return any(
            isinstance(msg["content"], str) and tag in msg["content"]
            for msg in dialog
            for tag in CHATML_TAGS
        )

    def _message(self, role: str, content: str) -> list[int]:
        # Split exactly where the rendered template's special tokens would split the text.
        return (
            [self.im_start_id]
            + self.tokenizer.encode(f"{role}\n{content}", bos=False, eos=False)
            + [self.im_end_id]
            + self.tokenizer.encode("\n", bos=False, eos=False)
        )

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        validate_dialog(dialog)
        tokens = self.tokenizer.encode("", bos=True, eos=False)  # [bos] if the model uses one, else []
        if dialog[0]["role"] != "system" and self.default_system is not None:
            tokens += self._message("system", self.default_system)
        for msg in dialog:
            tokens += self._message(msg["role"], msg["content"])
        tokens += [self.im_start_id] + self.tokenizer.encode("assistant\n", bos=False, eos=False)
        return tokens


BEGIN_OF_TEXT, START_HEADER, END_HEADER = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"
EOT, EOM, END_OF_TEXT = "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"
# Any Llama 3 special token written out as text, in any release's naming.
LLAMA3_SPECIAL_TAG_RE = re.compile(
    r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag|image|step_id"
    r"|finetune_right_pad_id|reserved_special_token_\d+)\|>"
)


class Llama3ChatFormat:
    """Meta's Llama 3.x chat prompt (llama-models ``llama3/chat_format.py``), for text messages:

    ``<|begin_of_text|>``, then per message ``<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>``
    with the content stripped, then ``<|start_header_id|>assistant<|end_header_id|>\n\n`` for the model to
    continue. Special tokens are inserted by id; the role, the ``\n\n`` and the content are encoded
    separately, as Meta does, which fixes where the token boundaries fall.

    Roles are system, user and assistant, checked by ``validate_dialog``. Llama 3.1+ also knows an
    ``ipython`` (tool) role, tool calls ended by ``<|eom_id|>`` and images: not supported here. Works with
    any tokenizer that has the Llama 3 special tokens: Meta's tiktoken file or a Llama 3 tokenizer.json.
    """

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        needed = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)
        self.begin_of_text_id, self.start_header_id, self.end_header_id, self.eot_id = _special_ids(
            tokenizer, "llama3", needed)
        # A model stops at the end of its turn; eom (a tool call) and end_of_text end its answer too.
        optional = [tokenizer.token_to_id(tag) for tag in (EOM, END_OF_TEXT)]  # present: checked above
        self._stop_ids = {self.eot_id, tokenizer.eos_id, *(i for i in optional if i is not None)}

    @property
    def stop_ids(self) -> set[int]:
        return set(self._stop_ids)

    def contains_special_tags(self, dialog: Sequence[Message]) -> bool:
        # Encoding never turns such text into special tokens, but a message that writes them out is the
        # Llama 3 counterpart of Meta's Llama 2 "unsafe request", and gets the same error result.
        return any(
            isinstance(msg["content"], str) and LLAMA3_SPECIAL_TAG_RE.search(msg["content"]) is not None
            for msg in dialog
        )

    def encode_header(self, role: str) -> list[int]:
        return (
            [self.start_header_id]
            + self.tokenizer.encode(role, bos=False, eos=False)
            + [self.end_header_id]
            + self.tokenizer.encode("\n\n", bos=False, eos=False)
        )

    def encode_message(self, message: Message) -> list[int]:
        return (
            self.encode_header(message["role"])
            + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
            + [self.eot_id]
        )

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        validate_dialog(dialog)
        tokens = [self.begin_of_text_id]
        for msg in dialog:
            tokens += self.encode_message(msg)
        tokens += self.encode_header("assistant")  # the model writes the answer from here
        return tokens


CHAT_FORMATS: dict[str, Callable[[Tokenizer], ChatFormat]] = {
    Llama2ChatFormat.name: Llama2ChatFormat,
    Llama3ChatFormat.name: Llama3ChatFormat,
    ChatMLFormat.name: ChatMLFormat,
}


def chat_format_name(asked: Optional[str], meta: dict[str, Any], tokenizer: Tokenizer) -> str:
    """The chat format a run uses: ``--chat_format``, else the one a converted checkpoint records in
    llama_offload.json (``meta``), else the one the tokenizer implies (``default_chat_format_name``)."""
    return str(asked or meta.get("chat_format") or default_chat_format_name(tokenizer))


def default_chat_format_name(tokenizer: Tokenizer) -> str:
    """The chat format a model with this tokenizer most likely uses, for checkpoints that record none.

    "llama3" when the vocabulary has Llama 3's header and end-of-turn tokens (Meta's tiktoken file, or a
    Llama 3 tokenizer.json), "chatml" when it has ``<|im_start|>`` and ``<|im_end|>``, else "llama2"
    (SentencePiece vocabularies, whose chat models all use [INST]).
    """
    to_id = getattr(tokenizer, "token_to_id", None)
    if to_id is None:
        return Llama2ChatFormat.name
    if all(to_id(tag) is not None for tag in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)):
        return Llama3ChatFormat.name
    if all(to_id(tag) is not None for tag in CHATML_TAGS):
        return ChatMLFormat.name
    return Llama2ChatFormat.name


def get_chat_format(name: str, tokenizer: Tokenizer) -> ChatFormat:
    try:
        factory = CHAT_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"Unknown chat format {name!r}; known formats: {', '.join(sorted(CHAT_FORMATS))}."
        ) from None
    return factory(tokenizer)
