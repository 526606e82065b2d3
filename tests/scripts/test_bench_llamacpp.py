"""scripts/bench/bench_llamacpp.py on the CPU: the GGUF it writes holds our weights, and llama-bench's JSON is read right.

llama.cpp itself is built and run on the GPU machine (``../shared/tools/llamacpp-peer.sh build``). Here:

- ``write_gguf``'s file, read back with gguf-py and mapped to Meta names with the project's own
  ``gguf_tensor_name_to_meta`` (what ``llama-offload convert`` uses), holds every tensor bit for bit, in the
  advertised types, with the llama metadata and a vocabulary of exactly ``vocab_size`` tokens;
- tensors are streamed: at most one converted tensor is alive while the file is written;
- ``parse_llama_bench_json`` / ``bench_llamacpp`` read output printed the way llama-bench's ``json_printer``
  prints it (``tools/llama-bench/llama-bench.cpp``: the field list of ``test::get_fields()``, INT fields bare,
  BOOL as true/false, STRING quoted, then ``samples_ns`` / ``samples_ts``), whole, cut off by a crash, or as
  JSON lines, through a stand-in ``llama-bench`` script that also records the flags it was given;
- with a real ``llama-bench`` (LLAMA_BENCH_BIN, or the build directory of ``llamacpp-peer.sh build``), the
  GGUF is loaded and timed by llama.cpp itself; skipped otherwise.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="write_gguf needs gguf-py (a dependency of the project)")

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import random_state_dict  # noqa: E402
from llama_offload.convert.gguf import gguf_tensor_name_to_meta  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


from scripts_loader import load_script  # noqa: E402

bl = load_script("bench_llamacpp")

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
ARGS = ModelArgs(**TINY, vocab_size=300)  # room for the 3 specials and the 256 byte tokens


def read_back(path: Path) -> tuple[Any, dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields[key] = field.contents()
    return reader, fields


@pytest.mark.parametrize("dtype", ["F16", "F32", "BF16"])
def test_gguf_holds_our_weights(dtype: str, tmp_path: Path) -> None:
    sd = random_state_dict(ARGS, seed=3, dtype=torch.float16 if dtype == "F16" else torch.float32)
    path = bl.write_gguf(sd, ARGS, tmp_path / "m.gguf", dtype)
    assert path == tmp_path / "m.gguf" and not (tmp_path / "m.gguf.partial").exists()
    reader, fields = read_back(path)

    names = [t.name for t in reader.tensors]
    assert len(names) == len(sd) == 1 + 9 * ARGS.n_layers + 2
    assert {gguf_tensor_name_to_meta(n) for n in names} == set(sd)  # the project's own GGUF -> Meta mapping
    want_type = {"F16": gguf.GGMLQuantizationType.F16, "F32": gguf.GGMLQuantizationType.F32,
                 "BF16": gguf.GGMLQuantizationType.BF16}[dtype]
    for t in reader.tensors:
        meta = gguf_tensor_name_to_meta(t.name)
        w = sd[meta]
        assert [int(x) for x in t.shape] == list(reversed(w.shape)), t.name  # GGUF lists ne0 first
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            got = torch.from_numpy(np.array(t.data)).reshape(w.shape)
            assert torch.equal(got, w.float()), t.name
            continue
        assert t.tensor_type == want_type, t.name
        raw = np.array(t.data)
        if dtype == "BF16":
            got = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).reshape(w.shape)
            assert torch.equal(got, w.to(torch.bfloat16)), t.name
        else:
            got = torch.from_numpy(raw).reshape(w.shape)
            assert torch.equal(got, w.to(got.dtype)), t.name  # Meta's q/k rows, not permuted

    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"F32": 0, "F16": 1, "BF16": 32}[dtype]
    assert (fields["llama.embedding_length"], fields["llama.block_count"]) == (ARGS.dim, ARGS.n_layers)
    assert fields["llama.feed_forward_length"] == ARGS.ffn_hidden_dim
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == ARGS.head_dim
    assert fields["llama.rope.freq_base"] == pytest.approx(ARGS.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(ARGS.norm_eps)
    assert fields["llama.vocab_size"] == ARGS.vocab_size

    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(set(tokens)) == ARGS.vocab_size  # llama.cpp asserts distinct tokens
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.token_type"]) == ARGS.vocab_size
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert tokens[0xA + 3] == "<0x0A>"  # llama.cpp looks the newline byte up by this name
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)


def test_small_vocab_without_byte_tokens(tmp_path: Path) -> None:
    args = ModelArgs(**TINY, vocab_size=40)
    path = bl.write_gguf(random_state_dict(args, dtype=torch.float16), args, tmp_path / "m.gguf")
    tokens = read_back(path)[1]["tokenizer.ggml.tokens"]
    assert len(tokens) == len(set(tokens)) == 40 and tokens[:3] == ["<unk>", "<s>", "</s>"]


class _LazyStateDict(dict):
    """A state dict whose tensors are made on access and counted while alive: proves the writer streams."""

    def __init__(self, args: ModelArgs) -> None:
        self.shapes = {k: v.shape for k, v in random_state_dict(args).items()}
        super().__init__({k: None for k in self.shapes})
        self.alive = 0
        self.most_alive = 0

    def _make(self, key: str) -> torch.Tensor:
        t = torch.full(self.shapes[key], float(len(key)), dtype=torch.float32)  # converted to F16: a copy
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(t, self._dead)
        return t

    def _dead(self) -> None:
        self.alive -= 1

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._make(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._make(key) if key in self.shapes else default


def test_tensors_are_streamed(tmp_path: Path) -> None:
    sd = _LazyStateDict(ARGS)
    bl.write_gguf(sd, ARGS, tmp_path / "m.gguf")
    gc.collect()
    assert sd.most_alive <= 2 and sd.alive == 0  # one being written, at most one more being made
    reader, _ = read_back(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert np.all(np.array(t.data) == len("layers.1.feed_forward.w3.weight"))


def test_fp16_cpu_weights_are_written_without_a_copy() -> None:
    sd = random_state_dict(ARGS, dtype=torch.float16)
    arrays = dict(bl.gguf_tensors(sd, ARGS, "F16"))
    assert np.shares_memory(arrays["blk.0.attn_q.weight"], sd["layers.0.attention.wq.weight"].numpy())
    assert arrays["blk.0.attn_norm.weight"].dtype == np.float32  # norms are converted to F32


def test_refuses_a_wrong_state_dict(tmp_path: Path) -> None:
    sd = random_state_dict(ARGS, dtype=torch.float16)
    del sd["layers.1.ffn_norm.weight"]
    with pytest.raises(KeyError, match="layers.1.ffn_norm.weight"):
        bl.write_gguf(sd, ARGS, tmp_path / "a.gguf")
    sd = random_state_dict(ARGS, dtype=torch.float16)
    sd["output.weight"] = sd["output.weight"][:-1]
    with pytest.raises(ValueError, match="output.weight has shape"):
        bl.write_gguf(sd, ARGS, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="dtype must be one of"):
        bl.write_gguf(random_state_dict(ARGS), ARGS, tmp_path / "c.gguf", "Q4_0")
    assert list(tmp_path.iterdir()) == []


# --- llama-bench's JSON ----------------------------------------------------------------------------------------

# test::get_fields() of the vendored llama-bench.cpp, in order, and the JSON kind format_json_value gives each.
FIELDS = [
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends",
    "model_filename", "model_type", "model_size", "model_n_params", "n_batch",
    "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode",
    "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode",
    "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx",
    "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
]
INT = {"build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params", "n_gpu_layers",
       "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "no_op_offload", "n_cpu_moe",
       "fit_target", "fit_min_ctx", "flash_attn"}
BOOL = {"no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"}
FLOAT = {"avg_ts", "stddev_ts"}


def record(n_prompt: int, n_gen: int, samples_ns: list[int], n_gpu_layers: int = 99) -> list[tuple[str, str]]:
    """One test's (field, printed value) pairs, as test::get_values() formats them (std::to_string)."""
    n = n_prompt + n_gen
    ts = [1e9 * n / s for s in samples_ns]
    avg_ns = sum(samples_ns) // len(samples_ns)
    mean_ts = sum(ts) / len(ts)
    sd_ts = (sum((x - mean_ts) ** 2 for x in ts) / (len(ts) - 1)) ** 0.5
    mean_ns = sum(samples_ns) / len(samples_ns)
    sd_ns = int((sum((x - mean_ns) ** 2 for x in samples_ns) / (len(samples_ns) - 1)) ** 0.5)
    values = {
        "build_commit": "deadbee", "build_number": "7123", "cpu_info": "AMD EPYC 9454 48-Core Processor",
        "gpu_info": "NVIDIA H100 80GB HBM3", "backends": "CUDA", "model_filename": "/tmp/7b-f16.gguf",
        "model_type": "llama 7B F16", "model_size": str(13476839424), "model_n_params": str(6738415616),
        "n_batch": "2048", "n_ubatch": "512", "n_threads": "15", "cpu_mask": "0x0", "cpu_strict": "0",
        "poll": "50", "type_k": "f16", "type_v": "f16", "n_gpu_layers": str(n_gpu_layers), "n_cpu_moe": "0",
        "split_mode": "layer", "main_gpu": "0", "no_kv_offload": "0", "flash_attn": "-1", "devices": "auto",
        "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "mmap", "lazy_mode": "auto",
        "embeddings": "0", "no_op_offload": "0", "no_host": "0", "repack": "1", "fit_target": "0",
        "fit_min_ctx": "0", "n_prompt": str(n_prompt), "n_gen": str(n_gen), "n_depth": "0",
        "test_time": "2026-11-21T21:00:00Z", "avg_ns": str(avg_ns), "stddev_ns": str(sd_ns),
        "avg_ts": f"{mean_ts:.6f}", "stddev_ts": f"{sd_ts:.6f}",
    }
    assert list(values) == FIELDS
    return [(f, values[f]) for f in FIELDS] + [("samples_ns", ", ".join(map(str, samples_ns))),
                                                ("samples_ts", ", ".join(f"{x:g}" for x in ts))]


