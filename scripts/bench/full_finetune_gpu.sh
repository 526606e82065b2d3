#!/usr/bin/env bash
# Every GPU proof and benchmark of full fine-tuning, in two parts that each fit one 10-minute device call:
#   bash scripts/bench/full_finetune_gpu.sh a   # CUDA tests; 7B paged == resident; 8B at 4k and 32k; 7B in 24 GiB
#   bash scripts/bench/full_finetune_gpu.sh b   # 8B at 128k; FSDP2 CPU offload (8B refused by its host check, 3B) and ours at 3B
# Results go to $OUT (default /tmp/full_finetune). Wheels for fairscale/fire, if not installed, from .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/full_finetune}
mkdir -p "$OUT"
if ! python -c "import fairscale, fire" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv; free -g | head -2
case "${1:-a}" in
a)
    timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests/train/test_cuda_full_finetune.py \
        tests/train/test_cuda_finetune.py > "$OUT/cuda_tests.txt" 2>&1; tail -5 "$OUT/cuda_tests.txt"
    timeout 400 python scripts/bench/bench_finetune.py --full --check --seq_lens 4096,32768 --steps 2 --consumer \
        --out "$OUT/full_8b.md" --json_out "$OUT/full_8b.json" 2> "$OUT/full_8b.log"
    tail -3 "$OUT/full_8b.log"; cat "$OUT/full_8b.md" ;;
b)
    timeout 300 python scripts/bench/bench_full_finetune.py --seq_lens 131072 --steps 1 --warmup 1 \
        --out "$OUT/full_8b_128k.md" --json_out "$OUT/full_8b_128k.json" 2> "$OUT/full_8b_128k.log"
    tail -3 "$OUT/full_8b_128k.log"; cat "$OUT/full_8b_128k.md"
    timeout 60 python scripts/bench/bench_fsdp2_offload.py --seq_lens 4096 --steps 1 --out "$OUT/fsdp2_8b.md" \
        --json_out "$OUT/fsdp2_8b.json" 2> "$OUT/fsdp2_8b.log"; cat "$OUT/fsdp2_8b.md"
    timeout 150 python scripts/bench/bench_fsdp2_offload.py --preset llama3.2-3b --seq_lens 4096,32768 --steps 2 \
        --out "$OUT/fsdp2_3b.md" --json_out "$OUT/fsdp2_3b.json" 2> "$OUT/fsdp2_3b.log"; cat "$OUT/fsdp2_3b.md"
    timeout 120 python scripts/bench/bench_full_finetune.py --preset llama3.2-3b --seq_lens 4096,32768 --steps 2 \
        --out "$OUT/full_3b.md" --json_out "$OUT/full_3b.json" 2> "$OUT/full_3b.log"; cat "$OUT/full_3b.md" ;;
*)
    echo "usage: bash scripts/bench/full_finetune_gpu.sh a|b" >&2; exit 2 ;;
esac
