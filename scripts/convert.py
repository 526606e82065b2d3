"""Convert a GGUF file or a Hugging Face Llama directory into a Meta checkpoint directory.

    python scripts/convert.py gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m-instruct
    python scripts/convert.py hf path/to/hf-model --out checkpoints/NAME --dtype bfloat16 --force

The result holds params.json, consolidated.00.pth, the tokenizer and llama_offload.json (the chat
format to use), and runs with the example scripts and `llama-offload` like any Meta checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

try:
    import llama_offload  # noqa: F401
except ImportError:  # run from a checkout without installing: python scripts/convert.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fire

from llama_offload.convert_gguf import convert_gguf
from llama_offload.convert_hf import convert_hf


def gguf(path: str, out: str, dtype: str = "bfloat16", force: bool = False) -> None:
    """Convert a llama-architecture .gguf file (quantized or not).

    Args:
        path: the .gguf file.
        out: the checkpoint directory to create.
        dtype: bfloat16 (default), float16 or float32: what the dequantized weights are stored as.
        force: replace `out` if it already exists (only once the new checkpoint is complete).
    """
    print(convert_gguf(path, out, dtype=dtype, force=force))


def hf(path: str, out: str, dtype: Optional[str] = None, force: bool = False) -> None:
    """Convert a Hugging Face Llama directory (config.json, *.safetensors, tokenizer files).

    Args:
        path: the directory.
        out: the checkpoint directory to create.
        dtype: bfloat16, float16 or float32; unset keeps the weights' own dtype.
        force: replace `out` if it already exists (only once the new checkpoint is complete).
    """
    print(convert_hf(path, out, dtype=dtype, force=force))


def main() -> None:
    try:
        fire.Fire({"gguf": gguf, "hf": hf}, name="convert")
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("LLAMA_OFFLOAD_TRACEBACK"):
            raise
        print(f"convert: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
