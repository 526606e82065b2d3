"""The HTTP side of ``llama-offload serve``: OpenAI's chat and text completion endpoints over the batching
engine (engine.py), with server-sent-event streams, OpenAI-shaped errors and an optional API key.

Every request is checked before it reaches the engine: its size (``max_body_bytes``), its fields
(protocol.py), the model name, what this server can honour of them, the prompt's length against the context,
and the queue's room. Prompts are tokenized on a small thread pool, so a long one never holds up the event
loop. A request for several choices (``n``, or a list of prompts) becomes one engine sequence per choice. A
client that goes away has its sequences dropped at the engine's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence, TypeVar, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_offload.generate.decode import Sampling
from llama_offload.serve.engine import Delta, Engine, EngineStopped, Event, Failure, QueueFull, Request
from llama_offload.serve.protocol import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, TokenLogprob, chat_logprobs, chunk_body, completion_body,
    error_body, legacy_logprobs,
)
from llama_offload.serve.tools import Call, FunctionSpec, Llama3Tools, ToolMode, Turn, system_text, tool_mode

log = logging.getLogger("llama_offload.serve")

DEFAULT_MAX_BODY_MB = 16.0  # a 128k-token prompt is well under 1 MB of text
TOKENIZE_THREADS = 2
T = TypeVar("T")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param, self.headers = \
            status, message, kind, code, param, headers


def bad(param: Optional[str], message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


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
    vocab_size: Optional[int] = None  # logit_bias ids must be below it
    chat_format: str = "llama2"
    tools: Optional[Llama3Tools] = None  # tool calling: the llama3 chat format only
    # With --draft the decode passes verify drafted tokens by their own rule: no penalties, bias or logprobs.
    speculative: bool = False


@dataclass
class Plan:
    """One HTTP request as the engine runs it: one sequence per choice, and how their text becomes choices."""

    chat: bool
    prompts: list[list[int]]
    requests: list[Request]  # choice index i answers prompt i // n
    n: int
    include_usage: bool
    tool: ToolMode = field(default_factory=lambda: ToolMode(frozenset()))
    echo: list[str] = field(default_factory=list)  # completions with echo: each prompt's text

    def echoed(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""


class _Guard:
    """Pure ASGI, outermost: refuses a body over ``max_bytes`` with 413 before any of it is parsed, and lets a
    request that uvicorn cancels at the end of its shutdown wait end quietly (the engine has already ended it
    with an error by then; a cancelled task would only print a traceback)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = dict(scope.get("headers") or ()).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body, more = [], True
                size = 0
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away before sending it all
                        return
                    body.append(message.get("body", b""))
                    size += len(body[-1])
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        await self._too_large(scope, receive, send)
                        return
                whole: Optional[Message] = {"type": "http.request", "body": b"".join(body), "more_body": False}

                async def replay() -> Message:
                    nonlocal whole
                    if whole is not None:
                        message, whole = whole, None
                        return message
                    return await receive()  # later: the disconnect, for whoever waits for it

                await self.app(scope, replay, send)
            else:
                await self.app(scope, receive, send)
        except asyncio.CancelledError:
            log.info("a request still open at the end of the shutdown wait was closed")

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        mb = self.max_bytes / 2**20
        response = JSONResponse(error_body(f"The request body is larger than this server accepts ({mb:g} MB, "
                                           "--max_body_mb). Send a shorter prompt, or restart the server with a "
                                           "larger --max_body_mb.", "invalid_request_error", "request_too_large"),
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(engine: Engine, served: Served, *, api_key: Optional[str] = None,
               on_ready: Optional[Callable[[], None]] = None,
               max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)) -> FastAPI:
    """The app; its lifespan starts the engine's thread and, at shutdown, ends what is still waiting or running
    (``server.GracefulServer`` first drains the engine for --shutdown_timeout seconds)."""
    pool = concurrent.futures.ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="llama_offload-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llama_offload", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, max_bytes=max_body_bytes)

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        problems, param, code = [], None, None
        for err in e.errors()[:4]:
            where, this_code, text = _describe(err)
            if code is None:
                param, code = where, this_code
            problems.append(text)
        return JSONResponse(error_body("Bad request: " + "; ".join(problems) + ".", "invalid_request_error",
                                       code or "invalid_value", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(http: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = (f"Unknown URL {http.method} {http.url.path}: this server answers POST /v1/chat/completions, "
                       "POST /v1/completions, GET /v1/models and GET /health.")
            return JSONResponse(error_body(message, "invalid_request_error", "unknown_url"), status_code=404)
        if e.status_code == 405:
            message = f"{http.method} is not allowed on {http.url.path}: {e.detail}."
            return JSONResponse(error_body(message, "invalid_request_error", "method_not_allowed"), status_code=405)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

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
        _check_common(body, served, engine, len_prompts=1)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs", f"top_logprobs is {body.top_logprobs} but logprobs is not true: set "
                                      '"logprobs": true to get log-probabilities, or leave top_logprobs out.')
        if body.response_format is not None and body.response_format.type != "text":
            raise bad("response_format", f"response_format {body.response_format.type!r} is not supported: this "
                                         "server does not constrain answers to JSON. Leave it out (or use "
                                         "{\"type\": \"text\"}) and ask for JSON in the prompt.", "unsupported_value")
        mode, prompt = await _chat_prompt(body, served, off_loop)
        sampling = _sampling(body, body.logprobs, body.top_logprobs or 0)
        plan = _plan(body, served, [prompt], sampling, served.chat_stop_ids, chat=True)
        plan.tool = mode
        return await _run(plan, body.stream, http)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Union[Response, dict]:
        authorize(http)
        texts = body.prompts()
        if not texts:
            raise bad("prompt", "prompt is an empty list: give at least one prompt.")
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            where = "prompt is empty" if isinstance(body.prompt, str) else f"prompt {empty[0]} of the list is empty"
            raise bad("prompt", f"{where}: give some text for the model to continue.")
        _check_common(body, served, engine, len_prompts=len(texts))
        if body.best_of is not None and body.best_of != body.n:
            raise bad("best_of", f"best_of is {body.best_of} but n is {body.n}: this server returns every sequence "
                                 "it generates, so best_of must equal n (or be left out).", "unsupported_value")
        if body.suffix:
            raise bad("suffix", "suffix (insertion, text after the completion) is not supported by LLaMA "
                                "checkpoints; leave it out.", "unsupported_value")
        if body.echo and body.logprobs is not None:
            raise bad("echo", "echo together with logprobs would need the prompt's log-probabilities, which this "
                              "server does not compute; leave out one of the two.", "unsupported_value")
        prompts = await off_loop(lambda: [served.encode_text(t) for t in texts])
        logprobs = body.logprobs is not None
        sampling = _sampling(body, logprobs, body.logprobs or 0)
        plan = _plan(body, served, prompts, sampling, served.text_stop_ids, chat=False)
        plan.echo = texts if body.echo else []
        return await _run(plan, body.stream, http)

    async def _run(plan: Plan, stream: bool, http: HTTPRequest) -> Union[Response, dict]:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for r in plan.requests:
            r.attach(loop, queue)
        try:
            engine.submit_all(plan.requests)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry in a moment.", "rate_limit_error",
                           "queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped:
            raise APIError(503, "The server is shutting down and takes no new requests. Retry when it is back.",
                           "server_error", "server_shutting_down") from None
        if stream:
            return StreamingResponse(_events(engine, served, plan, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _wait(engine, served, plan, queue, http)

    return app


# --- request checks -------------------------------------------------------------------------------------------

_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]\-]|^[A-Z]")


def _describe(err: dict[str, Any]) -> tuple[Optional[str], str, str]:
    """(param, code, message) for one pydantic error. The param is the field's path (union branch tags left out);
    a body that is not JSON names no field (the location pydantic gives it is a character offset)."""
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error")
        return None, "invalid_json", "the body is not valid JSON" + (f" ({detail})" if detail else "")
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    path = [str(p) for p in loc if isinstance(p, int) or not _UNION_TAG.search(str(p))]
    where = ".".join(path) or None
    text = str(err.get("msg", "")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return where, "unknown_parameter", f"unknown field '{where}' (this server does not support it; leave it out)"
    if kind == "missing":
        return where, "missing_required_parameter", f"'{where}' is required"
    if where is None:  # the body itself: not an object
        return None, "invalid_type", f"the body must be a JSON object: {text}"
    found = err.get("input")
    shown = json.dumps(found)[:60] if isinstance(found, (str, int, float, bool, type(None))) else type(found).__name__
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"  # a wrong kind of value, or a wrong value
    return where, code, f"{where}: {text}, found {shown}"


def _check_common(body: Union[ChatCompletionRequest, CompletionRequest], served: Served, engine: Engine,
                  len_prompts: int) -> None:
    if body.model != served.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist: this server serves '{served.model_name}'.",
                       "invalid_request_error", "model_not_found", "model")
    if body.stream_options is not None and not body.stream:
        raise bad("stream_options", 'stream_options is only allowed with "stream": true; leave it out.')
    sequences = body.n * len_prompts
    if sequences > engine.capacity:
        what = f"n={body.n}" + (f" for each of {len_prompts} prompts" if len_prompts > 1 else "")
        raise bad("n" if body.n > 1 else "prompt",
                  f"{what} asks for {sequences} sequences, but this server holds at most {engine.capacity} "
                  f"(--max_batch_size {engine.max_batch_size} + --max_queue {engine.max_queue}). Ask for fewer.")
    if body.logit_bias:
        for key, value in body.logit_bias.items():
            if not key.isdigit() or (served.vocab_size is not None and int(key) >= served.vocab_size):
                top = f" 0..{served.vocab_size - 1}" if served.vocab_size is not None else ""
                raise bad("logit_bias", f"logit_bias key {key!r} is not a token id of this model (ids are{top}). "
                                        "Give token ids as strings, e.g. {\"50256\": -100}.")
            if not -100 <= value <= 100:
                raise bad("logit_bias", f"logit_bias value {value} for token {key} is outside -100..100.")
    if served.speculative:
        logprobs = body.logprobs if isinstance(body, ChatCompletionRequest) else body.logprobs is not None
        for param, used in (("presence_penalty", body.presence_penalty), ("frequency_penalty",
                            body.frequency_penalty), ("logit_bias", body.logit_bias), ("logprobs", logprobs)):
            if used:
                raise bad(param, f"{param} needs plain decoding, but this server runs with --draft (speculative "
                                 "passes accept drafted tokens by their own rule). Leave it out, or restart the "
                                 "server without --draft.", "unsupported_value")


def _sampling(body: Union[ChatCompletionRequest, CompletionRequest], logprobs: bool, top: int) -> Sampling:
    bias = tuple(sorted((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))
    return Sampling(body.temperature, body.top_p, body.seed, body.presence_penalty, body.frequency_penalty, bias,
                    logprobs, top if logprobs else 0)


def _plan(body: Union[ChatCompletionRequest, CompletionRequest], served: Served, prompts: list[list[int]],
          sampling: Sampling, stop_ids: frozenset[int], chat: bool) -> Plan:
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    requests = []
    for p, prompt in enumerate(prompts):
        limit = served.max_seq_len - len(prompt)
        if limit < 1:
            which = "" if len(prompts) == 1 else f" {p}"
            raise APIError(400, f"The prompt{which} is {len(prompt)} tokens, but the context is {served.max_seq_len} "
                                "tokens (--max_seq_len) and at least one must be left for the answer. Shorten the "
                                "prompt, or restart the server with a larger --max_seq_len.",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        wanted = body.token_limit()
        for j in range(body.n):
            # Each choice its own seed (seed + its index), so n choices differ and the request stays repeatable.
            seed = None if sampling.seed is None else sampling.seed + len(requests)
            own = dataclasses.replace(sampling, seed=seed)
            requests.append(Request(id=request_id if len(prompts) * body.n == 1 else f"{request_id}/{len(requests)}",
                                    prompt=prompt, max_tokens=min(wanted, limit) if wanted is not None else limit,
                                    sampling=own, stop_ids=stop_ids, stop=body.stop_strings(), index=len(requests)))
    return Plan(chat, prompts, requests, body.n, body.include_usage())


async def _chat_prompt(body: ChatCompletionRequest, served: Served,
                       off_loop: Callable[..., Any]) -> tuple[ToolMode, list[int]]:
    """The prompt's token ids, and what the answer may call. Dialogs without tools or tool messages take the
    chat format's own path (the same ids as ``Llama.chat_completion``)."""
    messages = body.messages
    tool_history = [i for i, m in enumerate(messages) if m.role == "tool" or m.tool_calls]
    if body.tool_choice is not None and not body.tools:
        raise bad("tool_choice", "tool_choice is given but tools is not: give the functions in tools, or leave "
                                 "tool_choice out.")
    if (body.tools or tool_history) and served.tools is None:
        param = "tools" if body.tools else f"messages.{tool_history[0]}"
        raise bad(param, f"Tool calling needs the llama3 chat format (Llama 3.1/3.2's JSON tool calls), but this "
                         f"model's chat format is '{served.chat_format}'. Leave out tools and tool messages, or "
                         "serve a Llama 3.1+ instruct checkpoint.", "unsupported_value")
    dialog = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if served.unsafe_chat(dialog):
        raise bad("messages", "A message contains the chat format's special tags, which only the server may "
                              "write. Remove them from the message text.")
    if served.tools is None or not (body.tools or tool_history):
        for i, m in enumerate(messages):
            if m.content is None:
                raise bad(f"messages.{i}.content", f"Message {i} ({m.role}) has no content; give its text.")
        try:
            return ToolMode(frozenset()), await off_loop(served.encode_chat, dialog)
        except ValueError as e:  # the chat format's own checks: roles in order, the last one the user's
            raise bad("messages", f"Bad messages: {e}") from None
    functions = [FunctionSpec(t.function.name, t.function.description, t.function.parameters)
                 for t in body.tools or ()]
    choice, named = _tool_choice(body, functions)
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    mode = tool_mode(functions, choice, named)
    tools = served.tools
    try:
        return mode, await off_loop(tools.encode, turns, system_text(functions, choice, named), mode)
    except ValueError as e:
        raise bad("messages", f"Bad messages: {e}") from None


def _tool_choice(body: ChatCompletionRequest, functions: Sequence[FunctionSpec]) -> tuple[str, Optional[str]]:
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise bad("tools", f"Two tools are named '{twice}': give each function its own name.")
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if functions else "none")
    if isinstance(choice, str):
        return choice, None
    if choice.function.name not in names:
        raise bad("tool_choice", f"tool_choice names the function '{choice.function.name}', which is not among the "
                                 f"tools ({', '.join(names)}). Name one of them.")
    return "named", choice.function.name


def _turn(i: int, m: ChatMessage) -> Turn:
    role = {"developer": "system", "tool": "ipython"}.get(m.role, m.role)
    calls = []
    for j, call in enumerate(m.tool_calls or ()):
        if m.role != "assistant":
            raise bad(f"messages.{i}.tool_calls", f"Message {i} is a {m.role} message with tool_calls; only "
                                                  "assistant messages make calls.")
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as e:
            arguments = e
        if not isinstance(arguments, dict):
            raise bad(f"messages.{i}.tool_calls.{j}.function.arguments",
                      f"Message {i}, call {j}: arguments must be a JSON object as a string, e.g. '{{\"city\": "
                      f"\"Paris\"}}', found {call.function.arguments[:60]!r}.")
        calls.append(Call(call.function.name, arguments))
    if m.content is None and not calls:
        raise bad(f"messages.{i}.content", f"Message {i} ({m.role}) has no content; give its text.")
    return Turn(role, m.text(), calls)


# --- answers --------------------------------------------------------------------------------------------------


def _call_json(calls: list[Call]) -> list[dict[str, Any]]:
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def _usage(plan: Plan) -> dict[str, int]:
    prompt = sum(len(p) for p in plan.prompts)  # each prompt once, however many choices it has (as OpenAI)
    completion = sum(len(r.tokens) for r in plan.requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(served: Served, plan: Plan, r: Request) -> dict[str, Any]:
    if plan.chat:
        text, finish = plan.tool.prefix + r.text, r.finish_reason
        calls = served.tools.parse(text, plan.tool.names) if plan.tool.calls_possible and served.tools else None
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message, finish = {"role": "assistant", "content": None, "tool_calls": _call_json(calls)}, "tool_calls"
        return {"index": r.index, "message": message, "finish_reason": finish,
                "logprobs": chat_logprobs(r.logprobs) if r.sampling.logprobs else None}
    head = plan.echoed(r.index)
    return {"index": r.index, "text": head + r.text, "finish_reason": r.finish_reason,
            "logprobs": legacy_logprobs(r.logprobs, len(head)) if r.sampling.logprobs else None}


def _failure_response(f: Failure) -> JSONResponse:
    return JSONResponse(error_body(f.message, f.kind, f.code), status_code=f.status)


async def _wait(engine: Engine, served: Served, plan: Plan, queue: asyncio.Queue,
                http: HTTPRequest) -> Union[Response, dict]:
    pending = {r.index for r in plan.requests}
    try:
        while pending:
            try:
                event: Event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    _cancel(engine, plan)
                    return Response(status_code=499)  # nobody reads it; the rows are already free
                continue
            if event.kind == "done":
                pending.discard(event.index)
            elif event.kind == "error":
                _cancel(engine, plan)
                return _failure_response(event.payload)
    except asyncio.CancelledError:
        _cancel(engine, plan)
        raise
    request_id = plan.requests[0].id.split("/")[0]
    return completion_body(request_id, served.model_name, plan.chat,
                           [_choice(served, plan, r) for r in plan.requests], _usage(plan))


def _cancel(engine: Engine, plan: Plan) -> None:
    for r in plan.requests:
        if r.finish_reason is None:
            engine.cancel(r)


async def _events(engine: Engine, served: Served, plan: Plan, queue: asyncio.Queue) -> AsyncIterator[str]:
    """The request's server-sent events as OpenAI streams them: per choice, the role first (chat), its text
    pieces, a last chunk with its finish reason; then the usage in a chunk without choices if the client asked
    for it (stream_options.include_usage); then [DONE]. A tool call is held back until the answer is complete
    and sent as one tool_calls delta."""
    created = int(time.time())
    request_id = plan.requests[0].id.split("/")[0]
    model, chat = served.model_name, plan.chat

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(choices: list[dict[str, Any]], usage: Optional[dict[str, int]] = None) -> str:
        return sse(chunk_body(request_id, model, chat, created, choices, usage, plan.include_usage))

    def piece(r: Request, text: str, entries: Sequence[TokenLogprob], offset: int,
              finish: Optional[str] = None, **delta: Any) -> dict[str, Any]:
        logprobs = None
        if r.sampling.logprobs:
            logprobs = chat_logprobs(list(entries)) if chat else legacy_logprobs(list(entries), offset)
        if chat:
            return {"index": r.index, "delta": {"content": text, **delta} if text or not delta else delta,
                    "finish_reason": finish, "logprobs": logprobs}
        return {"index": r.index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    by_index = {r.index: r for r in plan.requests}
    held = {r.index: [plan.tool.prefix, []] for r in plan.requests} if plan.tool.calls_possible else {}
    offsets = {r.index: 0 for r in plan.requests}
    pending = set(by_index)
    try:
        for r in plan.requests:
            if chat:
                yield chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}])
            elif plan.echo:
                head = plan.echoed(r.index)
                offsets[r.index] = len(head)
                yield chunk([piece(r, head, (), 0)])
        while pending:
            event: Event = await queue.get()
            r = by_index[event.index]
            if event.kind == "delta":
                delta: Delta = event.payload
                if r.index in held:  # the answer may still be a tool call: hold it back
                    held[r.index][0] += delta.text
                    held[r.index][1] += delta.logprobs
                    if served.tools is not None and served.tools.might_be_call(held[r.index][0]):
                        continue
                    text, entries = held.pop(r.index)
                else:
                    text, entries = delta.text, delta.logprobs
                if text or entries:
                    yield chunk([piece(r, text, entries, offsets[r.index])])
                    offsets[r.index] += sum(len(e.token) for e in entries)
            elif event.kind == "done":
                finish = event.payload
                if r.index in held:
                    text, entries = held.pop(r.index)
                    calls = served.tools.parse(text, plan.tool.names) if served.tools else None
                    if calls:
                        tool_calls = [{"index": k, **c} for k, c in enumerate(_call_json(calls))]
                        yield chunk([piece(r, "", entries, 0, tool_calls=tool_calls)])
                        finish = "tool_calls"
                    elif text or entries:
                        yield chunk([piece(r, text, entries, offsets[r.index])])
                pending.discard(r.index)
                if chat:
                    yield chunk([{"index": r.index, "delta": {}, "finish_reason": finish, "logprobs": None}])
                else:
                    yield chunk([{"index": r.index, "text": "", "finish_reason": finish, "logprobs": None}])
            else:  # an error after the response started: an error event, then the end of the stream
                failure: Failure = event.payload
                yield sse(error_body(failure.message, failure.kind, failure.code))
                yield "data: [DONE]\n\n"
                return
        if plan.include_usage:
            yield chunk([], _usage(plan))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the stream was cancelled) or the answer is complete: either way, done
        _cancel(engine, plan)
