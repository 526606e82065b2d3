"""The server's OpenAI surface beyond plain completions: the request fields it honours (n, logprobs, penalties,
logit_bias, seed, lists of prompts, echo), Llama 3.x tool calling, the table of bad requests (exact status, type,
code and param for each, and no traceback in the log), the body limit, tokenization off the event loop, and a
shutdown that ends unfinished requests with OpenAI errors.

One server per model for the whole module (the tiny SentencePiece model, llama2 chat format; and a tiny Llama 3
model whose answers are scripted, for tool calls); tests that stop or slow a server start their own."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import openai
import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.generate.decode import BatchDecoder, Sampling
from llama_offload.generate.generation import Llama
from llama_offload.serve.engine import Engine
from llama_offload.serve.server import make_server, served_from
from llama_offload.serve.tools import FunctionSpec, Llama3Tools, Turn, Call, system_text, tool_mode
from test_serve import MODEL, BatchDecoderFor, Server, chat_want, error, free_port, text_want
from test_tiktoken import write_tiny_tiktoken

BODY_LIMIT_MB = 0.05  # the module's server refuses bodies over 50 KB


@pytest.fixture(scope="module")
def llama(tiny_ckpt: Path) -> Llama:
    return Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", max_seq_len=96, max_batch_size=4,
                       device="cpu", dtype="float32")


class LogCapture(logging.Handler):
    """Every record of the server's and uvicorn's loggers (uvicorn's do not reach the root logger)."""

    NAMES = ("llama_offload.serve", "uvicorn", "uvicorn.error", "uvicorn.access", "")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "LogCapture":
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        return [self.format(r) for r in self.records
                if r.exc_info or "Traceback" in r.getMessage() or "Exception in ASGI" in r.getMessage()]


@pytest.fixture(scope="module")
def server(llama: Llama) -> Iterator[Server]:
    with LogCapture() as logs, Server(llama, max_body_mb=BODY_LIMIT_MB) as s:
        s.logs = logs
        yield s


# --- sampling: penalties and bias in decode.py ------------------------------------------------------------


class Constant:
    """A step model whose logits are the same vector at every position: greedy decoding with penalties can then
    be worked out by hand."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.max_positions = logits, 64

    def step(self, step):
        bs, seqlen = step.tokens.shape
        if step.last is not None:
            return self.logits.expand(bs, -1).clone()
        return self.logits.expand(bs, seqlen, -1).clone()


def by_hand(logits: list[float], n: int, presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
    counts = [0] * len(logits)
    out = []
    for _ in range(n):
        adjusted = [v - presence * (c > 0) - frequency * c + bias.get(t, 0.0)
                    for t, (v, c) in enumerate(zip(logits, counts))]
        token = max(range(len(adjusted)), key=adjusted.__getitem__)
        counts[token] += 1
        out.append(token)
    return out


@pytest.mark.parametrize(("presence", "frequency", "bias"), [(0.0, 0.7, {}), (1.5, 0.0, {}), (0.4, 0.3, {2: 0.47}),
                                                             (0.0, 0.0, {5: 3.0}), (0.0, 0.0, {})])
def test_penalties_and_bias_are_openais_formula(presence: float, frequency: float, bias: dict[int, float]) -> None:
    logits = [3.0, 2.63, 2.21, 1.07, 0.53, 0.11]  # no two adjusted values tie
    decoder = BatchDecoder(Constant(torch.tensor(logits)), max_batch_size=2, max_seq_len=64, device=torch.device("cpu"),
                           temperature=0.0)
    sampling = Sampling(0.0, presence_penalty=presence, frequency_penalty=frequency, logit_bias=tuple(bias.items()))
    seq, plain = decoder.join([[1, 2], [1]], 12, set(), sampling=[sampling, Sampling(0.0)])
    while decoder.active:
        decoder.step()
    assert seq.tokens == by_hand(logits, 12, presence, frequency, bias)
    assert plain.tokens == [0] * 12  # the row beside it is untouched


def test_zero_penalties_are_bit_identical_to_generate(llama: Llama) -> None:
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ("Once upon a time", "Hello", "The sky")]
    want, want_lp = llama.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    decoder = llama.decoder(temperature=0.0, top_p=1.0)
    zero = Sampling(0.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=(), logprobs=True)
    biased = Sampling(0.0, frequency_penalty=1.5, logit_bias=((7, 2.0),))
    seqs = decoder.join(prompts, 20, llama.tokenizer.stop_ids, sampling=[zero, biased, None])
    while decoder.active:
        decoder.step()
    assert seqs[0].tokens == want[0] and seqs[2].tokens == want[2]  # beside a penalized sequence, too
    assert seqs[0].logprobs == want_lp[0]
    assert seqs[1].tokens != want[1]  # the penalties really change the answer


# --- fields honoured, through OpenAI's client -----------------------------------------------------------------


def test_n_seed_and_a_list_of_prompts(server: Server, llama: Llama) -> None:
    client = server.client()
    greedy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, n=2,
                                       user="someone")
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.text for c in greedy.choices] == [text_want(llama, "Once upon a time", 10)] * 2
    sampled = [client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, temperature=1.0, n=3, seed=7)
               for _ in range(2)]
    texts = [[c.text for c in r.choices] for r in sampled]
    assert texts[0] == texts[1]  # the same seed, the same choices
    assert len(set(texts[0])) > 1  # and the choices are not copies of one another
    prompts = ["Once upon a time", "The capital of France is"]
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [text_want(llama, p, 8) for p in prompts for _ in range(2)]
    assert both.usage.prompt_tokens == sum(len(llama.tokenizer.encode(p, bos=True, eos=False)) for p in prompts)
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    assert both.usage.completion_tokens == 2 * sum(len(t) for t in llama.generate(ids, 8, temperature=0)[0])
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2,
                                           stream=True):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert [streamed[i] for i in range(4)] == [c.text for c in both.choices]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, n=2)
    assert [c.message.content for c in chat.choices] == [chat_want(llama, "Hi", 6)] * 2


def test_echo_penalties_and_bias(server: Server, llama: Llama) -> None:
    client = server.client()
    want = text_want(llama, "Once upon a time", 10)
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                    presence_penalty=0, frequency_penalty=0, logit_bias={}, echo=True)
    assert got.choices[0].text == "Once upon a time" + want
    token = llama.tokenizer.encode("zebra", bos=False, eos=False)[-1]
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].text == llama.tokenizer.decode([token] * 5)
    prompt = llama.tokenizer.encode("Once upon a time", bos=True, eos=False)
    penalized = Sampling(0.0, presence_penalty=-2.0, frequency_penalty=0.5)  # its greedy answer has no repeats
    decoder = llama.decoder(temperature=0.0, top_p=1.0)
    (seq,) = decoder.join([prompt], 16, llama.tokenizer.stop_ids, sampling=[penalized])
    while decoder.active:
        decoder.step()
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                    presence_penalty=-2.0, frequency_penalty=0.5)
    assert got.choices[0].text == llama.tokenizer.decode(seq.tokens) != text_want(llama, "Once upon a time", 16)


def test_logprobs_in_both_shapes(server: Server, llama: Llama) -> None:
    client = server.client()
    prompt_ids = llama.tokenizer.encode("Once upon a time", bos=True, eos=False)
    (tokens,), (want,) = llama.generate([prompt_ids], max_gen_len=8, temperature=0, logprobs=True)
    got = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == want and len(lp.tokens) == len(tokens) == 8
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)  # greedy: the chosen one is the top
    dialog = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    assert all(bytes(e.bytes) == e.token.encode() for e in content)
    streamed = [e for c in client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=8, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_tokenization_runs_off_the_event_loop(llama: Llama) -> None:
    """A prompt whose tokenization takes a second holds up no other request."""
    served = served_from(llama, MODEL)
    encode = served.encode_text

    def slow(text: str) -> list[int]:
        if "SLOW" in text:
            time.sleep(1.5)
        return encode(text)

    served.encode_text = slow
    engine = Engine(lambda: BatchDecoderFor(llama, llama.model), llama.tokenizer.decode, max_batch_size=2,
                    max_queue=2)
    port = free_port()
    srv = make_server(engine, served, host="127.0.0.1", port=port)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow_one = pool.submit(httpx.post, url + "/v1/completions", timeout=30,
                                   json={"model": MODEL, "prompt": "SLOW prompt", "max_tokens": 2})
            time.sleep(0.3)  # the slow prompt is being tokenized now
            start = time.perf_counter()
            quick = httpx.post(url + "/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
            quick_s = time.perf_counter() - start
            assert quick.status_code == 200 and not slow_one.done()
            assert slow_one.result().status_code == 200
        assert quick_s < 1.0, f"a quick request waited {quick_s:.2f} s behind a slow tokenization"
    finally:
        srv.should_exit = True
        thread.join(20)


# --- tool calls (Llama 3.x JSON format) -----------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def respond(prompt: str) -> str:
    """The scripted model's answer to a rendered Llama 3 prompt."""
    last_turn = prompt.rsplit("<|start_header_id|>", 2)[-2]
    if last_turn.startswith("ipython"):
        return "It is sunny in Paris."
    if '"name": "get_weather"' in prompt and "weather" in last_turn:
        return CALL
    return "Hello there."


class Scripted:
    """A Llama 3 step model that writes ``respond(prompt)`` after the last assistant header, token by token,
    then <|eom_id|> after a call and <|eot_id|> after text. It keeps each cache row's tokens, as a KV cache
    would."""

    def __init__(self, tokenizer: Any, vocab: int, max_positions: int):
        self.tok, self.vocab, self.max_positions = tokenizer, vocab, max_positions
        self.rows: dict[int, list[int]] = {}
        self.header = tokenizer.token_to_id("<|start_header_id|>")
        self.assistant = tokenizer.encode("assistant", bos=False, eos=False)
        self.blank = tokenizer.encode("\n\n", bos=False, eos=False)

    def next_token(self, history: list[int]) -> int:
        starts = [i for i, t in enumerate(history) if t == self.header
                  and history[i + 1 : i + 1 + len(self.assistant)] == self.assistant]
        body = starts[-1] + len(self.assistant) + 2 + len(self.blank)  # past <|end_header_id|> and "\n\n"
        prompt, so_far = self.tok.decode(history[:body]), self.tok.decode(history[body:])
        answer = respond(prompt)
        rest = answer[len(so_far) :] if answer.startswith(so_far) else ""
        if not rest:
            return self.tok.token_to_id("<|eom_id|>" if answer.startswith("{") else "<|eot_id|>")
        return self.tok.encode(rest, bos=False, eos=False)[0]

    def step(self, step):
        tokens, positions = step.tokens.tolist(), step.input_pos.tolist()
        bs, seqlen = step.tokens.shape
        out = torch.zeros(bs, self.vocab)
        for i in range(bs):
            history = self.rows.setdefault(step.shape.row0 + i, [])
            for t, p in zip(tokens[i], positions[i]):
                del history[p:]
                history.append(t)
            last = step.last[i].item() if step.last is not None else seqlen - 1
            out[i, self.next_token(history[: positions[i][last] + 1])] = 20.0
        return out if step.last is not None else out[:, None].expand(bs, seqlen, self.vocab)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    root = tmp_path_factory.mktemp("llama3_tools")
    tokenizer_path = write_tiny_tiktoken(root / "tokenizer.model")
    from llama_offload.text.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_path).n_words
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, multiple_of=16)
    save_checkpoint(random_state_dict(args, seed=0), args, root / "tiny3")
    llama = Llama.build(root / "tiny3", tokenizer_path, max_seq_len=1024, max_batch_size=2, device="cpu",
                        dtype="float32")
    assert llama.chat_format.name == "llama3"
    return llama