def _value(field: str, value: str) -> str:
    if field in ("samples_ns", "samples_ts"):
        return f"[ {value} ]"
    if field in BOOL:
        return "false" if value == "0" else "true"
    if field in INT or field in FLOAT:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def json_printer(records: list[list[tuple[str, str]]], *, footer: bool = True) -> str:
    """What llama-bench's json_printer writes: print_header, print_test per test, print_footer."""
    out = "[\n"
    for i, rec in enumerate(records):
        if i:
            out += ",\n"
        out += "  {\n"
        out += "".join(f'    "{f}": {_value(f, v)},\n' for f, v in rec[:-1])
        f, v = rec[-1]
        out += f'    "{f}": {_value(f, v)}\n'
        out += "  }"
    return out + ("\n]\n" if footer else "")


def jsonl_printer(records: list[list[tuple[str, str]]]) -> str:
    lines = []
    for rec in records:
        body = "".join(f'"{f}": {_value(f, v)}, ' for f, v in rec[:-2])
        body += f'"samples_ns": {_value(*rec[-2])},"samples_ts": {_value(*rec[-1])}'
        lines.append("{" + body + "}\n")
    return "".join(lines)


PP = record(512, 0, [41_000_000, 40_000_000, 42_000_000, 40_500_000, 41_500_000])
TG = record(0, 32, [181_000_000, 180_000_000, 182_000_000, 181_500_000, 180_500_000])


