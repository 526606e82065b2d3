"""``llama-offload serve`` on the CPU, driven by OpenAI's own Python client: outputs equal Llama's greedy
completions, concurrent requests share passes and each still equals its own single-request output, a client that
goes away frees its row, every error has its status and OpenAI's JSON shape, the API key is enforced, and
SIGTERM stops the server cleanly."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import openai
import pytest

from llama_offload.generate.generation import Llama
from llama_offload.serve.engine import Engine
from llama_offload.serve.server import engine_for, make_server, served_from

MODEL = "tiny"
QUESTIONS = ["Tell me a story.", "What is two plus two?", "Name a color.", "Hi", "Why is the sky blue, in detail?",
             "Count to five."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama(tiny_ckpt: Path) -> Llama:
    return Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", max_seq_len=96, max_batch_size=4,
                       device="cpu", dtype="float32")


class Slow:
    """A step model that takes at least ``seconds`` a pass (so a test can act while requests run), and fails a
    pass whose tokens include ``fail_on``."""

    def __init__(self, model: Any, seconds: float = 0.0, fail_on: Optional[int] = None):
        self.model, self.seconds, self.fail_on = model, seconds, fail_on
        self.max_positions = model.max_positions

    def step(self, step):
        if self.fail_on is not None and bool((step.tokens == self.fail_on).any()):
            raise RuntimeError("injected failure")
        time.sleep(self.seconds)
        return self.model.step(step)


class Server:
    """The app under uvicorn (the command's own GracefulServer) in a thread, on a free local port."""

    def __init__(self, llama: Llama, *, max_queue: int = 8, api_key: Optional[str] = None, slow: float = 0.0,
                 fail_on: Optional[int] = None, model: Any = None, shutdown_timeout: float = 10.0,
                 max_body_mb: float = 16.0):
        model = model if model is not None else Slow(llama.model, slow, fail_on)
        if llama.draft is not None:  # the command's own engine: speculative decoding with the Llama's draft
            self.engine = engine_for(llama, max_queue)
        else:
            self.engine = Engine(lambda: BatchDecoderFor(llama, model), llama.tokenizer.decode,
                                 max_batch_size=llama.max_batch_size, max_queue=max_queue)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.engine, served_from(llama, MODEL), host="127.0.0.1", port=self.port,
                                  api_key=api_key, shutdown_timeout=shutdown_timeout, max_body_mb=max_body_mb)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def BatchDecoderFor(llama: Llama, model: Any):
    from llama_offload.generate.decode import BatchDecoder

    return BatchDecoder(model, max_batch_size=llama.max_batch_size, max_seq_len=llama.max_seq_len,
                        device=llama.device, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def server(llama: Llama) -> Iterator[Server]:
    with Server(llama) as s:
        yield s


def chat_want(llama: Llama, question: str, max_tokens: int) -> str:
    dialog = [{"role": "user", "content": question}]
    return llama.chat_completion([dialog], temperature=0, max_gen_len=max_tokens)[0]["generation"]["content"]


def text_want(llama: Llama, prompt: str, max_tokens: int) -> str:
    return llama.text_completion([prompt], temperature=0, max_gen_len=max_tokens)[0]["generation"]


# --- outputs ----------------------------------------------------------------------------------------------


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_and_text_completions_equal_llama_greedy(server: Server, llama: Llama) -> None:
    client = server.client()
    for question in QUESTIONS[:3]:
        want = chat_want(llama, question, 20)
        got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                             max_tokens=20, temperature=0)
        assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
        n_prompt = len(llama.chat_format.encode_dialog_prompt([{"role": "user", "content": question}]))
        assert got.usage.prompt_tokens == n_prompt
        assert got.usage.total_tokens == n_prompt + got.usage.completion_tokens
        assert got.choices[0].finish_reason in ("stop", "length")
        # OpenAI's own loop: every chunk has a choice unless usage was asked for.
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                     max_tokens=20, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
        assert all(c.usage is None for c in chunks)
        with_usage = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert with_usage[-1].choices == [] and with_usage[-1].usage.total_tokens == got.usage.total_tokens
        assert all(c.choices and c.usage is None for c in with_usage[:-1])  # usage last, in its own chunk
        assert "".join(c.choices[0].delta.content or "" for c in with_usage[:-1]) == want
    for prompt in ("Once upon a time", "The capital of France is"):
        want = text_want(llama, prompt, 16)
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == want
        assert got.choices[0].finish_reason == ("length" if got.usage.completion_tokens == 16 else "stop")
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
        assert streamed == want


