"""scripts/bench/bench_serve.py: its statistics and table, and one small run against the tiny model on the CPU."""

from __future__ import annotations

from scripts_loader import load_script


def test_percentiles_and_table() -> None:
    bench = load_script("bench_serve")
    assert bench.percentile([3.0, 1.0, 2.0, 4.0, 5.0], 0.5) == 3.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.95) == 10.0
    rows = [{"clients": 1, "requests": 2, "tokens": 20, "aggregate_tok_s": 10.0, "per_request_tok_s": 10.0,
             "p50_s": 1.0, "p95_s": 1.1},
            {"clients": 4, "requests": 8, "tokens": 80, "aggregate_tok_s": 35.0, "per_request_tok_s": 8.8,
             "p50_s": 1.2, "p95_s": 1.4}]
    text = bench.table(rows)
    assert "| 4 | 8 | 80 | 35.0 | 3.50x | 8.8 | 1.20 | 1.40 |" in text
    # With a pass's PCIe floor of 0.25 s, 4 clients get at most 16 tok/s; 14 is 0.88 of that.
    rows[1]["aggregate_tok_s"] = 14.0
    text = bench.table(rows, floor_s=0.25)
    assert "| floor tok/s | aggregate / floor |" in text.splitlines()[0]
    assert "| 4 | 8 | 80 | 14.0 | 1.40x | 16.0 | 0.88 | 8.8 | 1.20 | 1.40 |" in text
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines())


def test_a_small_run_on_the_tiny_model(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("LLAMA_OFFLOAD_DEFAULT_MODEL", "tiny-random")
    monkeypatch.setenv("LLAMA_OFFLOAD_CHECKPOINTS", str(tmp_path / "ckpts"))
    bench = load_script("bench_serve")
    out = tmp_path / "serve.md"
    bench.main(["--dtype", "float32", "--clients", "1,2", "--rounds", "1", "--max_tokens", "4", "--max_seq_len", "64",
                "--out", str(out)])
    lines = out.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "unoffloaded on the CPU" in lines[0]