def test_parses_llama_bench_json() -> None:
    text = json_printer([PP, TG])
    records = bl.parse_llama_bench_json(text)
    assert records == json.loads(text) and len(records) == 2
    fig = bl.llama_bench_figures(records)
    assert fig["prefill_s_512"] == pytest.approx(0.041)
    assert fig["decode_ms_b1"] == pytest.approx(181.0 / 32)  # avg_ns of the 32-token run, per token
    assert fig["decode_tok_s"] == pytest.approx(32 / 0.181, rel=1e-3)
    assert fig["prefill_tok_s"] == pytest.approx(512 / 0.041, rel=1e-3)
    assert fig["decode_ms_b1_stddev"] > 0 and fig["prefill_s_512_stddev"] > 0


def test_parses_what_a_crash_leaves_and_json_lines() -> None:
    cut = json_printer([PP, TG], footer=False)  # killed before print_footer
    assert [r["n_gen"] for r in bl.parse_llama_bench_json("log line\n" + cut)] == [0, 32]
    half = json_printer([PP, TG])[:-200]  # cut inside the second record
    assert [r["n_prompt"] for r in bl.parse_llama_bench_json(half)] == [512]
    assert [r["n_gen"] for r in bl.parse_llama_bench_json(jsonl_printer([PP, TG]))] == [0, 32]
    for bad in ("", "error: failed to load model\n", "[\n", "[]\n"):
        with pytest.raises(ValueError):
            bl.parse_llama_bench_json(bad)