def test_stop_strings_seed_and_sampling(server: Server, llama: Llama) -> None:
    client = server.client()
    want = text_want(llama, "Once upon a time", 24)
    stop = next(want[i : i + 2] for i in range(3, len(want) - 2) if want[i : i + 2].strip())
    cut = want[: want.index(stop)]
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=stop)
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert streamed == cut  # the held-back start of the stop string never goes out
    sampled = [client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0, seed=s)
               .choices[0].text for s in (5, 5, 6)]
    assert sampled[0] == sampled[1]  # the same seed, the same text


def test_concurrent_requests_share_passes_and_equal_their_single_runs(llama: Llama,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    lengths = [30, 5, 18, 12, 25, 8]
    want = [chat_want(llama, q, n) for q, n in zip(QUESTIONS, lengths)]
    caplog.set_level(logging.INFO, logger="llama_offload.serve")
    with Server(llama, slow=0.01) as s:  # max_batch_size 4: two of the six wait in the queue, then join
        client = s.client()

        def ask(i: int) -> str:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i]}],
                                               max_tokens=lengths[i], temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, range(6)))
    assert got == want
    lines = [r.getMessage() for r in caplog.records if r.name == "llama_offload.serve" and "tokens in" in r.getMessage()]
    assert len(lines) == 6
    batches = [int(line.split("batch up to ")[1].split(",")[0]) for line in lines]
    assert max(batches) == 4 and all(b >= 2 for b in batches), lines  # passes were shared, never over 4 rows
    assert all("queued" in line and "tokens/s" in line for line in lines)


def test_a_client_that_disconnects_frees_its_row(llama: Llama) -> None:
    with Server(llama, slow=0.05) as s:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 80, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert s.engine.load()["running"] == 1
        deadline = time.time() + 10
        while s.engine.load()["running"]:
            assert time.time() < deadline, "the disconnected request kept its row"
            time.sleep(0.05)
        passes = s.engine.load()["passes"]
        assert passes < 80  # dropped long before its 80 tokens
        r = s.client().completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1


def test_draft_flags_serve_the_same_greedy_answers(tiny_ckpt: Path, llama: Llama) -> None:
    drafted = Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", max_seq_len=96, max_batch_size=4,
                          device="cpu", dtype="float32", draft="ngram", num_draft_tokens=4)
    with Server(drafted) as s:
        client = s.client()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda q: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
                .choices[0].message.content, QUESTIONS[:3]))
    assert got == [chat_want(llama, q, 24) for q in QUESTIONS[:3]]


# --- errors -------------------------------------------------------------------------------------------------


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_a_full_queue_answers_429(llama: Llama) -> None:
    with Server(llama, max_queue=1, slow=0.05) as s:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=60) for _ in range(8)]
            codes = sorted(f.result().status_code for f in futures)
        assert codes.count(200) == 5 and codes.count(429) == 3, codes  # 4 rows + 1 waiting
        refused = next(f.result() for f in futures if f.result().status_code == 429)
        e = error(refused, 429)
        assert refused.headers["retry-after"] == "1" and e["code"] == "queue_full" and e["type"] == "rate_limit_error"
        # The counts in the message add up: decoding + waiting = held, of the capacity (4 rows + 1 waiting).
        found = re.search(r"(\d+) sequences are decoding and (\d+) are waiting, (\d+) of the (\d+) it holds", e["message"])
        assert found, e["message"]
        decoding, waiting, held, capacity = map(int, found.groups())
        assert decoding + waiting == held and capacity == 5 and held + 1 > capacity, e["message"]


