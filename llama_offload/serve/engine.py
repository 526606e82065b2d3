"""The batching engine: one thread owns the model and decodes every running request in the same pass.

Offloaded decoding streams every paged block once per pass whatever the batch, so N requests decoded together
cost about what one costs. Requests wait in a bounded queue; at each step boundary the waiting ones join the
running batch in free KV-cache rows (their prompts are prefilled then), every running sequence advances by one
pass, and each request's new text goes to its own event queue on the server's event loop. A request ends on
its own stop token, stop string or token limit; a cancelled one (its client went away) is dropped at the next
step boundary and its row is reused. At shutdown, ``drain`` refuses new requests and gives the running and
waiting ones a while to finish; ``stop`` then ends what is left with an error event.

The engine thread is the only one that touches the model. The web side talks to it through ``submit`` and
``cancel`` only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from llama_offload.generate.decode import BatchDecoder, Decoding, Sampling
from llama_offload.serve.protocol import TokenLogprob

log = logging.getLogger("llama_offload.serve")


class QueueFull(Exception):
    """Every batch row is busy and the waiting queue is full."""


class EngineStopped(Exception):
    """The server is shutting down."""


class Failure(NamedTuple):
    """Why a request ended without an answer: what the client gets, as an OpenAI error."""

    status: int
    message: str
    kind: str = "server_error"
    code: str = "internal_error"


class Delta(NamedTuple):
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text is complete in what was sent so far


class Event(NamedTuple):
    index: int  # the choice (Request.index) it belongs to
    kind: str  # "delta" (a Delta), "done" (the finish reason) or "error" (a Failure)
    payload: Any


@dataclass
class Request:
    """One sequence as the engine sees it: token ids in, text events out. A request for several choices (n, or a
    list of prompts) is several of these, each with its own ``index``, sharing one event queue."""

    id: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    index: int = 0
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    # Filled in by the engine.
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: Optional[float] = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the text sent so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # those sent so far
    finish_reason: Optional[str] = None
    max_batch: int = 0  # the most sequences decoding together in a pass this request took part in
    cancelled: bool = False
    _pending: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not sent yet
    _attributed: str = ""  # the answer's text that the recorded entries account for

    def attach(self, loop: asyncio.AbstractEventLoop, events: Optional[asyncio.Queue] = None) -> None:
        self.loop, self.events = loop, events if events is not None else asyncio.Queue()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's event loop (called on the engine thread)."""
        if self.loop is not None and self.events is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, Event(self.index, kind, payload))
            except RuntimeError:  # the loop closed between the check and the call: nobody is listening
                pass

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}


class TextStream:
    """A request's text as its tokens come: the whole answer is decoded each time (SentencePiece spacing and
    multi-byte characters only come out right in context), a character cut in half is held back, and so is
    any tail that may be the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode, self.stop = decode, tuple(s for s in stop if s)

    def advance(self, tokens: list[int], shown: str) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the answer)."""
        text = self.decode(tokens)
        for s in self.stop:
            at = text.find(s, max(0, len(shown) - len(s)))
            if at != -1:
                text = text[:at]
                return text[len(shown) :] if text.startswith(shown) else "", True
        if text.endswith("\ufffd") or not text.startswith(shown):
            return "", False
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return text[len(shown) : len(text) - hold], False

    def flush(self, tokens: list[int], shown: str) -> str:
        """What is left to send when the answer ends without a stop string (held-back text included)."""
        text = self.decode(tokens)
        return text[len(shown) :] if text.startswith(shown) else ""


