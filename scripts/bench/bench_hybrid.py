"""The CPU lane beside the PCIe lane, benchmarked: ours all paged, ours hybrid (hybrid.py), and llama.cpp at the
same number of GPU-resident layers on the same weights, 7B-shaped, decode at batch 1 and 8.

Every figure comes from one run on one machine: the pinned host-to-device bandwidth and the lanes' calibration
are measured first, and the floor is the all-paged PCIe floor (every block's bytes / the measured bandwidth).
Rows, for each ``--budgets`` entry (0: nothing resident):

- ``ours all paged``: every non-resident block streamed (``cpu_blocks=0``);
- ``ours hybrid``: the calibrated split (``cpu_blocks=None``); with ``--cpu_blocks N,M``, rows at those splits too;
- ``ours int4 hybrid``: the same with the blocks in int4 g64 (at ``--int4_budgets``; ``--no_fp16``: these alone);
- ``llama.cpp F16 / Q4_0, -ngl R``: R = the resident count of our row at that budget, the other layers and the
  head on the CPU (``--llamacpp_bin``; built by ``../shared/tools/llamacpp-peer.sh build``).

Usage, on the GPU machine::

    python scripts/bench/bench_hybrid.py --budgets 0,4,8 --out /tmp/hybrid.md --json_out /tmp/hybrid.json

Timings are the best of two whole decode runs after a warm-up run; a row that fails says why in its note.
``--profile`` adds one more batch-1 run per hybrid row with ``hybrid.LaneClock``: where the host thread's time went
(waiting at the crossings, computing CPU blocks, launching streamed blocks) and how long the copy lane was busy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.kernels.cpu import gemv_isa
from llama_offload.offload.lanes import calibrate, cpu_threads_for, measure_pcie
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_model

Row = dict[str, Any]
PROMPT_LEN = 16
INT4 = QuantSpec(4, 64)


def log(msg: str) -> None:
    print(f"[bench_hybrid] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def seven_b_state_dict(args: ModelArgs) -> dict[str, torch.Tensor]:
    """N(0, 0.02) weights (norms 1) of the 7B shape in fp16, drawn on the GPU, kept on the CPU."""
    from llama_offload.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args).half()
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=g)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    return sd


def cpu_model(sd: dict[str, torch.Tensor], args: ModelArgs):
    from llama_offload.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def decode_ms(model: Any, vocab_size: int, batch: int, steps: int, repeats: int = 2) -> float:
    """ms per decode step of ``batch`` sequences after a 16-token prompt, greedy tokens fed back; the best of
    ``repeats`` timed runs after a warm-up run."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (batch, PROMPT_LEN), generator=g).cuda()
    runs = []
    for _ in range(repeats + 1):
        tok = model(prompt, 0)[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(steps):
            tok = model(tok, PROMPT_LEN + i)[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / steps * 1e3)
    return min(runs[1:])


def profiled(model: Any, vocab_size: int, steps: int) -> Optional[dict[str, float]]:
    """One more decode run at batch 1 with hybrid.LaneClock attached: where the host thread's time goes (ms per
    step) and how long the copy lane was busy. None for a model without a CPU lane."""
    from llama_offload.offload.hybrid import HybridOffloadModel, LaneClock

    if not isinstance(model.paged, HybridOffloadModel):
        return None
    clock = LaneClock()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, PROMPT_LEN), generator=g).cuda()
    for run in ("warm-up", "profiled"):  # the warm-up puts the copy ring back on the batch-1 schedule
        tok = model(prompt, 0)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        torch.cuda.synchronize()
        if run == "profiled":
            clock.attach(model.paged)
        start = time.perf_counter()
        for i in range(steps):
            tok = model(tok, PROMPT_LEN + i)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e3
    return {"step_ms": wall, **clock.report(steps)}


def ours(name: str, sd: dict[str, torch.Tensor], args: ModelArgs, budget: float, steps: int, floor_ms: float,
         spec: Optional[QuantSpec], profile: bool = False, **kw: Any) -> Row:
    row: Row = {"name": name, "budget_gib": budget}
    try:
        model = cpu_model(sd, args)
        if spec is not None:
            model = quantize_model(model, spec, device="cuda")
        model = offload(model, max_batch_size=8, max_seq_len=args.max_seq_len,
                        gpu_memory_gb=budget or None, **kw)
        plan = model.plan
        row.update(resident=plan.resident_layers, paged=plan.paged_layers, cpu=plan.cpu_blocks,
                   max_cpu_tokens=plan.max_cpu_tokens, expected_ms=plan.expected_decode_ms())
        for b in (1, 8):
            row[f"b{b}_ms"] = decode_ms(model, args.vocab_size, b, steps)
        row["b1_over_floor"] = row["b1_ms"] / floor_ms
        if profile:
            row["profile"] = profiled(model, args.vocab_size, steps)
        del model
    except Exception as e:  # noqa: BLE001 - a row that fails says why
        row["note"] = f"FAILED: {type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    log(json.dumps(row))
    return row