@pytest.fixture(scope="module")
def tool_server(llama3: Llama) -> Iterator[Server]:
    with LogCapture() as logs, Server(llama3, model=Scripted(llama3.tokenizer, llama3.tokenizer.n_words,
                                                                  llama3.model.max_positions)) as s:
        s.logs = logs
        yield s


def test_the_tool_prompt_is_metas_json_layout(llama3: Llama) -> None:
    tools = Llama3Tools(llama3.chat_format)
    functions = [FunctionSpec("get_weather", "The weather in a city", WEATHER["function"]["parameters"])]
    turns = [Turn("system", "Be brief."), Turn("user", "What is the weather in Paris?"),
             Turn("assistant", "", [Call("get_weather", {"city": "Paris"})]), Turn("ipython", '{"sky": "clear"}')]
    mode = tool_mode(functions, "auto")
    rendered = llama3.tokenizer.decode(tools.encode(turns, system_text(functions, "auto"), mode))
    listing = json.dumps({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                           "parameters": WEATHER["function"]["parameters"]}}, indent=4)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n\n"
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the functions can be used, answer the question directly, without calling one.\n"
        "Here is a list of functions in JSON format:\n"
        f"{listing}\n\n"
        'To call a function, respond with only a JSON object in the format {"name": function name, "parameters": '
        "dictionary of argument name and its value}. Do not use variables.\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{CALL}<|eom_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"sky": "clear"}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    named = tool_mode(functions, "named", "get_weather")
    ids = tools.encode(turns[:2], system_text(functions, "named", "get_weather"), named)
    assert llama3.tokenizer.decode(ids).endswith('<|end_header_id|>\n\n{"name": "get_weather", "parameters": ')
    assert Llama3Tools.parse(CALL + " ", frozenset({"get_weather"})) == [Call("get_weather", {"city": "Paris"})]
    assert Llama3Tools.parse("<|python_tag|>" + CALL, frozenset({"get_weather"})) is not None
    assert Llama3Tools.parse(CALL, frozenset({"other"})) is None  # a function it was not given
    assert Llama3Tools.parse("Sure: " + CALL, frozenset({"get_weather"})) is None  # text, not a call
    assert Llama3Tools.parse('[{"name": "a", "arguments": "{\\"x\\": 1}"}, {"name": "a", "parameters": {}}]',
                             frozenset({"a"})) == [Call("a", {"x": 1}), Call("a", {})]


