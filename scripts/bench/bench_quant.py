"""Quantized paging: decode speed of int8 and int4 blocks against fp16, the PCIe floor and llama.cpp, in one process.

    python scripts/bench/bench_quant.py --shapes 7b,13b --budgets70 4,8,24 --out BENCHMARKS.md --json_out /tmp/bench_quant.json

What it measures, all on random N(0, 0.02) weights (the norms 1 + N(0, 0.02), as ``random_state_dict`` draws them):

- 7B- and 13B-shaped models (``SHAPES``), every block paged from pinned host memory, in fp16, in int8
  (per output channel) and in int4 (groups of 64, fp16 scale and minimum): decode ms/token at batch 1 and 8,
  measured by ``run_variant`` (its protocol: a warm-up, a 512-token prefill, then decode steps that feed
  the greedy token back). The floor of a step is the bytes it streams (``model.plan.streamed_bytes``: codes and
  scales for a quantized model) over the pinned host-to-device bandwidth measured once in the same run; the
  speed-up is over fp16's batch-1 step of the same shape in the same run. "load s" is building the model from
  the state dict (quantization included, on the CPU as ``load_model(..., quantize=...)`` does it) and pinning it.
- 7B only: int4 and int8 at ``--llamacpp_budget`` GiB (some blocks resident, the rest paged), and llama.cpp's
  ``llama-bench`` on the same weights in Q4_0 and Q8_0 (``llama-quantize`` of an F16 GGUF), at ``-ngl 0`` (every
  layer on the CPU) and at ``-ngl R`` with R the number of blocks our budget row keeps resident, so both hold the
  same number of layers on the GPU. Differences: llama.cpp computes the layers it does not hold on the CPU
  (nothing crosses PCIe per token), and keeps the output head on the CPU below full offload, where ours keeps
  the embedding and head on the GPU; it decodes 16 random tokens after 16 cached ones (``-d 16``), the mean of 3
  runs after a warm-up.
- 70B-shaped (Llama 2 70B: 80 layers, grouped-query attention, ffn 28672) in int4 g64 only: there is no fp16
  copy anywhere. Each matrix is drawn on the GPU and quantized there, one at a time, and only its codes go to
  host memory (~36 GiB). Then, everything paged and at each of ``--budgets70`` GiB: s/token at batch 1 (after a
  16-token prompt), its floor, peak GPU memory, the process's host RSS (VmRSS, and its peak VmHWM during the
  variant) and the pinned bytes the pager holds. One quantized model serves every budget: between variants its
  blocks are moved back to the CPU, so host memory never holds a second copy.

Weights are built in memory (no checkpoint is written) unless ``--from_disk``: then a Meta checkpoint is written
under ``--workdir`` with ``make_checkpoint`` and every row loads it with ``load_model``, file reading
included in "load s" (7B: 13 GB, 13B: 26 GB of disk, one at a time). The GGUF files are deleted after use.
Each row is printed as a JSON line when it completes, a markdown table at the end; ``--out FILE`` writes the
section between ``<!-- bench_quant:start -->`` and ``<!-- bench_quant:end -->`` in FILE (appended when absent).
A variant that fails (out of memory, a budget below the plan's minimum) becomes a row whose note says why.
Needs a CUDA GPU; llama.cpp is built by ``../shared/tools/llamacpp-peer.sh build`` into ``--llamacpp_bin``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llama_offload.kernels import quant_triton
from llama_offload.cli.options import fire_main
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import load_model, random_state_dict
from llama_offload.model.transformer import Transformer
from llama_offload.offload.offloaded import InferenceOffloadModel, offload
from llama_offload.offload.plan import GiB
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import (
    matrix_names, quantize_model, quantize_state_dict,
)

from common import (
    DECODE_PROMPT_LEN, MAX_BATCH, MAX_SEQ_LEN, SHAPES, cell, emit, failed, free_all, list_arg, make_checkpoint,
    model_from_state_dict, pinned_bandwidth, run_variant, shape_args, timed,
)
from common import command_line as common_command_line, replace_section as common_replace_section

MARK_START = "<!-- bench_quant:start -->"
MARK_END = "<!-- bench_quant:end -->"
SPECS: dict[str, Optional[QuantSpec]] = {"fp16": None, "int8": QuantSpec(8), "int4 g64": QuantSpec(4, 64)}
REFERENCE = "ours fp16, everything paged"  # the row every speed-up of a shape is taken against
# Llama 2 70B's params.json: ffn_hidden_dim = 4096 * ceil(int(1.3 * int(2 * 4 * 8192 / 3)) / 4096) = 28672.
ARGS_70B = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.3,
                     multiple_of=4096, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)
SPEC_70B = QuantSpec(4, 64)
# llama-bench: decode only (our table has no prefill column), after as many cached tokens as our decode rows.
# A hung run must not eat the whole session: a CPU decode of 16 Q8_0 7B tokens takes seconds, not minutes.
LLAMA_BENCH = dict(n_gen=16, n_prompt=0, reps=3, n_depth=DECODE_PROMPT_LEN, timeout_s=180)
QUANTIZE_TIMEOUT_S = 300
LLAMACPP_PAIRS = (("Q4_0", "int4 g64"), ("Q8_0", "int8"))  # GGUF type -> our spec of about the same bits

Row = dict[str, Any]
Build = Callable[[], tuple[object, int, str]]


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


# --- where the 7B/13B weights come from --------------------------------------------------------------------


class MemorySource:
    """The fp16 weights in host memory; each spec quantized once (quantize_state_dict, load_model's path) and kept
    for the next row of that spec. ``last_quantize_s``: the quantization the latest ``load`` did (None: none)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], args: ModelArgs):
        self.state_dict, self.args = state_dict, args
        self.quantized: dict[QuantSpec, dict[str, torch.Tensor]] = {}
        self.last_quantize_s: Optional[float] = None

    def load(self, spec: Optional[QuantSpec]) -> Transformer:
        self.last_quantize_s = None
        sd = self.state_dict
        if spec is not None:
            if spec not in self.quantized:
                start = time.perf_counter()
                self.quantized[spec] = quantize_state_dict(sd, self.args, spec, show_progress=False)
                self.last_quantize_s = time.perf_counter() - start
            sd = self.quantized[spec]
        return model_from_state_dict(sd, self.args)

    def drop_quantized(self) -> None:
        self.quantized.clear()
        gc.collect()


