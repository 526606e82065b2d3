"""scripts/bench/bench_quant.py's pure helpers on the CPU: the markdown section it writes into a file, its tables, the
command line it records. The benchmark itself needs a GPU (and runs there, not here)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from scripts_loader import load_script

bq = load_script("bench_quant")
common = load_script("common")

SECTION = f"{bq.MARK_START}\nnew\n{bq.MARK_END}"


def test_section_is_appended_when_the_file_has_none():
    assert bq.replace_section("", SECTION) == SECTION + "\n"
    assert bq.replace_section("# Benchmarks\n\nold table\n\n\n", SECTION) == f"# Benchmarks\n\nold table\n\n{SECTION}\n"


def test_section_is_replaced_in_place_and_the_rest_kept_byte_for_byte():
    text = f"head\n\n{bq.MARK_START}\nold\nlines\n{bq.MARK_END}\ntail | kept\n"
    out = bq.replace_section(text, SECTION)
    assert out == f"head\n\n{SECTION}\ntail | kept\n"
    assert bq.replace_section(out, SECTION) == out  # idempotent: a second run replaces, never appends


@pytest.mark.parametrize("text", [f"a\n{bq.MARK_START}\nno end\n", f"a\n{bq.MARK_END}\nno start\n",
                                  f"{bq.MARK_END}\n{bq.MARK_START}\n"])
def test_unbalanced_markers_are_refused_not_guessed(text):
    with pytest.raises(ValueError, match="markers"):
        bq.replace_section(text, SECTION)


def test_write_section_creates_then_replaces(tmp_path: Path):
    path = tmp_path / "BENCHMARKS.md"
    bq.write_section(path, SECTION)
    path.write_text("intro\n\n" + path.read_text() + "after\n")
    bq.write_section(path, SECTION.replace("new", "newer"))
    assert path.read_text() == f"intro\n\n{SECTION.replace('new', 'newer')}\nafter\n"


def _rows() -> list[dict]:
    return [
        {"name": "[7b] ours fp16, everything paged", "decode_ms_b1": 240.04, "decode_ms_b8": 251.0, "streamed_gib": 12.06,
         "floor_ms": 235.5, "ratio_b1": 1.0193, "speedup_vs_fp16": 1.0, "peak_gpu_gib": 4.1, "build_s": 6.25,
         "note": "0 resident, 32 paged"},
        {"name": "[7b] ours int4 g64, budget 4 GiB", "note": "A GPU memory budget of 4 GiB is too small"},
        {"name": "[7b] llama.cpp Q4_0, -ngl 3", "variant": "llama.cpp Q4_0, -ngl 3", "decode_ms_b1": 30.0,
         "speedup_vs_fp16": 8.0013, "note": "FAILED: llama-bench exited 1: a | b"},
    ]


def test_table_has_the_columns_asked_for_and_one_row_per_variant():
    lines = bq.table(_rows()).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["variant", "decode ms/token b=1", "b=8", "streamed GiB/step", "floor ms", "b=1/floor",
                      "speedup vs fp16", "peak GPU GiB", "load s", "note"]
    assert len(lines) == 2 + 3 and set(lines[1]) == {"|", "-"}
    assert lines[2] == ("| [7b] ours fp16, everything paged | 240.0 | 251.0 | 12.06 | 235.5 | 1.02 | 1.00 | 4.10 | 6.2 "
                        "| 0 resident, 32 paged |")
    assert lines[3].count("n/a") == 8  # a failed variant: all eight figures n/a, the reason in the note
    assert lines[4].count(" | ") == 9 and "a \\| b" in lines[4]  # a "|" in a note is escaped, not a new cell
    assert "| 8.00 |" in lines[4]


def test_table_70b():
    rows = [{"budget_gib": None, "s_per_token": 0.7312, "floor_s": 0.70, "ratio": 1.0446, "peak_gpu_gib": 2.5,
             "host_rss_gib": 39.44, "resident_layers": 0, "note": "0 resident, 80 paged"},
            {"budget_gib": 8.0, "note": "FAILED: OutOfMemoryError: CUDA out of memory"}]
    lines = bq.table_70b(rows).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "budget", "s/token", "floor s", "ratio", "peak GPU GiB", "host RSS GiB", "resident layers", "note"]
    assert lines[2] == "| everything paged | 0.731 | 0.700 | 1.04 | 2.50 | 39.4 | 0 | 0 resident, 80 paged |"
    assert lines[3].startswith("| 8 GiB | n/a |") and lines[3].endswith("CUDA out of memory |")


def test_command_line_records_every_argument_used_and_parses_back():
    params = dict(shapes=["7b", "13b"], steps=8, budgets70=["4", "8", "24"], peers="llamacpp",
                  workdir="/tmp/with space", json_out=None, out="BENCHMARKS.md", skip70=False, from_disk=True)
    cmd = bq.command_line(params)
    assert cmd.startswith("python scripts/bench/bench_quant.py --shapes 7b,13b --steps 8 --budgets70 4,8,24 ")
    words = shlex.split(cmd)
    assert words[words.index("--workdir") + 1] == "/tmp/with space"
    assert "--json_out" not in words and "--skip70" not in words and "--from_disk" in words


def test_section_holds_the_run_facts_and_both_tables():
    info = {"command": "python scripts/bench/bench_quant.py --steps 8", "device": "NVIDIA H200", "torch": "2.11",
            "date": "2025-01-01", "bandwidth_gbps": 53.2, "steps": 8, "steps70": 4, "from_disk": False,
            "triton": True}
    built = {"quantize_s": 12.0, "codes_gib": 35.9, "fp16_gib": 1.0, "host_rss_gib": 40.0, "peak_host_rss_gib": 41.0}
    text = bq.section(info, _rows(), [{"budget_gib": 4.0, "s_per_token": 0.7, "note": ""}], built)
    assert text.startswith(bq.MARK_START + "\n") and text.endswith("\n" + bq.MARK_END)
    for fact in ("`python scripts/bench/bench_quant.py --steps 8`", "NVIDIA H200", "torch 2.11", "2025-01-01", "53.2 GB/s",
                 "| variant |", "| budget |", "| 4 GiB | 0.700 |", "Quantized in 12.0 s", "llama.cpp rows:"):
        assert fact in text
    assert "| budget |" not in bq.section(info, _rows(), [], None)  # --skip70: no 70B table


def test_status_fields_are_read_in_kib(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    assert bq.status_kib("VmRSS", str(status)) == 1024
    assert bq.gib_of_kib(bq.status_kib("VmHWM", str(status))) == 2048 / 2**20
    assert bq.status_kib("VmSwap", str(status)) is None
    assert bq.status_kib("VmRSS", str(tmp_path / "missing")) is None


def test_llamacpp_runs_once_per_distinct_layer_count_and_speedup():
    assert bq.llamacpp_layers(None) == [0] and bq.llamacpp_layers(0) == [0] and bq.llamacpp_layers(7) == [0, 7]
    row = {"decode_ms_b1": 50.0}
    bq.add_speedup(row, 200.0)
    assert row["speedup_vs_fp16"] == 4.0
    for ref, ms in ((None, 50.0), (200.0, None)):
        row = {"decode_ms_b1": ms}
        bq.add_speedup(row, ref)
        assert row["speedup_vs_fp16"] is None


def test_the_70b_shape_is_llama2_70b():
    a = bq.ARGS_70B
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_hidden_dim, a.vocab_size) == (8192, 80, 64, 8, 28672, 32000)
    bq.SPEC_70B.check_shapes({"w2": (8192, 28672), "wq": (8192, 8192)})  # group 64 divides every input width


@pytest.mark.parametrize("label", list(bq.SPECS))
def test_memory_source_builds_what_load_model_builds_and_keeps_its_copy(tiny_ckpt: Path, label: str):
    import torch

    from llama_offload.model.args import ModelArgs

    spec = bq.SPECS[label]
    args = ModelArgs.from_json(tiny_ckpt / "params.json", max_seq_len=common.MAX_SEQ_LEN,
                               max_batch_size=common.MAX_BATCH)
    source = bq.MemorySource(torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True), args)
    expected = bq.DiskSource(tiny_ckpt).load(spec).state_dict()
    first = source.load(spec)
    assert (source.last_quantize_s is None) == (spec is None)
    got = first.state_dict()
    assert list(got) == list(expected)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())
    for t in [*first.parameters(), *first.buffers()]:  # what the pager does: re-point every tensor elsewhere
        t.data = torch.zeros_like(t)
    again = source.load(spec)  # the next row of this spec: no second quantization, the weights as they were
    assert source.last_quantize_s is None
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
