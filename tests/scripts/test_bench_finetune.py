"""scripts/bench/bench_finetune.py on the CPU with a tiny shape: the whole run (gradient check, rows, the longest
fitting length, its table and JSON). The figures need a GPU and are produced there."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_in_process

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_checks_gradients_and_writes_its_table(tmp_path: Path) -> None:
    out, js = tmp_path / "ft.md", tmp_path / "ft.json"
    # The script as __main__, in this process (conftest.run_in_process).
    run = run_in_process("--device", "cpu", "--preset", "tiny", "--seq_lens", "32", "--budgets", "2", "--long_preset",
                         "tiny", "--long_budget", "2", "--long_seq_lens", "32,64", "--check_grads", "--check_seq_len",
                         "16", "--out", str(out), "--json_out", str(js), script=REPO / "scripts" / "bench" / "bench_finetune.py")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(js.read_text())
    assert result["grads"]["bit_equal"] and result["grads"]["max_abs_diff"] == 0.0
    assert [r["seq_len"] for r in result["rows"]] == [32, 32, 64]
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert result["longest_fitting_seq_len"] == 64
    text = out.read_text()
    assert "| tiny | 32 | 2 GiB | 2 / 0 |" in text and "bit-equal" in text and "fits 2 GiB: 64" in text