def llamacpp(sd: dict[str, torch.Tensor], args: ModelArgs, layers: list[int], bin_dir: Path, work: Path,
             threads: int, qtypes: tuple[str, ...] = ("F16", "Q4_0")) -> list[Row]:
    import bench_llamacpp

    if bench_llamacpp.find_binary(bin_dir, "llama-bench") is None:
        return [{"name": "llama.cpp", "note": f"skipped: no llama-bench in {bin_dir}"}]
    rows: list[Row] = []
    f16, q4 = work / "7b-f16.gguf", work / "7b-q4_0.gguf"
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench_llamacpp.write_gguf(sd, args, f16)
        bench_llamacpp.quantize_gguf(f16, q4, "Q4_0", bin_dir, timeout_s=300)
        for qtype, path in ((q, {"F16": f16, "Q4_0": q4}[q]) for q in qtypes):
            for ngl in layers:
                r = bench_llamacpp.bench_llamacpp(path, bin_dir, n_gpu_layers=ngl, threads=threads, n_gen=16,
                                                  n_prompt=0, reps=3, n_depth=PROMPT_LEN, timeout_s=180,
                                                  name=f"llama.cpp {qtype}, -ngl {ngl}")
                rows.append({"name": f"llama.cpp {qtype}, -ngl {ngl}", "resident": ngl,
                             "b1_ms": r.get("decode_ms_b1"), "note": r.get("note")})
                log(json.dumps(rows[-1]))
    finally:
        for p in (f16, q4):
            p.unlink(missing_ok=True)
    return rows


def table(rows: list[Row], floor_ms: float) -> str:
    head = "| row | budget GiB | resident / paged / CPU | b=1 ms | b=1 / floor | b=8 ms | expected b=1 ms | vs llama.cpp | note |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        def f(key: str, fmt: str = ".1f") -> str:
            v = r.get(key)
            return "n/a" if v is None else format(v, fmt)
        split = "n/a" if "paged" not in r else f"{r['resident']} / {r['paged']} / {r['cpu']}"
        if "paged" not in r and "resident" in r:
            split = f"{r['resident']} on the GPU, the rest on the CPU"
        lines.append(f"| {r['name']} | {f('budget_gib', 'g')} | {split} | {f('b1_ms')} | "
                     f"{'n/a' if r.get('b1_ms') is None else format(r['b1_ms'] / floor_ms, '.2f')} | {f('b8_ms')} | "
                     f"{f('expected_ms')} | {f('vs_llamacpp', '.2f')} | {str(r.get('note') or '').replace('|', '/')} |")
    return "\n".join(lines)


def profiles(rows: list[Row]) -> str:
    """The --profile runs, a line each: where a batch-1 step's host time went and how busy the copy lane was."""
    lines = []
    for r in rows:
        p = r.get("profile")
        if p:
            copies = "" if "copy_busy_ms" not in p else (f"; copy lane busy {p['copy_busy_ms']:.1f} ms "
                                                         f"({p['copies_per_step']:.0f} copies)")
            lines.append(f"- {r['name']}, {r['budget_gib']:g} GiB: step {p['step_ms']:.1f} ms; host: waiting at crossings "
                         f"{p['wait_ms']:.1f}, CPU blocks {p['cpu_ms']:.1f}, streamed blocks {p['gpu_ms']:.1f}{copies}")
    return "" if not lines else "\n\nWhere a batch-1 step's time goes (--profile, ms per step):\n\n" + "\n".join(lines)