def fake_llama_bench(bin_dir: Path, stdout: str, *, code: int = 0, stderr: str = "") -> Path:
    """An executable llama-bench that prints ``stdout`` / ``stderr``, exits ``code`` and logs its argv."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "out.txt").write_text(stdout)
    (bin_dir / "err.txt").write_text(stderr)
    script = bin_dir / "llama-bench"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
here = {str(bin_dir)!r}
json.dump({{"argv": sys.argv[1:], "ld": os.environ.get("LD_LIBRARY_PATH", "")}}, open(os.path.join(here, "argv.json"), "w"))
sys.stdout.write(open(os.path.join(here, "out.txt")).read())
sys.stderr.write(open(os.path.join(here, "err.txt")).read())
sys.exit({code})
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return bl.write_gguf(random_state_dict(ARGS, dtype=torch.float16), ARGS, tmp_path / "tiny.gguf")


def test_bench_llamacpp_row(tiny_gguf: Path, tmp_path: Path) -> None:
    bin_dir = fake_llama_bench(tmp_path / "bin", json_printer([PP, TG]))
    row = bl.bench_llamacpp(tiny_gguf, bin_dir, n_gpu_layers=15, threads=7)
    call = json.loads((bin_dir / "argv.json").read_text())
    argv = call["argv"]
    assert argv[argv.index("-m") + 1] == str(tiny_gguf)
    flags = {argv[i]: argv[i + 1] for i in range(0, len(argv) - 1) if argv[i].startswith("-")}
    assert flags == {"-m": str(tiny_gguf), "-ngl": "15", "-t": "7", "-p": "512", "-n": "32", "-r": "5", "-o": "json"}
    assert call["ld"].split(os.pathsep)[0] == str(bin_dir)  # llama.cpp's shared libraries sit beside it

    assert set(_peer_keys()) <= set(row)
    assert row["name"] == "llama.cpp llama-bench (-ngl 15)"
    assert row["decode_ms_b1"] == pytest.approx(181.0 / 32) and row["prefill_s_512"] == pytest.approx(0.041)
    assert row["decode_ms_b8"] is None
    assert "FAILED" not in row["note"]
    for part in ("build 7123 (deadbee)", "llama 7B F16", "12.55 GiB", "CUDA", "-ngl 99 -t 15", "mean of 5 runs", "after 0 cached tokens"):
        assert part in row["note"], (part, row["note"])

    bl.bench_llamacpp(tiny_gguf, bin_dir, n_depth=16, reps=2)
    argv = json.loads((bin_dir / "argv.json").read_text())["argv"]
    assert argv[argv.index("-d") + 1] == "16" and argv[argv.index("-r") + 1] == "2"


def _peer_keys() -> tuple[str, ...]:
    return load_script("common").PEER_KEYS


def test_bench_llamacpp_failures_are_rows(tiny_gguf: Path, tmp_path: Path) -> None:
    row = bl.bench_llamacpp(tiny_gguf, tmp_path / "nowhere")
    if row["note"].startswith("skipped"):  # no llama-bench anywhere (PATH or the build directory)
        assert "llamacpp-peer.sh build" in row["note"]
        assert all(row[k] is None for k in _peer_keys() if k not in ("name", "note"))

    bin_dir = fake_llama_bench(tmp_path / "bin", json_printer([PP, TG]))
    row = bl.bench_llamacpp(tmp_path / "missing.gguf", bin_dir)
    assert row["note"].startswith("skipped: GGUF file") and row["decode_ms_b1"] is None

    # A crash after the prompt test: its figure is kept, the note says what went wrong.
    bin_dir = fake_llama_bench(tmp_path / "crash", json_printer([PP], footer=False), code=1,
                               stderr="test_gen: failed to decode generation batch, res = 1\n")
    row = bl.bench_llamacpp(tiny_gguf, bin_dir)
    assert row["note"].startswith("FAILED: llama-bench exited 1") and "failed to decode generation" in row["note"]
    assert row["prefill_s_512"] == pytest.approx(0.041) and row["decode_ms_b1"] is None

    bin_dir = fake_llama_bench(tmp_path / "garbage", "not json at all\n", stderr="oops\n")
    row = bl.bench_llamacpp(tiny_gguf, bin_dir)
    assert row["note"].startswith("FAILED: no JSON") and "oops" in row["note"]

    # A run that succeeded but lacks a test it was asked for.
    bin_dir = fake_llama_bench(tmp_path / "only-pp", json_printer([PP]))
    row = bl.bench_llamacpp(tiny_gguf, bin_dir)
    assert row["note"].startswith("FAILED: no figure for decode_ms_b1") and row["prefill_s_512"] is not None


# --- the real thing, where it was built -----------------------------------------------------------------------


def _real_bin_dir() -> Path | None:
    env = os.environ.get("LLAMA_BENCH_BIN")
    for d in ([Path(env).parent if Path(env).is_file() else Path(env)] if env else []) + [bl.DEFAULT_BIN_DIR]:
        if (d / "llama-bench").is_file():
            return d
    return None


@pytest.mark.skipif(_real_bin_dir() is None, reason="no llama-bench built (LLAMA_BENCH_BIN, or "
                    "../shared/tools/llamacpp-peer.sh build on the GPU machine)")
def test_real_llama_bench_loads_and_times_our_gguf(tiny_gguf: Path) -> None:
    row = bl.bench_llamacpp(tiny_gguf, _real_bin_dir(), n_gpu_layers=0, threads=2, n_gen=4, n_prompt=16, reps=1)
    assert "FAILED" not in row["note"] and "skipped" not in row["note"], row["note"]
    assert row["decode_ms_b1"] > 0 and row["prefill_s_16"] > 0


def test_n_gpu_layers_for_budget() -> None:
    seven_b = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)
    # A 7B block is 202.4M parameters: 386 MiB in f16, plus 2 x 544 x 4096 x 2 bytes = 8.5 MiB of KV cache.
    block = 2 * (4 * 4096 * 4096 + 3 * 11008 * 4096) + 4 * 2 * 4096 + 2 * 2 * 544 * 4096
    assert bl.n_gpu_layers_for_budget(seven_b, 8) == (8 - 1) * 2**30 // block
    assert bl.n_gpu_layers_for_budget(seven_b, 8) == 18
    assert bl.n_gpu_layers_for_budget(seven_b, 0.5) == 0
    assert bl.n_gpu_layers_for_budget(seven_b, 80) == 32


def test_device_memory_poller_reports_the_peak_over_the_start() -> None:
    poller = bl._DeviceMemoryPoller(period_s=0.001)
    readings = iter([5 * 2**30, 6 * 2**30, 9 * 2**30])
    poller._read = lambda: next(readings, 7 * 2**30)  # NVML stand-in: start, rise, peak, fall back
    with poller:
        deadline = time.monotonic() + 10
        while (poller.peak is None or poller.peak < 9 * 2**30) and time.monotonic() < deadline:
            time.sleep(0.001)
    assert poller.baseline == 5 * 2**30 and poller.gib == pytest.approx(4.0)
    poller = bl._DeviceMemoryPoller()
    poller._read = None  # neither NVML nor nvidia-smi
    with poller:
        pass
    assert poller.gib is None
