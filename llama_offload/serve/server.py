"""Serving a loaded ``Llama``: the engine and app built from it, run under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from ..generation import Llama
from .app import Served, create_app
from .engine import Engine


def served_from(llama: Llama, model_name: str) -> Served:
    tokenizer, chat_format = llama.tokenizer, llama.chat_format
    return Served(model_name=model_name, max_seq_len=llama.max_seq_len,
                  encode_text=lambda text: tokenizer.encode(text, bos=True, eos=False),
                  encode_chat=chat_format.encode_dialog_prompt, unsafe_chat=chat_format.contains_special_tags,
                  text_stop_ids=frozenset(tokenizer.stop_ids), chat_stop_ids=frozenset(chat_format.stop_ids))


def engine_for(llama: Llama, max_queue: int) -> Engine:
    # Every request brings its own sampling (decode.Sampling); the decoder's own settings are never used.
    return Engine(lambda: llama.decoder(temperature=0.0, top_p=1.0), llama.tokenizer.decode,
                  max_batch_size=llama.max_batch_size, max_queue=max_queue)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s llama_offload serve: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("llama_offload.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(llama: Llama, *, model_name: str, host: str, port: int, max_queue: int, api_key: Optional[str],
        shutdown_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests finish for up to
    ``shutdown_timeout`` seconds, then the engine ends the rest with an error and the port is freed."""
    import uvicorn

    setup_logging()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    app = create_app(engine_for(llama, max_queue), served_from(llama, model_name), api_key=api_key,
                     on_ready=lambda: print(f"llama_offload: serving {model_name} at {url} (OpenAI API; "
                                            f"{llama.max_batch_size} sequences per pass). Ctrl-C stops.",
                                            file=sys.stderr, flush=True))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    uvicorn.Server(config).run()