class Engine:
    def __init__(self, make_decoder: Callable[[], BatchDecoder], decode_text: Callable[[list[int]], str], *,
                 max_batch_size: int, max_queue: int):
        self.make_decoder = make_decoder
        self.decode_text = decode_text
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.decoder = make_decoder()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, tuple[Request, Decoding, TextStream]] = {}  # cache row -> request
        self.admitting: list[Request] = []  # taken from the queue, being prefilled into rows
        self.passes = 0  # decode passes run
        self.lock = threading.Condition()
        self.draining = False  # no new requests; the ones in hand may finish
        self.stopping = False
        self.stop_failure = Failure(503, "The server shut down before this request finished. Retry it when the "
                                         "server is back.", "server_error", "server_shutting_down")
        self.thread = threading.Thread(target=self._loop, name="llama_offload-engine", daemon=True)

    @property
    def capacity(self) -> int:
        """Sequences the engine holds at most: decoding plus waiting."""
        return self.max_batch_size + self.max_queue

    # --- the web side -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.submit_all([request])

    def submit_all(self, requests: Sequence[Request]) -> None:
        """Queue every one of ``requests`` (the choices of one HTTP request), or none of them."""
        with self.lock:
            if self.stopping or self.draining:
                raise EngineStopped("the server is shutting down")
            decoding = len(self.running) + len(self.admitting)
            held = decoding + len(self.waiting)
            if held + len(requests) > self.capacity:
                raise QueueFull(f"{decoding} sequences are decoding and {len(self.waiting)} are waiting, {held} of "
                                f"the {self.capacity} it holds (--max_batch_size {self.max_batch_size} + "
                                f"--max_queue {self.max_queue}), and this request needs {len(requests)}")
            self.waiting.extend(requests)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request at the next step boundary (its row is then free)."""
        with self.lock:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self.lock.notify()

    def drain(self, timeout: float) -> None:
        """Refuse new requests, let the running and waiting ones finish for up to ``timeout`` seconds, then stop
        (ending the rest with an error). Blocks: call it off the event loop."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self.draining = True
            self.stop_failure = self.stop_failure._replace(
                message=f"The server shut down before this request finished (in-flight requests get "
                        f"{timeout:g} s, --shutdown_timeout). Retry it when the server is back.")
            while self.running or self.admitting or self.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.05))
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, end the ones still waiting or running with an error, stop the thread."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def load(self) -> dict[str, int]:
        with self.lock:
            return {"running": len(self.running) + len(self.admitting), "waiting": len(self.waiting),
                    "passes": self.passes}

    # --- the engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and not self.running:
                        self.lock.wait()
                    if self.stopping:
                        break
                    self._drop_cancelled()
                    while self.waiting and len(self.running) + len(self.admitting) < self.max_batch_size:
                        self.admitting.append(self.waiting.popleft())
                for request in list(self.admitting):
                    self._join(request)
                with self.lock:
                    self.admitting = []
                if self.running:
                    self._step()
        with self.lock:
            unfinished = [request for request, _, _ in self.running.values()] + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for request in unfinished:
            request.finish_reason = "shutdown"
            request.emit("error", self.stop_failure)
            self._log(request)

    def _drop_cancelled(self) -> None:
        for row, (request, seq, _) in list(self.running.items()):
            if request.cancelled:
                seq.done = True  # the decoder reuses a done sequence's row
                request.finish_reason = "cancelled"
                del self.running[row]
                self._log(request)

    def _join(self, request: Request) -> None:
        request.started_at = time.perf_counter()
        try:
            (seq,) = self.decoder.join([request.prompt], request.max_tokens, set(request.stop_ids),
                                       sampling=[request.sampling])
        except Exception as e:  # noqa: BLE001 - this request fails alone; the others go on
            with self.lock:
                self.admitting.remove(request)
            self._fail_one(request, e)
            return
        stream = TextStream(self.decode_text, request.stop)
        with self.lock:  # from admitting to running in one move, so that no count sees it twice
            self.running[seq.row] = (request, seq, stream)
            self.admitting.remove(request)
        self._advance(request, seq, stream, batch=1)

    def _step(self) -> None:
        batch = len(self.running)
        try:
            self.decoder.step()
        except Exception as e:  # noqa: BLE001 - a shared pass failed: its requests fail, the server goes on
            log.error("a decode pass failed; its %d requests end with an error\n%s", batch, traceback.format_exc())
            failure = Failure(500, f"Internal error in a decode pass: {type(e).__name__}: {e}. Other requests are "
                                   "not affected; retry this one.")
            for request, _, _ in list(self.running.values()):
                request.finish_reason = "error"
                request.emit("error", failure)
                self._log(request)
            self.running.clear()
            self.decoder = self.make_decoder()  # the cache rows' state is unknown: start from empty ones
            return
        self.passes += 1
        for request, seq, stream in list(self.running.values()):
            self._advance(request, seq, stream, batch)

    def _advance(self, request: Request, seq: Decoding, stream: TextStream, batch: int) -> None:
        """Send what ``seq`` produced since the last call; finish the request if it is done."""
        request.max_batch = max(request.max_batch, batch)
        known = len(request.tokens)
        new_tokens = len(seq.tokens) > known
        request.tokens = list(seq.tokens)
        if request.sampling.logprobs:
            self._record_logprobs(request, seq, known)
        stopped = False
        if new_tokens:
            delta, stopped = stream.advance(request.tokens, request.text)
            if delta:
                request.text += delta
                request.emit("delta", Delta(delta, self._logprobs_shown(request, final=False)))
        if not (seq.done or stopped):
            return
        if stopped:
            seq.done = True
            request.finish_reason = "stop"
            rest = ""
        else:
            rest = stream.flush(request.tokens, request.text)
            request.text += rest
            request.finish_reason = "length" if len(seq.tokens) >= seq.limit else "stop"
        shown = self._logprobs_shown(request, final=True, cut=stopped)
        if rest or shown:
            request.emit("delta", Delta(rest, shown))
        del self.running[seq.row]
        request.emit("done", request.finish_reason)
        self._log(request)

    def _record_logprobs(self, request: Request, seq: Decoding, known: int) -> None:
        """Log-probability entries for tokens known.. . Each token's text is what it adds to the decoded answer,
        so the entries' texts join up to the answer; a token that ends mid-character adds nothing and the one that
        completes the character carries it. An alternative's text is decoded after the few tokens before it."""
        for i in range(known, min(len(seq.tokens), len(seq.logprobs))):
            stable = self.decode_text(seq.tokens[: i + 1]).rstrip("\ufffd")
            same = len(os.path.commonprefix([stable, request._attributed]))
            piece, request._attributed = stable[same:], stable
            before = seq.tokens[max(0, i - 4) : i]
            head = self.decode_text(before)

            def text_of(token: int) -> str:
                text = self.decode_text(before + [token])
                return text[len(head) :] if text.startswith(head) else self.decode_text([token])

            top = seq.top_logprobs[i] if i < len(seq.top_logprobs) else []
            request._pending.append(TokenLogprob(piece, seq.logprobs[i], tuple((text_of(t), lp) for t, lp in top)))

    def _logprobs_shown(self, request: Request, final: bool, cut: bool = False) -> tuple[TokenLogprob, ...]:
        """The pending entries whose tokens' text is now wholly sent; ``final``: all the rest, but where a stop
        string ``cut`` the text, only those whose text starts before the cut."""
        shown: list[TokenLogprob] = []
        start = sum(len(e.token) for e in request.logprobs)
        while request._pending:
            entry = request._pending[0]
            end = start + len(entry.token)
            if not (end <= len(request.text) or (final and (not cut or start < len(request.text)))):
                break
            if not final and not entry.token and len(request._pending) == 1:
                break  # the last token ends mid-character: its text may only come with the end of the answer
            shown.append(request._pending.pop(0))
            start = end
        if final:
            request._pending.clear()
            if shown and not cut and len(request.text) > start:  # a last character left incomplete
                shown[-1] = shown[-1]._replace(token=shown[-1].token + request.text[start:])
        request.logprobs += shown
        return tuple(shown)

    def _fail_one(self, request: Request, e: Exception) -> None:
        log.error("request %s failed\n%s", request.id, traceback.format_exc())
        request.finish_reason = "error"
        request.emit("error", Failure(500, f"Internal error: {type(e).__name__}: {e}. Other requests are not "
                                           "affected; retry this one."))
        self._log(request)

    def _log(self, request: Request) -> None:
        now = time.perf_counter()
        started = request.started_at or now
        seconds = now - started
        rate = len(request.tokens) / seconds if seconds > 0 else 0.0
        log.info("%s: %d tokens in, %d out, queued %.3f s, %.1f tokens/s, batch up to %d, %s", request.id,
                 len(request.prompt), len(request.tokens), started - request.queued_at, rate, request.max_batch,
                 request.finish_reason)