def test_tool_calls_through_openais_client(tool_server: Server) -> None:
    client = tool_server.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    got = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    (streamed,) = [tc for d in deltas if d.tool_calls for tc in d.tool_calls]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(d.content or "" for d in deltas) == ""  # the call's JSON never goes out as text

    # The answer goes back as a tool message; the model then answers in text.
    history = ask + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0)
    assert final.choices[0].message.content == "It is sunny in Paris." and final.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], temperature=0, stream=True))
    assert text == "It is sunny in Paris."

    hello = [{"role": "user", "content": "Say hello."}]
    auto = client.chat.completions.create(model=MODEL, messages=hello, tools=[WEATHER], temperature=0)
    assert auto.choices[0].message.content == "Hello there." and not auto.choices[0].message.tool_calls
    none = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="none",
                                          temperature=0)  # no functions in the prompt: the model answers in text
    assert none.choices[0].message.content == "Hello there." and none.choices[0].finish_reason == "stop"
    named = client.chat.completions.create(model=MODEL, messages=hello, tools=[WEATHER], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # The named call is started for the model; this scripted one cannot finish it, so it comes back as text.
    assert named.choices[0].message.content == '{"name": "get_weather", "parameters": '
    required = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], temperature=0,
                                              tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert tool_server.logs.tracebacks() == []


