"""Make the default tiny random model (tokenizer + checkpoint) under checkpoints/tiny-random.

    python scripts/prepare_default_model.py            # does nothing if it is already there
    python scripts/prepare_default_model.py --force    # rebuild it

LLAMA_OFFLOAD_CHECKPOINTS moves the checkpoints directory elsewhere. The commands and example scripts
make this model on first use anyway; run this to do it ahead of time (e.g. in a container build).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import llama_offload  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_offload.default_model import prepare_default_model
from llama_offload.options import fire_main


def main(force: bool = False) -> None:
    """Prepare the default tiny random model unless it is complete; --force rebuilds it."""
    ckpt_dir, tokenizer_path = prepare_default_model(force=bool(force))
    print(f"ckpt_dir:       {ckpt_dir}")
    print(f"tokenizer_path: {tokenizer_path}")


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