class DiskSource:
    """A Meta checkpoint on disk, loaded by ``load_model`` for every row (quantized while loading)."""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = ckpt_dir
        self.last_quantize_s: Optional[float] = None  # inside load_model: not separable, part of load s

    def load(self, spec: Optional[QuantSpec]) -> Transformer:
        return load_model(self.ckpt_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH,
                          show_progress=False, quantize=spec)

    def drop_quantized(self) -> None:
        pass


def ours(source: Any, spec: Optional[QuantSpec], seen: dict[str, Any], **offload_kwargs: Any) -> Build:
    """A run_variant build: load (quantizing) and offload; the plan and quantization time go into ``seen``."""
    def build() -> tuple[object, int, str]:
        cpu = source.load(spec)
        seen["quantize_s"] = source.last_quantize_s
        model = offload(cpu, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, **offload_kwargs)
        plan = seen["plan"] = model.plan
        return model, plan.streamed_bytes, f"{plan.resident_layers} resident, {plan.paged_layers} paged"
    return build


def variant(shape: str, name: str, build: Build, seen: dict[str, Any], args: ModelArgs, steps: int,
            bandwidth: float, ref_ms: Optional[float]) -> Row:
    """run_variant, made total: any exception becomes a row saying what failed. Its own partial JSON
    line is held back: the row printed here is the completed one (speed-up, resident layers added)."""
    free_all()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            row = run_variant(f"[{shape}] {name}", build, args.vocab_size, steps, bandwidth)
    except Exception as e:  # noqa: BLE001 - e.g. torch.OutOfMemoryError; the run goes on
        row = {"name": f"[{shape}] {name}", "note": failed(e)}
    for line in captured.getvalue().splitlines():
        if not line.startswith("{"):
            log(line)
    free_all()
    plan = seen.get("plan")
    row.update(shape=shape, variant=name, resident_layers=plan.resident_layers if plan else None,
               quantize_s=seen.get("quantize_s"))
    add_speedup(row, row.get("decode_ms_b1") if name == REFERENCE else ref_ms)
    return emit(row)