def test_an_internal_failure_is_500_and_the_server_goes_on(llama: Llama, caplog: pytest.LogCaptureFixture) -> None:
    bad = llama.tokenizer.encode("zebra", bos=False, eos=False)[-1]
    with Server(llama, fail_on=bad) as s:
        caplog.set_level(logging.ERROR, logger="llama_offload.serve")
        e = error(httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "a zebra", "max_tokens": 4},
                             timeout=30), 500)
        assert "injected failure" in e["message"] and e["type"] == "server_error"
        assert any("Traceback" in (r.exc_text or r.getMessage()) for r in caplog.records)
        r = s.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert r.choices[0].text == text_want(llama, "Hello", 4)


def test_the_api_key_is_enforced(llama: Llama) -> None:
    with Server(llama, api_key="sekrit") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        error(httpx.get(s.url + "/v1/models"), 401)
        assert [m.id for m in s.client("sekrit").models.list()] == [MODEL]
        assert httpx.get(s.url + "/health").status_code == 200  # a load balancer's probe needs no key


def test_shutdown_lets_an_in_flight_stream_finish(llama: Llama) -> None:
    """What SIGTERM does in uvicorn (should_exit): no new connections, the running stream completes, then the
    engine's thread ends."""
    s = Server(llama, slow=0.03).__enter__()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                if len(events) == 2:
                    s.server.should_exit = True  # mid-stream
    s.thread.join(30)
    assert not s.thread.is_alive() and not s.engine.thread.is_alive()
    assert events[-1] == "[DONE]"
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finish[-1] in ("length", "stop")
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    assert text == text_want(llama, "Once upon a time", 30)


def test_stopping_the_engine_ends_unfinished_requests_with_an_error(llama: Llama) -> None:
    """After the graceful-shutdown timeout, what is still running or waiting gets an error, not silence."""
    import asyncio

    from llama_offload.generate.decode import Sampling
    from llama_offload.serve.engine import EngineStopped, Request

    model = Slow(llama.model, 0.05)
    engine = Engine(lambda: BatchDecoderFor(llama, model), llama.tokenizer.decode, max_batch_size=1, max_queue=2)

    async def scenario() -> list[list[str]]:
        requests = [Request(f"r{i}", llama.tokenizer.encode("Hello", bos=True, eos=False), 50, Sampling(0.0),
                            frozenset(llama.tokenizer.stop_ids)) for i in range(2)]
        for r in requests:
            r.attach(asyncio.get_running_loop())
            engine.submit(r)
        engine.start()
        first = await requests[0].events.get()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        kinds = [[first.kind], []]
        for i, r in enumerate(requests):
            while True:
                kind = (await asyncio.wait_for(r.events.get(), 5)).kind
                kinds[i].append(kind)
                if kind in ("done", "error"):
                    break
        return kinds

    running, waiting = asyncio.run(scenario())
    assert running[-1] == "error" and waiting == ["error"]
    with pytest.raises(EngineStopped):
        engine.submit(Request("late", [1], 4, Sampling(0.0), frozenset()))


# --- the command ----------------------------------------------------------------------------------------------


def test_serve_command_starts_answers_and_stops_on_sigterm(tiny_ckpt: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llama_offload.cli.entry", "serve", "--ckpt_dir", str(tiny_ckpt),
                             "--port", str(port), "--max_seq_len", "64", "--max_batch_size", "2"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else line
            line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens > 0
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        rest = proc.stderr.read()
        print(rest)
        assert code == 143, rest  # 128 + SIGTERM, as the other commands end on it
        assert "Traceback" not in rest, rest
        assert "tokens in" in rest  # the request's log line
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ConnectionRefusedError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with socket.socket() as s:  # and a new server can take the port (as servers do, with SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_serve_refuses_bad_flags_before_loading(tiny_ckpt: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process (conftest.run_cli): a flag that got through would load the model, which fails here."""
    import llama_offload.cli.main as cli

    def loaded(options):
        raise AssertionError("the model was loaded: the flags were not refused first")

    monkeypatch.setattr(cli, "build_llama", loaded)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags, expected in ((["--port", "70000"], "--port must be a TCP port"),
                                (["--port", str(port)], "Another server may be using the port"),
                                (["--max_queue", "-1"], "--max_queue must be")):
            r = run_cli("serve", "--ckpt_dir", str(tiny_ckpt), *flags)
            assert r.returncode != 0 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