# --- bad requests: the table ----------------------------------------------------------------------------------

C, X = "/v1/completions", "/v1/chat/completions"
P = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}  # a good completion request
M = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}  # a good chat request
U = {"role": "user", "content": "What is the weather in Paris?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
INVALID, UNSUPPORTED = "invalid_request_error", "unsupported_value"

# (name, which server, path, body (dict, or raw bytes), status, type, code, param)
BAD_REQUESTS = [
    ("malformed-json", "sp", C, b'{"model": "tiny", "prompt": ', 400, INVALID, "invalid_json", None),
    ("body-not-an-object", "sp", C, b'["tiny"]', 400, INVALID, "invalid_type", None),
    ("empty-prompt", "sp", C, {**P, "prompt": ""}, 400, INVALID, "invalid_value", "prompt"),
    ("empty-prompt-list", "sp", C, {**P, "prompt": []}, 400, INVALID, "invalid_value", "prompt"),
    ("empty-prompt-in-list", "sp", C, {**P, "prompt": ["Hi", ""]}, 400, INVALID, "invalid_value", "prompt"),
    ("token-id-prompt", "sp", C, {**P, "prompt": [1, 2, 3]}, 400, INVALID, "invalid_value", "prompt"),
    ("missing-model", "sp", C, {"prompt": "Hi"}, 400, INVALID, "missing_required_parameter", "model"),
    ("unknown-field", "sp", C, {**P, "foo": 1}, 400, INVALID, "unknown_parameter", "foo"),
    ("max-tokens-string", "sp", C, {**P, "max_tokens": "8"}, 400, INVALID, "invalid_type", "max_tokens"),
    ("max-tokens-zero", "sp", C, {**P, "max_tokens": 0}, 400, INVALID, "invalid_value", "max_tokens"),
    ("temperature-3", "sp", C, {**P, "temperature": 3}, 400, INVALID, "invalid_value", "temperature"),
    ("top-p-0", "sp", C, {**P, "top_p": 0}, 400, INVALID, "invalid_value", "top_p"),
    ("n-0", "sp", C, {**P, "n": 0}, 400, INVALID, "invalid_value", "n"),
    ("n-over-capacity", "sp", C, {**P, "n": 13}, 400, INVALID, "invalid_value", "n"),
    ("prompts-over-capacity", "sp", C, {**P, "prompt": ["Hi"] * 13}, 400, INVALID, "invalid_value", "prompt"),
    ("presence-penalty-3", "sp", C, {**P, "presence_penalty": 3}, 400, INVALID, "invalid_value", "presence_penalty"),
    ("frequency-penalty-str", "sp", C, {**P, "frequency_penalty": "1"}, 400, INVALID, "invalid_type",
     "frequency_penalty"),
    ("logit-bias-not-an-id", "sp", C, {**P, "logit_bias": {"abc": 1}}, 400, INVALID, "invalid_value", "logit_bias"),
    ("logit-bias-past-vocab", "sp", C, {**P, "logit_bias": {"512": 1}}, 400, INVALID, "invalid_value", "logit_bias"),
    ("logit-bias-200", "sp", C, {**P, "logit_bias": {"5": 200}}, 400, INVALID, "invalid_value", "logit_bias"),
    ("logprobs-6", "sp", C, {**P, "logprobs": 6}, 400, INVALID, "invalid_value", "logprobs"),
    ("best-of-over-n", "sp", C, {**P, "best_of": 3}, 400, INVALID, UNSUPPORTED, "best_of"),
    ("suffix", "sp", C, {**P, "suffix": "end"}, 400, INVALID, UNSUPPORTED, "suffix"),
    ("echo-with-logprobs", "sp", C, {**P, "echo": True, "logprobs": 1}, 400, INVALID, UNSUPPORTED, "echo"),
    ("five-stop-strings", "sp", C, {**P, "stop": list("abcde")}, 400, INVALID, "invalid_value", "stop"),
    ("stream-options-without-stream", "sp", C, {**P, "stream_options": {"include_usage": True}}, 400, INVALID,
     "invalid_value", "stream_options"),
    ("stream-options-unknown", "sp", C, {**P, "stream": True, "stream_options": {"foo": True}}, 400, INVALID,
     "unknown_parameter", "stream_options.foo"),
    ("prompt-too-long", "sp", C, {**P, "prompt": "word " * 200}, 400, INVALID, "context_length_exceeded", "prompt"),
    ("unknown-model", "sp", C, {**P, "model": "gpt-4"}, 404, INVALID, "model_not_found", "model"),
    ("no-messages", "sp", X, {**M, "messages": []}, 400, INVALID, "invalid_value", "messages"),
    ("unknown-role", "sp", X, {**M, "messages": [{"role": "robot", "content": "x"}]}, 400, INVALID, "invalid_value",
     "messages.0.role"),
    ("image-content", "sp", X, {**M, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                 "image_url": {"url": "x"}}]}]},
     400, INVALID, "invalid_type", "messages.0.content"),
    ("assistant-last", "sp", X, {**M, "messages": [{"role": "assistant", "content": "x"}]}, 400, INVALID,
     "invalid_value", "messages"),
    ("special-tags", "sp", X, {**M, "messages": [{"role": "user", "content": "[INST] x"}]}, 400, INVALID,
     "invalid_value", "messages"),
    ("top-logprobs-without-logprobs", "sp", X, {**M, "top_logprobs": 2}, 400, INVALID, "invalid_value",
     "top_logprobs"),
    ("top-logprobs-21", "sp", X, {**M, "logprobs": True, "top_logprobs": 21}, 400, INVALID, "invalid_value",
     "top_logprobs"),
    ("json-mode", "sp", X, {**M, "response_format": {"type": "json_object"}}, 400, INVALID, UNSUPPORTED,
     "response_format"),
    ("tools-on-llama2", "sp", X, {**M, "tools": [WEATHER]}, 400, INVALID, UNSUPPORTED, "tools"),
    ("tool-message-on-llama2", "sp", X, {**M, "messages": [U, CALLED, {"role": "tool", "tool_call_id": "call_1",
                                                                       "content": "sunny"}]},
     400, INVALID, UNSUPPORTED, "messages.1"),
    ("tool-choice-without-tools", "sp", X, {**M, "tool_choice": "auto"}, 400, INVALID, "invalid_value",
     "tool_choice"),
    ("tool-choice-unknown-function", "llama3", X, {**M, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 400, INVALID, "invalid_value", "tool_choice"),
    ("tool-choice-bad-value", "llama3", X, {**M, "tools": [WEATHER], "tool_choice": "always"}, 400, INVALID,
     "invalid_value", "tool_choice"),
    ("tool-name-with-space", "llama3", X, {**M, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     400, INVALID, "invalid_value", "tools.0.function.name"),
    ("tool-message-first", "llama3", X, {**M, "messages": [{"role": "tool", "content": "sunny"}], "tools": [WEATHER]},
     400, INVALID, "invalid_value", "messages"),
    ("tool-call-arguments-not-json", "llama3", X, {**M, "tools": [WEATHER], "messages": [
        U, {**CALLED, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather",
                                                                                   "arguments": "Paris"}}]},
        {"role": "tool", "content": "sunny"}]}, 400, INVALID, "invalid_value", "messages.1.tool_calls.0.function.arguments"),
    ("oversize-body", "sp", C, {**P, "prompt": "x" * int(BODY_LIMIT_MB * 2**20 + 10)}, 413, INVALID,
     "request_too_large", None),
]


