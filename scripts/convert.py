"""Convert a GGUF file or a Hugging Face Llama directory into a Meta checkpoint directory.

    python scripts/convert.py gguf SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m-instruct
    python scripts/convert.py hf path/to/hf-model --out checkpoints/NAME --dtype bfloat16 --force

The result holds params.json, consolidated.00.pth, the tokenizer and llama_offload.json (the chat
format to use), and runs with the example scripts and `llama-offload` like any Meta checkpoint.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

try:  # Ctrl-C while torch is imported (a second or two) ends quietly too
    from llama_offload.files.cleanup import exit_on_signal
    from llama_offload.convert.gguf import convert_gguf
    from llama_offload.convert.hf import convert_hf
    from llama_offload.cli.options import fire_main
except KeyboardInterrupt:
    print("\nconvert: stopped by SIGINT; nothing was written.", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def gguf(path: str, out: str, dtype: Optional[str] = None, force: bool = False) -> None:
    """Convert a llama-architecture .gguf file (quantized or not).

    Args:
        path: the .gguf file.
        out: the checkpoint directory to create.
        dtype: unset (default) keeps quantized tensors as they are (exactly) and the others at their width;
            bfloat16, float16 or float32 dequantizes every weight to it.
        force: replace `out`, only a checkpoint a conversion wrote, once the new one is complete.
    """
    with exit_on_signal("convert"):  # SIGTERM / Ctrl-C: the partial output is removed, exit 143 / 130
        done = convert_gguf(path, out, dtype=dtype, force=force)
    print(done)


def hf(path: str, out: str, dtype: Optional[str] = None, force: bool = False) -> None:
    """Convert a Hugging Face Llama directory (config.json, *.safetensors, tokenizer files).

    Args:
        path: the directory.
        out: the checkpoint directory to create.
        dtype: bfloat16, float16 or float32; unset keeps the weights' own dtype.
        force: replace `out`, only a checkpoint a conversion wrote, once the new one is complete.
    """
    with exit_on_signal("convert"):
        done = convert_hf(path, out, dtype=dtype, force=force)
    print(done)


def main() -> None:
    # Unknown flags are refused before any work (fire itself would complain only after converting).
    fire_main({"gguf": gguf, "hf": hf}, name="convert")


if __name__ == "__main__":
    main()
