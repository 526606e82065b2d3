"""The HTTP side of ``llama-offload serve``: OpenAI's chat and text completion endpoints over the batching
engine (engine.py), with server-sent-event streams, OpenAI-shaped errors and an optional API key.

Every request is checked before it reaches the engine: its fields (protocol.py), the model name, the prompt's
length against the context, and the queue's room. A client that goes away has its sequence dropped at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decode import Sampling
from .engine import Engine, EngineStopped, QueueFull, Request
from .protocol import ChatCompletionRequest, CompletionRequest, chunk_body, completion_body, error_body

log = logging.getLogger("llama_offload.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param, self.headers = \
            status, message, kind, code, param, headers


@dataclass
class Served:
    """What the app needs of the loaded model: its name, how prompts become token ids, and its context."""

    model_name: str
    max_seq_len: int
    encode_text: Callable[[str], list[int]]  # a completion prompt, with BOS
    encode_chat: Callable[[list[dict[str, str]]], list[int]]  # a dialog in the checkpoint's chat format
    unsafe_chat: Callable[[list[dict[str, str]]], bool]  # a message smuggles in the chat format's special tags
    text_stop_ids: frozenset[int]
    chat_stop_ids: frozenset[int]


def create_app(engine: Engine, served: Served, *, api_key: Optional[str] = None,
               on_ready: Optional[Callable[[], None]] = None) -> FastAPI:
    """The app; its lifespan starts the engine's thread and, at shutdown, ends what is still waiting or running
    (uvicorn first lets in-flight requests finish, up to its graceful-shutdown timeout)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="llama_offload", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            param = param or where or None
            if err.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
            elif err.get("type") == "extra_forbidden":
                problems.append(f"unknown field '{where}' (not supported by this server)")
            else:
                problems.append(f"{where or 'body'}: {err.get('msg')}")
        return JSONResponse(error_body("Bad request: " + "; ".join(problems) + ".", "invalid_request_error",
                                       "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("internal error while answering a request")
        return JSONResponse(error_body(f"Internal server error: {type(e).__name__}. The server logged the details.",
                                       "server_error", "internal_error"), status_code=500)

    def authorize(http: HTTPRequest) -> None:
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with (--api_key).", "invalid_request_error",
                           "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.model_name, **engine.load()}

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> dict[str, Any]:
        authorize(http)
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                            "owned_by": "llama_offload"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> Union[Response, dict]:
        authorize(http)
        dialog = [{"role": m.role, "content": m.content} for m in body.messages]
        if served.unsafe_chat(dialog):
            raise APIError(400, "A message contains the chat format's special tags, which only the server may "
                                "write. Remove them from the message text.", param="messages")
        try:
            prompt = served.encode_chat(dialog)
        except ValueError as e:  # the chat format's own checks: roles in order, the last one the user's
            raise APIError(400, f"Bad messages: {e}", param="messages") from None
        return await _complete(body, http, prompt, served.chat_stop_ids, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Union[Response, dict]:
        authorize(http)
        return await _complete(body, http, served.encode_text(body.prompt), served.text_stop_ids, chat=False)

    async def _complete(body: Union[ChatCompletionRequest, CompletionRequest], http: HTTPRequest,
                        prompt: list[int], stop_ids: frozenset[int], chat: bool) -> Union[Response, dict]:
        if body.model != served.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist: this server serves "
                                f"'{served.model_name}'.", "not_found_error", "model_not_found", "model")
        limit = served.max_seq_len - len(prompt)
        if limit < 1:
            raise APIError(400, f"The prompt is {len(prompt)} tokens, but the context is {served.max_seq_len} tokens "
                                "(--max_seq_len) and at least one must be left for the answer. Shorten the prompt, "
                                "or restart the server with a larger --max_seq_len.",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        wanted = body.token_limit()
        request = Request(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], prompt=prompt,
                          max_tokens=min(wanted, limit) if wanted is not None else limit,
                          sampling=Sampling(body.temperature, body.top_p, body.seed), stop_ids=stop_ids,
                          stop=body.stop_strings())
        request.attach(asyncio.get_running_loop())
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry in a moment.", "rate_limit_error",
                           "queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped:
            raise APIError(503, "The server is shutting down.", "server_error", "shutting_down") from None
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_events(engine, request, served.model_name, chat, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _wait(engine, request, http, served.model_name, chat, created)

    return app


async def _wait(engine: Engine, request: Request, http: HTTPRequest, model: str, chat: bool,
                created: int) -> Union[Response, dict]:
    assert request.events is not None
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(request.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    engine.cancel(request)
                    return Response(status_code=499)  # nobody reads it; the row is already free
                continue
            if kind == "done":
                return completion_body(request.id, model, chat, request.text, payload, request.usage, created)
            if kind == "error":
                return JSONResponse(error_body(f"{payload}. Other requests are not affected; retry this one.",
                                               "server_error", "internal_error"), status_code=500)
    except asyncio.CancelledError:
        engine.cancel(request)
        raise


async def _events(engine: Engine, request: Request, model: str, chat: bool, created: int) -> AsyncIterator[str]:
    """The request's server-sent events: OpenAI's chunks, the usage last, then [DONE]."""
    assert request.events is not None

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield sse(chunk_body(request.id, model, chat, created, role=True))
        while True:
            kind, payload = await request.events.get()
            if kind == "delta":
                yield sse(chunk_body(request.id, model, chat, created, text=payload))
            elif kind == "done":
                yield sse(chunk_body(request.id, model, chat, created, finish_reason=payload))
                yield sse(chunk_body(request.id, model, chat, created, usage=request.usage))
                yield "data: [DONE]\n\n"
                return
            else:  # an error after the response started: an error event, then the end of the stream
                yield sse(error_body(f"{payload}. Other requests are not affected; retry this one.",
                                     "server_error", "internal_error"))
                yield "data: [DONE]\n\n"
                return
    finally:  # the client went away (the stream was cancelled) or the answer is complete: either way, done
        if request.finish_reason is None:
            engine.cancel(request)
