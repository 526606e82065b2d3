"""scripts/bench/bench_cpu_default.py on tiny checkpoints: every variant's row adds up (bytes, floor, ratio), the quantized
checkpoint's answers are compared with its float32 original's, the section lands between its markers, and bad
arguments are refused. The figures themselves come from the real model (BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_offload.model.quant import QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint

from scripts_loader import load_script

bench = load_script("bench_cpu_default")


def test_rows_add_up_and_the_section_is_written(tiny_ckpt: Path, tmp_path: Path) -> None:
    q4 = quantize_checkpoint(tiny_ckpt, tmp_path / "tiny-q4", QuantSpec(4, 32))
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nbefore\n")
    rows = bench.main(max_gen_len=4, ckpt_dir=str(q4), fp32_dir=str(tiny_ckpt), drafts=True, out=str(out))
    assert [r["variant"].split(" ")[0] for r in rows] == ["default", "float32", "int8", "default,"]
    for r in rows:
        assert r["decoded"] > 0 and r["tokens_per_s"] > 0 and r["answers"] == 4
        assert r["floor_ms"] > 0 and r["ratio_to_floor"] == pytest.approx(r["ms_per_token"] / r["floor_ms"], rel=0.02)
    ref = rows[1]
    assert ref["identical"] is None and ref["kernel"] == "torch"
    # The quantized checkpoint reads fewer bytes a token than its float32 original.
    assert rows[0]["step_mb"] < ref["step_mb"] and rows[2]["step_mb"] < ref["step_mb"]
    assert all(0 <= r["identical"] <= 4 for r in rows if r is not ref)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n") and bench.MARK_START in text and bench.MARK_END in text
    assert "| float32 (the GGUF converted with --dtype float32) | torch |" in text
    # Written again, the section is replaced, not repeated.
    bench.write_section(out, bench.section({"command": "c", "date": "d", "cpu": "x", "threads": 2, "torch": "t",
                                            "gbps": 10.0, "answers": 4, "max_gen_len": 4}, rows))
    assert out.read_text().count(bench.MARK_START) == 1


def test_step_bytes_count_one_embedding_row(tiny_ckpt: Path) -> None:
    from llama_offload.checkpoint.load import load_model

    model = load_model(tiny_ckpt, max_seq_len=32, max_batch_size=1, show_progress=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.tok_embeddings.weight
    assert bench.step_bytes(model) == weights - embedding.numel() * 4 + embedding.shape[1] * 4


def test_a_bad_length_is_refused() -> None:
    with pytest.raises(ValueError, match="--max_gen_len must be an integer of at least 2"):
        bench.main(max_gen_len=1)
