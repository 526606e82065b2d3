#!/usr/bin/env bash
# Install llama_offload and its test tools into the current Python.
# torch is installed only if it is missing, so an existing (CUDA) build is never replaced.
# Where it is missing: a machine with an NVIDIA driver gets PyPI's default (CUDA) build; a CPU-only
# machine gets the version named by LLAMA_OFFLOAD_TORCH (default torch==2.13.0, whose CPU build is
# what our CI machines carry locally, so setup takes seconds instead of downloading CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "${LLAMA_OFFLOAD_TORCH:-torch==2.13.0}"
  fi
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, fairscale, sentencepiece, fire; print(f'llama_offload set up: torch {torch.__version__}, fairscale {fairscale.__version__}, CUDA available: {torch.cuda.is_available()}')"