def kernels(lanes: Any) -> str:
    """e.g. "torch 9.31 ms, gemv 5.02 ms (runs gemv)": every CPU kernel calibration timed on one block."""
    timed = ", ".join(f"{k} {ms:.2f} ms" for k, ms in lanes.kernel_ms) or lanes.cpu_kernel
    return f"{timed} (runs {lanes.cpu_kernel})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0,8", help="GPU budgets in GiB, comma-separated (0: nothing resident)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    ap.add_argument("--llamacpp_bin", default="/tmp/llamacpp/llama.cpp/build/bin")
    ap.add_argument("--no_llamacpp", action="store_true")
    ap.add_argument("--no_int4", action="store_true")
    ap.add_argument("--no_fp16", action="store_true", help="no fp16 rows (the fp16 calibration still runs): int4 rows "
                    "at --int4_budgets beside llama.cpp only")
    ap.add_argument("--cpu_blocks", default="", help="extra fp16 rows with these explicit splits, comma-separated "
                    "(beside the calibrated one: shows how close the planner's choice is to the best)")
    ap.add_argument("--int4_cpu_blocks", default="", help="extra int4 rows with these explicit splits")
    ap.add_argument("--int4_budgets", default=None, help="budgets for the int4 rows (default: --budgets)")
    ap.add_argument("--profile", action="store_true", help="one more batch-1 run per hybrid row with the lane clock "
                    "(hybrid.LaneClock): host ms waiting / on CPU blocks / launching streamed blocks, copy lane busy ms")
    ap.add_argument("--workdir", default="/tmp/llama_offload_bench")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_hybrid needs a CUDA GPU.")
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_batch_size=8,
                     max_seq_len=256)
    budgets = [float(b) for b in a.budgets.split(",")]
    threads = cpu_threads_for(None)
    pcie = measure_pcie(torch.device("cuda"), nbytes=2**30)
    sd = seven_b_state_dict(args)
    block_bytes = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("layers.0."))
    floor_ms = args.n_layers * block_bytes / (pcie * 1e9) * 1e3
    lanes = calibrate(args, torch.float16, torch.device("cuda"), threads=threads, use_cache=False)
    lanes4 = None if a.no_int4 else calibrate(args, torch.float16, torch.device("cuda"), threads=threads, spec=INT4,
                                              use_cache=False)
    info = {"pcie_gbps": pcie, "floor_ms": floor_ms, "threads": threads, "cpu_ms_fp16": lanes.cpu_ms,
            "cpu_ms_int4": None if lanes4 is None else lanes4.cpu_ms, "device": torch.cuda.get_device_name(),
            "kernel_fp16": lanes.cpu_kernel, "kernel_ms_fp16": lanes.kernel_ms, "gemv_isa": gemv_isa(),
            "kernel_int4": None if lanes4 is None else lanes4.cpu_kernel,
            "kernel_ms_int4": None if lanes4 is None else lanes4.kernel_ms, "gpu_block_ms": lanes.gpu_block_ms,
            "pcie_beside_cpu_gbps_fp16": lanes.pcie_loaded_gbps,
            "pcie_beside_cpu_gbps_int4": None if lanes4 is None else lanes4.pcie_loaded_gbps}
    log(json.dumps(info))
    rows: list[Row] = []
    splits = lambda text: [int(c) for c in text.split(",") if c.strip()]  # noqa: E731
    hybrid = dict(cpu_threads=threads, profile=a.profile)
    for budget in [] if a.no_fp16 else budgets:
        rows.append(ours("ours all paged", sd, args, budget, a.steps, floor_ms, None, cpu_blocks=0))
        rows.append(ours("ours hybrid", sd, args, budget, a.steps, floor_ms, None, cpu_blocks=None, lanes=lanes, **hybrid))
        for n in splits(a.cpu_blocks):
            rows.append(ours(f"ours hybrid, --cpu_blocks {n}", sd, args, budget, a.steps, floor_ms, None, cpu_blocks=n,
                             lanes=lanes, **hybrid))
    int4_budgets = budgets if a.int4_budgets is None else [float(b) for b in a.int4_budgets.split(",")]
    for budget in int4_budgets if lanes4 is not None else []:
        rows.append(ours("ours int4 hybrid", sd, args, budget, a.steps, floor_ms, INT4, cpu_blocks=None, lanes=lanes4,
                         **hybrid))
        for n in splits(a.int4_cpu_blocks):
            rows.append(ours(f"ours int4 hybrid, --cpu_blocks {n}", sd, args, budget, a.steps, floor_ms, INT4,
                             cpu_blocks=n, lanes=lanes4, **hybrid))
    if not a.no_llamacpp:
        layers = sorted({int(r["resident"]) for r in rows if "resident" in r})
        qtypes = ("Q4_0",) if a.no_fp16 else ("F16", "Q4_0")
        peers = llamacpp(sd, args, layers, Path(a.llamacpp_bin), Path(a.workdir), threads, qtypes)
        rows += peers
        for r in rows:  # ours against llama.cpp at the same resident layers (F16 for fp16, Q4_0 for int4)
            if r["name"].startswith("ours") and r.get("b1_ms"):
                qtype = "Q4_0" if "int4" in r["name"] else "F16"
                peer = next((p for p in peers if p["name"] == f"llama.cpp {qtype}, -ngl {r['resident']}"), None)
                if peer and peer.get("b1_ms"):
                    r["vs_llamacpp"] = r["b1_ms"] / peer["b1_ms"]
    beside = ", ".join(f"{name} {gbps:.1f}" for name, gbps in (("fp16", lanes.pcie_loaded_gbps),
                       ("int4", None if lanes4 is None else lanes4.pcie_loaded_gbps)) if gbps)
    text = (f"7B shape fp16, {torch.cuda.get_device_name()}, pinned H2D {pcie:.1f} GB/s ({beside or 'n/a'} GB/s while "
            f"the CPU lane computes), all-paged PCIe floor "
            f"{floor_ms:.1f} ms/token, CPU lane {threads} threads (a fp16 block: "
            f"{lanes.cpu_block_ms(1):.2f} ms at 1 token, {lanes.cpu_block_ms(8):.2f} ms at 8; kernels at 1 token: "
            f"{kernels(lanes)}{'' if lanes4 is None else '; int4: ' + kernels(lanes4)}; native kernels: "
            f"{gemv_isa() or 'not built'})\n\n" + table(rows, floor_ms) + profiles(rows))
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
