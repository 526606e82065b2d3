"""scripts/bench/bench_full_finetune.py (``bench_finetune.py --full``) on the CPU with a tiny shape: the paged-equals-
resident check, the rows and the table. The figures need a GPU and are produced there."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_in_process

REPO = Path(__file__).resolve().parents[2]


def test_tiny_full_run_checks_and_writes_its_table(tmp_path: Path) -> None:
    out, js = tmp_path / "full.md", tmp_path / "full.json"
    run = run_in_process("--full", "--device", "cpu", "--preset", "tiny", "--seq_lens", "32,64", "--check",
                         "--check_seq_len", "16", "--host_memory_gb", "4", "--out", str(out), "--json_out", str(js),
                         script=REPO / "scripts" / "bench" / "bench_finetune.py")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(js.read_text())
    check = result["check"]
    assert check["differing"] == 0 and check["master_bit_sums_equal"] and check["units_changed_by_training"] == "4 of 4"
    assert [r["seq_len"] for r in result["rows"]] == [32, 64]
    for r in result["rows"]:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["optimizer_busy_s"] > 0
        assert 0 <= r["exposed_fraction"] < 1 and len(r["losses"]) == 2
    assert "| tiny (fp32 moments) | 64 |" in out.read_text()
