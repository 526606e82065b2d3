"""scripts/bench/bench_hybrid.py on the CPU: its table (ratios to the floor and to llama.cpp, the split, failures) and
its decode timer on a tiny model. The benchmark itself needs a GPU (and runs there, not here)."""

from __future__ import annotations

import torch

from scripts_loader import load_script
from tiny import tiny_args, tiny_model

bh = load_script("bench_hybrid")


def test_table_shows_the_split_and_the_ratios() -> None:
    rows = [{"name": "ours hybrid", "budget_gib": 0.0, "resident": 0, "paged": 16, "cpu": 16, "b1_ms": 120.0,
             "b8_ms": 130.0, "expected_ms": 118.0, "vs_llamacpp": 0.73},
            {"name": "llama.cpp F16, -ngl 0", "resident": 0, "b1_ms": 164.0, "note": "a | b"},
            {"name": "ours all paged", "budget_gib": 8.0, "note": "FAILED: RuntimeError: x"}]
    text = bh.table(rows, floor_ms=240.0)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == 10 for line in lines)
    assert "| ours hybrid | 0 | 0 / 16 / 16 | 120.0 | 0.50 | 130.0 | 118.0 | 0.73 |" in text
    assert "| 0 on the GPU, the rest on the CPU | 164.0 | 0.68 |" in text and "a / b" in text
    assert "FAILED: RuntimeError: x" in text and "| n/a | n/a |" in text


def test_decode_timer_runs_greedy_steps(monkeypatch) -> None:
    args = tiny_args()
    model = tiny_model(args)
    model.setup_caches(2, 64, "cpu", torch.float32)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self)  # the timer puts its prompt on the GPU
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms = bh.decode_ms(model, args.vocab_size, batch=2, steps=3)
    assert ms > 0


def test_the_header_names_every_kernel_timed_and_the_one_that_runs() -> None:
    from llama_offload.offload.plan import LaneTimes

    lanes = LaneTimes(50.0, ((1, 5.0),), threads=15, cpu_kernel="gemv", kernel_ms=(("torch", 9.31), ("gemv", 5.02)))
    assert bh.kernels(lanes) == "torch 9.31 ms, gemv 5.02 ms (runs gemv)"
    assert bh.kernels(LaneTimes(50.0, ((1, 5.0),), threads=15)) == "torch (runs torch)"


def test_profile_lines_name_where_the_time_goes() -> None:
    rows = [{"name": "ours hybrid", "budget_gib": 0.0, "profile": {"step_ms": 100.0, "wait_ms": 20.0, "cpu_ms": 70.0,
                                                                  "gpu_ms": 5.0, "copy_busy_ms": 95.0,
                                                                  "copies_per_step": 13.0}},
            {"name": "ours all paged", "budget_gib": 0.0}]
    text = bh.profiles(rows)
    assert "- ours hybrid, 0 GiB: step 100.0 ms; host: waiting at crossings 20.0, CPU blocks 70.0, streamed blocks " \
           "5.0; copy lane busy 95.0 ms (13 copies)" in text
    assert "all paged" not in text and bh.profiles(rows[1:]) == ""
