"""OpenAI's request and response shapes for chat and text completions: what a request may hold (anything else
is refused with 400, naming the field), and the bodies and stream chunks the server sends back."""

from __future__ import annotations

import time
from typing import Any, Literal, NamedTuple, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_N = 128  # as OpenAI's API
MAX_TOP_LOGPROBS = 20  # chat, as OpenAI's API
MAX_LEGACY_LOGPROBS = 5  # completions, as OpenAI's API


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature and 1.0 is not a token count; unknown fields are an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Request(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> -100..100, added to its logit
    user: Optional[str] = None  # accepted and not used

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, found {len(stop)}")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# --- chat -----------------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for "system"; "tool" is a tool's result (Llama 3.1's ipython role).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None  # accepted and not used
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # which call a tool message answers
    refusal: Optional[str] = None  # what clients echo back of an earlier answer; not used
    annotations: Optional[list[Any]] = None  # likewise

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None  # accepted; the schema is shown to the model, not enforced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # accepted: Llama 3.x's JSON format makes one call at a time
    response_format: Optional[ResponseFormat] = None

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- text completions -----------------------------------------------------------------------------------------


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False  # the prompt's text before the answer's
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)  # legacy: the top-k alternatives per token

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt: Any) -> Any:
        # Token-id prompts are OpenAI's too, but this server takes text: say so rather than a type error.
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) or isinstance(p, list) for p in prompt):
            raise ValueError("token-id prompts are not supported; send the prompt as text (a string, or a list "
                             "of strings)")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> Optional[int]:
        return self.max_tokens


# --- responses ------------------------------------------------------------------------------------------------


class TokenLogprob(NamedTuple):
    """One answer token's log-probability (of the model's own distribution, before penalties, bias and
    temperature), its text, and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def error_body(message: str, kind: str, code: Optional[str] = None, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's shape; ``offset``: where the first token's text starts in the choice's text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def completion_body(request_id: str, model: str, chat: bool, choices: list[dict[str, Any]], usage: dict[str, int],
                    created: Optional[int] = None) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage}


def chunk_body(request_id: str, model: str, chat: bool, created: int, choices: list[dict[str, Any]],
               usage: Optional[dict[str, int]] = None, with_usage: bool = False) -> dict[str, Any]:
    """One server-sent event's data. ``with_usage``: the client asked for usage (stream_options), so every chunk
    has a usage field, null but in the last one (which has no choices), as OpenAI streams it."""
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage
    return body
