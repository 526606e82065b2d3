#!/usr/bin/env bash
# Install llama_offload into the current Python: what a run needs, and with --test the test tools too.
#
#   bash scripts/setup.sh          # runtime dependencies only (what the chat, complete and serve commands use)
#   bash scripts/setup.sh --test   # and the test extras (pytest, the openai client, triton, ...)
#
# torch is installed only if it is missing, so an existing (CUDA) build is never replaced.
# Where it is missing: a machine with an NVIDIA driver gets PyPI's default (CUDA) build; a CPU-only
# machine gets the version named by LLAMA_OFFLOAD_TORCH (default torch==2.13.0, whose CPU build is
# what our CI machines carry locally, so setup takes seconds instead of downloading CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
target="."
case "${1:-}" in
  "") ;;
  --test) target=".[test]" ;;
  *) echo "setup.sh: unknown option '$1': expected nothing (runtime only) or --test (with the test tools)." >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "${LLAMA_OFFLOAD_TORCH:-torch==2.13.0}"
  fi
fi
"$PY" -m pip install -q -e "$target"
"$PY" -c "import torch, fairscale, sentencepiece, fire; print(f'llama_offload set up: torch {torch.__version__}, fairscale {fairscale.__version__}, CUDA available: {torch.cuda.is_available()}')"
