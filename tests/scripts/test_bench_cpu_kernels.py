"""scripts/bench/bench_cpu_kernels.py on a small block: a row for every kernel that applies, and its flag errors."""

from __future__ import annotations

from pathlib import Path

from conftest import run_in_process
from scripts_loader import load_script

from llama_offload.kernels.cpu import gemv_available

bk = load_script("bench_cpu_kernels")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "bench_cpu_kernels.py"


def test_every_kernel_is_timed_on_every_format() -> None:
    got = bk.rows(64, 128, [1, 2], budget_s=0.0)
    kernels = {(w, t, k) for w, t, k, ms, gbps in got}
    assert all(ms > 0 and gbps > 0 for _, _, _, ms, gbps in got)
    assert ("float16", 2, "torch F.linear") in kernels and ("bfloat16", 1, "torch F.linear") in kernels
    if gemv_available(verbose=False):
        assert ("float16", 1, "llama_offload gemv") in kernels and ("int4 g64", 2, "llama_offload gemv, int16 x") in kernels
        assert ("int8 per channel", 1, "llama_offload gemv, fp32 x") in kernels


def test_bad_flags_are_refused_in_one_line() -> None:
    done = run_in_process("--tokens", "1,x", script=SCRIPT)  # the script as __main__, in this process
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--tokens must be positive integers" in done.stderr