@pytest.mark.parametrize(("name", "which", "path", "body", "status", "kind", "code", "param"), BAD_REQUESTS,
                         ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests_table(server: Server, tool_server: Server, name: str, which: str, path: str, body: Any,
                            status: int, kind: str, code: str, param: Optional[str]) -> None:
    s = server if which == "sp" else tool_server
    before = len(s.logs.records)
    if isinstance(body, bytes):
        r = httpx.post(s.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(s.url + path, json=body, timeout=30)
    e = error(r, status)
    assert (e["type"], e["code"], e["param"]) == (kind, code, param), e
    assert len(e["message"]) > 20 and "Traceback" not in e["message"]
    assert [r for r in s.logs.records[before:] if r.levelno >= logging.WARNING] == []  # no traceback, no noise


def test_other_bad_requests(server: Server) -> None:
    e = error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert (e["type"], e["code"], e["param"]) == (INVALID, "unknown_url", None)
    e = error(httpx.get(server.url + "/v1/completions"), 405)
    assert (e["type"], e["code"]) == (INVALID, "method_not_allowed")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for a chunked body too
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(8):
            yield b"x" * 10_000
        yield b'"}'

    e = error(httpx.post(server.url + C, content=chunks(), headers={"content-type": "application/json"}), 413)
    assert e["code"] == "request_too_large" and "--max_body_mb" in e["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model=MODEL, prompt="", max_tokens=2)
    assert raised.value.body["param"] == "prompt"
    assert server.logs.tracebacks() == []


# --- shutdown -------------------------------------------------------------------------------------------------


def test_shutdown_ends_unfinished_requests_with_openai_errors(llama: Llama) -> None:
    """SIGTERM (should_exit): the in-flight stream gets --shutdown_timeout seconds, then an error event and
    [DONE]; a non-streamed request gets a 503 in OpenAI's shape; nothing is cancelled and no traceback is
    logged."""
    with LogCapture() as logs:
        s = Server(llama, slow=0.1, shutdown_timeout=0.5).__enter__()
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 80, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, s.url + C, json=body, timeout=60)
            events = []
            with httpx.stream("POST", s.url + C, json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        if len(events) == 2:
                            s.server.should_exit = True  # mid-stream
            refused = plain.result()
        s.thread.join(30)
    assert not s.thread.is_alive() and not s.engine.thread.is_alive()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert set(last) == {"error"} and last["error"]["code"] == "server_shutting_down", last
    assert "--shutdown_timeout" in last["error"]["message"] and last["error"]["type"] == "server_error"
    assert all(json.loads(e)["choices"] for e in events[:-2])  # text chunks before it, no finish
    e = error(refused, 503)
    assert (e["type"], e["code"]) == ("server_error", "server_shutting_down")
    assert logs.tracebacks() == []
    assert not [r for r in logs.records if "Cancel" in r.getMessage()]  # uvicorn had nothing left to cancel
