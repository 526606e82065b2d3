"""Serving a loaded ``Llama``: the engine and app built from it, run under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Optional

import uvicorn

from llama_offload.text.chat_format import Llama3ChatFormat
from llama_offload.generate.generation import Llama
from llama_offload.serve.app import DEFAULT_MAX_BODY_MB, Served, create_app
from llama_offload.serve.engine import Engine
from llama_offload.serve.tools import Llama3Tools

DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# What uvicorn's own shutdown wait adds after the engine's drain: by then every response has its end (an answer or
# an error event), so this only covers writing it out.
_UVICORN_GRACE = 5.0


def served_from(llama: Llama, model_name: str) -> Served:
    tokenizer, chat_format = llama.tokenizer, llama.chat_format
    tools = Llama3Tools(chat_format) if isinstance(chat_format, Llama3ChatFormat) else None
    return Served(model_name=model_name, max_seq_len=llama.max_seq_len,
                  encode_text=lambda text: tokenizer.encode(text, bos=True, eos=False),
                  encode_chat=chat_format.encode_dialog_prompt, unsafe_chat=chat_format.contains_special_tags,
                  text_stop_ids=frozenset(tokenizer.stop_ids), chat_stop_ids=frozenset(chat_format.stop_ids),
                  vocab_size=tokenizer.n_words, chat_format=chat_format.name, tools=tools,
                  speculative=llama.draft is not None)


def engine_for(llama: Llama, max_queue: int) -> Engine:
    # Every request brings its own sampling (decode.Sampling); the decoder's own settings are never used.
    return Engine(lambda: llama.decoder(temperature=0.0, top_p=1.0), llama.tokenizer.decode,
                  max_batch_size=llama.max_batch_size, max_queue=max_queue)


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose shutdown first drains the engine: it stops listening, refuses new requests (503),
    gives the running and waiting ones ``shutdown_timeout`` seconds to finish, and ends the rest with an OpenAI
    error (an error event then [DONE] for streams). Only then does uvicorn's own shutdown run, with nothing left
    for it to cancel."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        for server in self.servers:
            server.close()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.drain, self.shutdown_timeout)
        await super().shutdown(sockets)


def make_server(engine: Engine, served: Served, *, host: str, port: int, api_key: Optional[str] = None,
                shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, max_body_mb: float = DEFAULT_MAX_BODY_MB,
                on_ready=None) -> GracefulServer:
    app = create_app(engine, served, api_key=api_key, on_ready=on_ready, max_body_bytes=int(max_body_mb * 2**20))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=_UVICORN_GRACE)
    return GracefulServer(config, engine, shutdown_timeout)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s llama_offload serve: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("llama_offload.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(llama: Llama, *, model_name: str, host: str, port: int, max_queue: int, api_key: Optional[str],
        shutdown_timeout: float, max_body_mb: float = DEFAULT_MAX_BODY_MB) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, let in-flight requests finish for up to ``shutdown_timeout``
    seconds, end the rest with an error, and free the port."""
    setup_logging()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    def ready() -> None:
        print(f"llama_offload: serving {model_name} at {url} (OpenAI API; {llama.max_batch_size} sequences per "
              "pass). Ctrl-C stops.", file=sys.stderr, flush=True)

    make_server(engine_for(llama, max_queue), served_from(llama, model_name), host=host, port=port, api_key=api_key,
                shutdown_timeout=shutdown_timeout, max_body_mb=max_body_mb, on_ready=ready).run()