def add_speedup(row: Row, ref_ms: Optional[float]) -> None:
    ms = row.get("decode_ms_b1")
    row["speedup_vs_fp16"] = ref_ms / ms if ref_ms and ms else None


# --- llama.cpp ---------------------------------------------------------------------------------------------


def llamacpp_rows(state_dict: dict[str, torch.Tensor], args: ModelArgs, shape: str, work: Path, bin_dir: Path,
                  resident: dict[str, Optional[int]], ref_ms: Optional[float]) -> list[Row]:
    """Q4_0 and Q8_0 GGUFs of these weights, llama-bench at -ngl 0 and at our budget rows' resident layers."""
    import bench_llamacpp  # scripts/bench/bench_llamacpp.py

    if bench_llamacpp.find_binary(bin_dir, "llama-bench") is None:
        return [emit({"name": f"[{shape}] llama.cpp", "shape": shape,
                      "note": f"skipped: no llama-bench in {bin_dir} nor on PATH "
                              "(build it with ../shared/tools/llamacpp-peer.sh build)"})]
    f16 = work / f"{shape}-f16.gguf"
    files = {q: work / f"{shape}-{q}.gguf" for q, _ in LLAMACPP_PAIRS}
    rows: list[Row] = []
    try:
        start = time.perf_counter()
        bench_llamacpp.write_gguf(state_dict, args, f16)
        log(f"wrote {f16} in {time.perf_counter() - start:.1f} s")
        made: dict[str, float] = {}
        for qtype, path in files.items():
            start = time.perf_counter()
            bench_llamacpp.quantize_gguf(f16, path, qtype, bin_dir, timeout_s=QUANTIZE_TIMEOUT_S)
            made[qtype] = time.perf_counter() - start
            log(f"llama-quantize {qtype}: {made[qtype]:.1f} s")
        f16.unlink(missing_ok=True)  # before the runs: disk for the 13B shape
        for qtype, ours_spec in LLAMACPP_PAIRS:
            for ngl in llamacpp_layers(resident.get(ours_spec)):
                rows.append(llamacpp_row(bench_llamacpp, files[qtype], bin_dir, shape, qtype, ngl,
                                         ngl == resident.get(ours_spec), ours_spec, made[qtype], ref_ms))
            if resident.get(ours_spec) is None:
                rows.append(emit({"name": f"[{shape}] llama.cpp {qtype}, -ngl as ours {ours_spec}", "shape": shape,
                                  "note": f"skipped: the ours {ours_spec} budget row has no plan"}))
    except Exception as e:  # noqa: BLE001 - writing or quantizing the GGUF failed
        rows.append(emit({"name": f"[{shape}] llama.cpp", "shape": shape, "note": failed(e)}))
    finally:
        for path in [f16, f16.with_name(f16.name + ".partial"), *files.values()]:
            path.unlink(missing_ok=True)
    return rows


def llamacpp_layers(ours_resident: Optional[int]) -> list[int]:
    """-ngl 0, then our resident count (once: an all-paged plan's 0 is the -ngl 0 row)."""
    return [0] if not ours_resident else [0, ours_resident]


def llamacpp_row(bench_llamacpp: Any, gguf: Path, bin_dir: Path, shape: str, qtype: str, ngl: int, as_ours: bool,
                 ours_spec: str, quantize_s: float, ref_ms: Optional[float]) -> Row:
    free_all()
    name = f"llama.cpp {qtype}, -ngl {ngl}"
    r = bench_llamacpp.bench_llamacpp(gguf, bin_dir, n_gpu_layers=ngl, name=f"[{shape}] {name}", **LLAMA_BENCH)
    where = "every layer on the CPU" if ngl == 0 else f"{ngl} layers on the GPU, the rest and the head on the CPU"
    if as_ours:
        where += f" (as many as ours {ours_spec} keeps resident at the budget)"
    where += f"; llama-quantize {quantize_s:.0f} s"
    peer_note = str(r.get("note") or "")
    failed = peer_note.startswith(("FAILED", "skipped"))
    r.update(shape=shape, variant=name, resident_layers=ngl, quantize_s=quantize_s,
             note=f"{peer_note}; {where}" if failed else f"{where}; {peer_note}")
    add_speedup(r, ref_ms)
    return emit(r)


