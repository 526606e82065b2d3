"""scripts/bench/bench_speculative.py on the CPU: its real-model part on a tiny checkpoint (every draft's greedy tokens
equal plain greedy decoding's, and the row's counts add up), its tables and the section it writes, and its
argument errors. The 7B-shaped part and the timings need a GPU (and run there, not here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts_loader import load_script

bs = load_script("bench_speculative")


def test_real_part_checks_every_draft_against_plain_greedy(tiny_ckpt: Path) -> None:
    texts = ["Once upon a time there was a planet. Once upon a time", "The Sun sits at the centre"]
    rows = bs.bench_real(str(tiny_ckpt), str(tiny_ckpt.parent / "tokenizer.model"), ["ngram", "int8"], [2],
                         max_gen_len=12, max_seq_len=128, texts=texts)
    assert [(r["variant"], r["k"]) for r in rows] == [("plain", None), ("ngram", 2), ("int8", 2)]
    plain = rows[0]
    assert plain["tokens_per_pass"] == 1.0 and plain["identical"] is None and plain["prompts"] == 2
    for r in rows[1:]:
        assert r["identical"] is True, r
        assert r["decoded"] == plain["decoded"]  # same tokens, so the same count
        assert 1.0 <= r["tokens_per_pass"] <= 3.0  # at most K + 1 per pass
        assert r["passes"] <= plain["passes"]
        assert r["speedup"] > 0
    text = bs.section({"command": "python scripts/bench/bench_speculative.py", "device": "cpu", "torch": "x",
                       "date": "2026-12-04", "bandwidth_gbps": 50.0, "model": "tiny", "max_gen_len": 12,
                       "shape": "7b", "steps": 4}, rows, [])
    assert text.startswith(bs.MARK_START) and text.endswith(bs.MARK_END)
    assert "| ngram | 2 |" in text and "| yes |" in text and "| NO |" not in text


def test_shape_table_shows_ratio_to_floor_and_projection() -> None:
    rows = [{"variant": "plain", "k": None, "ms_per_pass": 260.0, "floor_ms": 250.0, "tokens_per_pass": 1.0},
            {"variant": "int4", "k": 4, "ms_per_pass": 300.0, "floor_ms": 250.0, "random_tokens_per_pass": 1.1,
             "identical": True, "tokens_per_pass": 3.0, "tokens_per_s": 10.0, "speedup": 2.6}]
    table = bs.table_shape(rows)
    assert "| int4 | 4 | 300.0 | 250.0 | 1.20 | 1.10 | yes | 3.00 | 10.0 | 2.60 |  |" in table
    assert "| plain |  | 260.0 | 250.0 | 1.04 |" in table


def test_first_difference() -> None:
    assert bs.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bs.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert bs.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early


def test_section_goes_between_its_own_markers(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("<!-- bench_quant:start -->\nquant\n<!-- bench_quant:end -->\n")
    bs.write_section(path, f"{bs.MARK_START}\none\n{bs.MARK_END}")
    bs.write_section(path, f"{bs.MARK_START}\ntwo\n{bs.MARK_END}")
    assert path.read_text() == ("<!-- bench_quant:start -->\nquant\n<!-- bench_quant:end -->\n\n"
                                f"{bs.MARK_START}\ntwo\n{bs.MARK_END}\n")


@pytest.mark.parametrize("flags, message", [
    (dict(ks="1,x"), "--ks takes comma-separated whole numbers"),
    (dict(ks="0"), "at least 1"),
    (dict(drafts="ngram,int3"), "--drafts takes some of ngram, int8, int4, found int3"),
    (dict(shape="3b"), "--shape takes one of 7b, 13b or none"),
    (dict(shape="none"), "Nothing to run"),
    (dict(ckpt_dir="/nonexistent/model"), "has no params.json"),
    (dict(ckpt_dir="/nonexistent/model", real_from="x.json"), "not both"),
    (dict(real_from="/nonexistent/run.json"), "expected the --json_out of an earlier run"),
])
def test_bad_arguments_are_refused_before_any_work(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bs.main(**flags)
