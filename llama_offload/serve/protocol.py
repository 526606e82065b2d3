"""OpenAI's request and response shapes for chat and text completions: what a request may hold (anything else
is refused with 400, naming the field), and the bodies and stream chunks the server sends back."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI's API


class _Request(BaseModel):
    # strict: "0.5" is not a temperature and 1.0 is not a token count; unknown fields are an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, bool]] = None  # include_usage: usage is always sent, last
    n: int = 1
    user: Optional[str] = None  # accepted and not used

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), found {n}; send {n} requests instead")
        return n

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None  # accepted and not used


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name for max_tokens

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str

    def token_limit(self) -> Optional[int]:
        return self.max_tokens


def error_body(message: str, kind: str, code: Optional[str] = None, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_body(request_id: str, model: str, chat: bool, text: str, finish_reason: Optional[str],
                    usage: dict[str, int], created: Optional[int] = None) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def chunk_body(request_id: str, model: str, chat: bool, created: int, *, text: Optional[str] = None,
               role: bool = False, finish_reason: Optional[str] = None,
               usage: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """One server-sent event's data: a piece of text, the first (role) chunk, the last (finish_reason) chunk, or
    the usage chunk (no choices), as OpenAI streams them."""
    if usage is not None:
        choices: list[dict[str, Any]] = []
    elif chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