# --- one 7B/13B shape --------------------------------------------------------------------------------------


def make_source(shape: str, args: ModelArgs, work: Path, from_disk: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """The source rows load from, and the fp16 state dict (for the GGUF)."""
    start = time.perf_counter()
    if from_disk:
        ckpt = work / f"meta-{shape}"
        sd = make_checkpoint(args, ckpt)
        if not sd:  # written by an earlier run: its file-backed tensors
            sd = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
        log(f"{shape} checkpoint ready in {time.perf_counter() - start:.1f} s at {ckpt}")
        return DiskSource(ckpt), sd
    sd = random_state_dict(args, dtype=torch.float16, device="cuda")  # make_checkpoint's weights, not written
    log(f"{shape} fp16 weights drawn in {time.perf_counter() - start:.1f} s (in memory, no checkpoint written)")
    return MemorySource(sd, args), sd


def bench_shape(shape: str, steps: int, bandwidth: float, work: Path, from_disk: bool, llamacpp: bool,
                llamacpp_bin: Path, llamacpp_budget: float) -> list[Row]:
    args = shape_args(shape)
    source, sd = make_source(shape, args, work, from_disk)
    rows: list[Row] = []
    ref_ms: Optional[float] = None
    for label, spec in SPECS.items():
        seen: dict[str, Any] = {}
        row = variant(shape, f"ours {label}, everything paged", ours(source, spec, seen), seen, args, steps,
                      bandwidth, ref_ms)
        if row["variant"] == REFERENCE:
            ref_ms = row.get("decode_ms_b1")
        rows.append(row)
    if llamacpp:
        resident: dict[str, Optional[int]] = {}
        for label in ("int4 g64", "int8"):
            seen = {}
            name = f"ours {label}, budget {llamacpp_budget:g} GiB"
            build = ours(source, SPECS[label], seen, gpu_memory_gb=llamacpp_budget)
            rows.append(variant(shape, name, build, seen, args, steps, bandwidth, ref_ms))
            resident[label] = rows[-1]["resident_layers"] if "decode_ms_b1" in rows[-1] else None
        source.drop_quantized()  # host memory for llama.cpp's files
        rows += llamacpp_rows(sd, args, shape, work, llamacpp_bin, resident, ref_ms)
    del source, sd
    gc.collect()
    if from_disk:
        shutil.rmtree(work / f"meta-{shape}", ignore_errors=True)  # disk for the next shape
    return rows


# --- 70B, int4 only ----------------------------------------------------------------------------------------


def build_70b(spec: QuantSpec = SPEC_70B) -> tuple[Transformer, float]:
    """A 70B-shaped model with its blocks' matrices quantized on the GPU one at a time (no 16-bit copy of them
    ever exists); the embedding, norms and head are fp16 on the CPU. Returns the model and the quantization s."""
    args = ARGS_70B
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    quantized = {f"{name}.weight" for name in matrix_names(args, spec.embeddings)}
    for name, p in list(model.named_parameters()):
        if name in quantized:
            continue  # replaced by quantize_model
        value = torch.empty(p.shape, device="cuda").normal_(0.0, 0.02, generator=g)
        if "norm" in name:
            value += 1.0
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr,
                torch.nn.Parameter(value.to(torch.float16).cpu(), requires_grad=False))
    # model.dtype (the norms') is fp16 from here on, as quantize_model needs for the dequantized matrices.
    draw = lambda name, shape: torch.empty(shape, device="cuda", dtype=torch.float16).normal_(0.0, 0.02, generator=g)
    start = time.perf_counter()
    quantize_model(model, spec, weight_of=draw, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal: {len(left)} tensors of the 70B model were never given values: {left[:4]}")
    model.requires_grad_(False)
    return model.eval(), seconds


def status_kib(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status in KiB; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart VmHWM (the peak RSS) from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gib_of_kib(kib: Optional[int]) -> Optional[float]:
    return None if kib is None else kib * 1024 / GiB


def pinned_bytes(model: Any) -> int:
    paged = getattr(model, "paged", None)
    return sum(p.nbytes for p in paged.pages) if isinstance(paged, InferenceOffloadModel) else 0


def decode_seconds(model: Any, vocab_size: int, steps: int) -> float:
    """Seconds per batch-1 decode step after a 16-token prompt, greedy tokens fed back (common.measure's
    decode, without its prefill and batch-8 runs: a 70B step takes most of a second); the first run warms up."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, DECODE_PROMPT_LEN), generator=g).cuda()

    def decode() -> None:
        tok = prompt[:, -1:]
        for i in range(steps):
            tok = model(tok, DECODE_PROMPT_LEN + i)[:, -1].argmax(-1, keepdim=True)  # (1, 1)

    seconds = 0.0
    for _ in range(2):
        model(prompt, 0)
        seconds = timed(decode)
    return seconds / steps


def send_home(model: Transformer) -> None:
    """Back to the CPU whatever the last offload put on the GPU (resident blocks, embedding, head, the slot the
    next step's first block was prefetched into), and drop its caches: the model can be offloaded again."""
    torch.cuda.synchronize()  # the prefetch of the next step's first slice may still be copying
    for layer in model.layers:
        layer.attention.cache = None
    model.freqs_cis = None
    model.cpu()
    free_all()


def run_70b(model: Transformer, budget: Optional[float], steps: int, bandwidth: float) -> Row:
    name = "70b int4 g64, " + ("everything paged" if budget is None else f"budget {budget:g} GiB")
    row: Row = {"name": name, "shape": "70b", "budget_gib": budget}
    free_all()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hwm_reset = reset_peak_rss()
    off = None
    try:
        start = time.perf_counter()
        off = offload(model, max_batch_size=ARGS_70B.max_batch_size, max_seq_len=ARGS_70B.max_seq_len,
                      gpu_memory_gb=budget)
        row["offload_s"] = time.perf_counter() - start
        plan = off.plan
        row.update(resident_layers=plan.resident_layers, streamed_gib=plan.streamed_bytes / GiB,
                   pinned_gib=pinned_bytes(off) / GiB, plan_gpu_gib=plan.gpu_bytes / GiB)
        with torch.inference_mode():
            row["s_per_token"] = decode_seconds(off, ARGS_70B.vocab_size, steps)
        row["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() - before) / GiB
        row["floor_s"] = plan.streamed_bytes / bandwidth if plan.streamed_bytes else None
        row["ratio"] = row["s_per_token"] / row["floor_s"] if row["floor_s"] else None
        row["host_rss_gib"] = gib_of_kib(status_kib("VmRSS"))
        row["peak_host_rss_gib"] = gib_of_kib(status_kib("VmHWM")) if hwm_reset else None
        row["note"] = (f"{plan.resident_layers} resident, {plan.paged_layers} paged; {row['pinned_gib']:.1f} GiB "
                       f"pinned; offload {row['offload_s']:.1f} s; peak RSS "
                       + (f"{row['peak_host_rss_gib']:.1f} GiB" if row["peak_host_rss_gib"] else "n/a"))
    except Exception as e:  # noqa: BLE001 - a budget below the plan's minimum, out of memory: reported, not fatal
        row["note"] = failed(e)
    del off
    gc.collect()
    send_home(model)
    return emit(row)


def bench_70b(budgets: list[float], steps: int, bandwidth: float) -> tuple[list[Row], Row]:
    free_all()
    reset_peak_rss()
    start_rss = status_kib("VmRSS")
    try:
        model, seconds = build_70b()
    except Exception as e:  # noqa: BLE001
        return [], emit({"name": "70b int4 g64, quantization", "shape": "70b", "note": failed(e)})
    built = {"name": "70b int4 g64, quantization", "shape": "70b", "quantize_s": seconds,
             "codes_gib": sum(t.numel() * t.element_size() for t in model.buffers()) / GiB,  # codes, scales, mins
             "fp16_gib": sum(t.numel() * t.element_size() for t in model.parameters()) / GiB,
             "host_rss_gib": gib_of_kib(status_kib("VmRSS")), "start_rss_gib": gib_of_kib(start_rss),
             "peak_host_rss_gib": gib_of_kib(status_kib("VmHWM"))}
    emit(built)
    rows = [run_70b(model, budget, steps, bandwidth) for budget in [None, *budgets]]
    del model
    free_all()
    return rows, built


# --- output ------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(rows: list[Row]) -> str:
    out = ["| variant | decode ms/token b=1 | b=8 | streamed GiB/step | floor ms | b=1/floor | speedup vs fp16 "
           "| peak GPU GiB | load s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {_f(r.get('decode_ms_b1'), '.1f')} | {_f(r.get('decode_ms_b8'), '.1f')} "
                   f"| {_f(r.get('streamed_gib'), '.2f')} | {_f(r.get('floor_ms'), '.1f')} "
                   f"| {_f(r.get('ratio_b1'), '.2f')} | {_f(r.get('speedup_vs_fp16'), '.2f')} "
                   f"| {_f(r.get('peak_gpu_gib'), '.2f')} | {_f(r.get('build_s'), '.1f')} "
                   f"| {cell(r.get('note', ''))} |")
    return "\n".join(out)


def table_70b(rows: list[Row]) -> str:
    out = ["| budget | s/token | floor s | ratio | peak GPU GiB | host RSS GiB | resident layers | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "everything paged" if r.get("budget_gib") is None else f"{r['budget_gib']:g} GiB"
        out.append(f"| {budget} | {_f(r.get('s_per_token'), '.3f')} | {_f(r.get('floor_s'), '.3f')} "
                   f"| {_f(r.get('ratio'), '.2f')} | {_f(r.get('peak_gpu_gib'), '.2f')} "
                   f"| {_f(r.get('host_rss_gib'), '.1f')} | {_f(r.get('resident_layers'), 'd')} "
                   f"| {cell(r.get('note', ''))} |")
    return "\n".join(out)


def command_line(params: dict[str, Any]) -> str:
    """The command that reproduces a run of this script (``common.command_line``)."""
    return common_command_line(params, "scripts/bench/bench_quant.py")


def section(info: dict[str, Any], rows: list[Row], rows70: list[Row], built70: Optional[Row]) -> str:
    """The markdown between the two markers, the markers included."""
    lines = [
        MARK_START,
        "## Quantized paging",
        "",
        f"Command: `{info['command']}`  ",
        f"Device: {info['device']}, torch {info['torch']}, {info['date']}; dequantization by "
        f"{'Triton' if info['triton'] else 'PyTorch'}  ",
        f"Pinned host-to-device bandwidth measured in the same run: {info['bandwidth_gbps']:.1f} GB/s  ",
        f"Decode steps timed per batch size: {info['steps']} (70B: {info['steps70']}); weights random N(0, 0.02), "
        f"{'loaded from a checkpoint file' if info['from_disk'] else 'built in memory'}. Floor: the bytes a step "
        "streams (codes and scales when quantized) over the pinned bandwidth. Speed-up: fp16 everything paged, "
        "batch 1, of the same shape, over the row's batch 1. Load s: building the model (quantization included) and "
        "pinning it; rows of a spec after its first reuse its quantized weights.",
    ]
    if any(r.get("variant", "").startswith("llama.cpp") for r in rows):
        lines[-1] += (" llama.cpp rows: llama-bench's decode of 16 random tokens after 16 cached ones, the mean of 3 "
                      "runs; the layers it does not hold on the GPU run on the CPU (nothing is streamed), so they "
                      "have no floor; -ngl R equals the resident blocks of our budget row of about the same bits.")
    if info.get("total_s"):
        lines[-1] += f" The whole run took {info['total_s']:.0f} s."
    lines += ["", table(rows)]
    if rows70 or built70:
        lines += ["", "70B-shaped (80 layers, GQA 64/8, ffn 28672) in int4 g64, batch 1, every matrix drawn and "
                      "quantized on the GPU one at a time:"]
        if built70 and "quantize_s" in built70:
            lines += ["", f"Quantized in {built70['quantize_s']:.1f} s (drawing included): "
                          f"{built70['codes_gib']:.1f} GiB of codes and scales, {built70['fp16_gib']:.1f} GiB of "
                          f"fp16 embedding, norms and head, in host memory (process RSS "
                          f"{_f(built70['host_rss_gib'], '.1f')} GiB after, peak "
                          f"{_f(built70['peak_host_rss_gib'], '.1f')} GiB). Host RSS below: the process's VmRSS after the offload; the note's peak is VmHWM "
                          "during the variant."]
        elif built70:
            lines += ["", f"Quantization: {built70['note']}"]
        lines += ["", table_70b(rows70)]
    lines.append(MARK_END)
    return "\n".join(lines)


def replace_section(text: str, new_section: str) -> str:
    """``text`` with its bench_quant section replaced by ``new_section`` (``common.replace_section``)."""
    return common_replace_section(text, new_section, MARK_START, MARK_END)


def write_section(path: Path, new_section: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(old, new_section), encoding="utf-8")


# --- main --------------------------------------------------------------------------------------------------


def main(shapes: str = "7b,13b", steps: int = 8, budgets70: str = "4,8,24",
         llamacpp_bin: str = "/tmp/llamacpp/llama.cpp/build/bin", peers: str = "llamacpp",
         workdir: str = "/tmp/llama_offload_bench", json_out: Optional[str] = None, out: Optional[str] = None,
         skip70: bool = False, steps70: int = 4, llamacpp_budget: float = 4.0, from_disk: bool = False) -> None:
    """Quantized paging against fp16 and llama.cpp. --shapes: of 7b, 13b (comma-separated, "" for none);
    --budgets70: GiB budgets for the 70B int4 rows (besides everything paged); --peers llamacpp adds llama.cpp
    (7B, beside our rows at --llamacpp_budget GiB); --skip70 leaves the 70B out; --from_disk writes and loads
    real checkpoint files instead of building the weights in memory."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA GPU: PyTorch sees none here.")
    shape_list, budget_list = list_arg(shapes), [float(b) for b in list_arg(budgets70)]
    unknown = [s for s in shape_list if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}: choose from {', '.join(SHAPES)}")
    params = dict(shapes=shape_list, steps=steps, budgets70=[f"{b:g}" for b in budget_list], llamacpp_bin=llamacpp_bin,
                  peers=",".join(list_arg(peers)) or "none", workdir=workdir, json_out=json_out, out=out,
                  skip70=skip70, steps70=steps70, llamacpp_budget=f"{llamacpp_budget:g}", from_disk=from_disk)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()

    bandwidth = pinned_bandwidth()
    free_all()
    info: dict[str, Any] = {"command": command_line(params), "device": torch.cuda.get_device_name(),
                            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                            "bandwidth_gbps": bandwidth / 1e9, "steps": steps, "steps70": steps70,
                            "from_disk": from_disk, "triton": quant_triton.available()}
    log(f"pinned host-to-device bandwidth: {bandwidth / 1e9:.1f} GB/s; {info['device']}, torch {info['torch']}")

    rows: list[Row] = []
    llamacpp = "llamacpp" in list_arg(peers)
    for shape in shape_list:
        rows += bench_shape(shape, steps, bandwidth, work, from_disk, llamacpp and shape == "7b",
                            Path(llamacpp_bin), llamacpp_budget)
        log(f"{shape} done at {time.perf_counter() - run_start:.0f} s")
    rows70: list[Row] = []
    built70: Optional[Row] = None
    if not skip70:
        rows70, built70 = bench_70b(budget_list, steps70, bandwidth)
        log(f"70b done at {time.perf_counter() - run_start:.0f} s")
    info.update(rows=rows, rows70=rows70, quantization70=built70, total_s=time.perf_counter() - run_start)

    text = section(info, rows, rows70, built70)
    print(text, flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if out:
        write_section(Path(out), text)


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)  # one-line errors, and help printed without a pager
