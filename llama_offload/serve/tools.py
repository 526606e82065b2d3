"""Tool calling in Llama 3.1/3.2's own JSON format, as Meta's llama-models prompt templates lay it out.

The functions go into the system message as JSON, with the instruction to answer a call as
``{"name": function name, "parameters": {argument: value, ...}}`` and nothing else (Meta's "JSON based tool
calling"). An answer that is such an object (the model ends it with ``<|eom_id|>``, one of the chat format's stop
tokens) becomes OpenAI ``tool_calls``. History goes back in the same layout: an assistant's calls as those JSON
objects closed by ``<|eom_id|>``, and each tool result as a message of the ``ipython`` role, Llama 3.1's role for
tool output.

``tool_choice`` is honoured in the prompt and, where it demands a call, by starting the answer for the model:
"required" writes ``{"name": "`` and a named function ``{"name": "NAME", "parameters": `` after the assistant
header, so the answer cannot be anything but a call (the parse still checks it; an answer that does not
complete a valid call comes back as text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from llama_offload.text.chat_format import EOM, Llama3ChatFormat

PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    """One message, reduced to what the Llama 3 layout writes: role (system, user, assistant, ipython), text,
    and an assistant's calls."""

    role: str
    text: str
    calls: list[Call] = field(default_factory=list)


@dataclass(frozen=True)
class ToolMode:
    """What this request's answer may be: ``names`` the functions it may call (empty: none, plain text only);
    ``prefix`` the start of the answer written for the model (the answer's text is prefix + generated)."""

    names: frozenset[str]
    prefix: str = ""

    @property
    def calls_possible(self) -> bool:
        return bool(self.names)


def tool_mode(functions: Sequence[FunctionSpec], choice: str, named: Optional[str] = None) -> ToolMode:
    """``choice``: "none", "auto", "required" or "named" (then ``named`` is the function)."""
    if choice == "none" or not functions:
        return ToolMode(frozenset())
    if choice == "named":
        assert named is not None
        return ToolMode(frozenset({named}), '{"name": ' + json.dumps(named) + ', "parameters": ')
    names = frozenset(f.name for f in functions)
    return ToolMode(names, '{"name": "' if choice == "required" else "")


def system_text(functions: Sequence[FunctionSpec], choice: str, named: Optional[str] = None) -> str:
    """The tool instructions that open the system message (empty for none)."""
    if choice == "none" or not functions:
        return ""
    shown = [f for f in functions if choice != "named" or f.name == named]
    listing = "\n".join(json.dumps({"type": "function", "function": {
        "name": f.name, "description": f.description or "", "parameters": f.parameters or {"type": "object",
                                                                                         "properties": {}}}},
        indent=4, ensure_ascii=False) for f in shown)
    if choice == "named":
        when = f'You must call the function "{named}".'
    elif choice == "required":
        when = "You must call one of these functions."
    else:
        when = "If none of the functions can be used, answer the question directly, without calling one."
    return ("Environment: ipython\n\n"
            "Answer the user's question by making use of the following functions if needed.\n"
            f"{when}\n"
            "Here is a list of functions in JSON format:\n"
            f"{listing}\n\n"
            "To call a function, respond with only a JSON object in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            "Do not use variables.")


def call_text(call: Call) -> str:
    return json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)


class Llama3Tools:
    """Prompts with tools and tool history for the llama3 chat format, and the parse of answers."""

    def __init__(self, chat_format: Llama3ChatFormat):
        self.fmt = chat_format
        self.tokenizer = chat_format.tokenizer
        eom = self.tokenizer.token_to_id(EOM)
        self.eom_id = eom if eom is not None else chat_format.eot_id  # Llama 3.0 vocabularies have no eom

    def check(self, turns: Sequence[Turn]) -> None:
        """ValueError naming the message unless ``turns`` is a dialog the model can answer: a tool result follows
        an assistant's calls (or another result), and the last message is the user's or a tool result."""
        for i, turn in enumerate(turns):
            if turn.role == "ipython":
                before = turns[i - 1] if i > 0 else None
                if before is None or not (before.role == "ipython" or (before.role == "assistant" and before.calls)):
                    raise ValueError(f"Message {i}: a tool message must follow an assistant message with "
                                     "tool_calls (or another tool message); put it after the call it answers.")
        if turns[-1].role not in ("user", "ipython"):
            raise ValueError(f"Message {len(turns) - 1}: the last message must be from 'user' or 'tool', found "
                             f"'{'tool' if turns[-1].role == 'ipython' else turns[-1].role}'; the model answers it.")

    def encode(self, turns: Sequence[Turn], instructions: str, mode: ToolMode) -> list[int]:
        """The prompt: ``instructions`` (the tools) open the system message, before the dialog's own system text;
        then every message; then the assistant header and ``mode.prefix``."""
        self.check(turns)
        turns = list(turns)
        if instructions:
            if turns[0].role == "system":
                turns[0] = Turn("system", instructions + "\n\n" + turns[0].text.strip())
            else:
                turns.insert(0, Turn("system", instructions))
        encode = lambda text: self.tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
        tokens = [self.fmt.begin_of_text_id]
        for turn in turns:
            tokens += self.fmt.encode_header(turn.role)
            tokens += encode((turn.text.strip() + "".join(call_text(c) for c in turn.calls)).strip())
            tokens.append(self.eom_id if turn.calls else self.fmt.eot_id)  # a call ends its message, not the turn
        tokens += self.fmt.encode_header("assistant")
        if mode.prefix:
            tokens += encode(mode.prefix)
        return tokens

    @staticmethod
    def might_be_call(text: str) -> bool:
        """Whether an answer that starts with ``text`` can still turn out to be a call (streams hold it back)."""
        head = text.lstrip()
        return head == "" or head[0] in "{[" or PYTHON_TAG.startswith(head[: len(PYTHON_TAG)])

    @staticmethod
    def parse(text: str, names: frozenset[str]) -> Optional[list[Call]]:
        """The calls in an answer that is nothing but calls (one JSON object, several in a row, or a list of
        them), each naming one of ``names``; None if the answer is anything else."""
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG) :].lstrip()
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                value, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return None
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in names:
                    return None
                args = item.get("parameters", item.get("arguments", {}))
                if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI does
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        return None
                if not isinstance(args, dict):
                    return None
                calls.append(Call(item["name"], args))
            while at < len(body) and body[at] in " \t\r\n;,":
                at += 1
        return calls or None
