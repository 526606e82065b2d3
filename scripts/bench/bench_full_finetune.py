"""Full fine-tuning (``finetune --full``) benchmarked: tokens/s, MFU, memory against the plan, and a step's split.

For an 8B Llama 3 shape (random N(0, 0.02) weights, bf16, batch 1) at each ``--seq_lens``, one trainer (the same
FullTrainer the command runs) takes ``--warmup`` steps, then ``--steps`` timed steps in a row; the time includes
waiting for the last step's updates, so it is the steady state. Per row:

- tokens/s and MFU, torchtitan's formula: 6 N + 12 L H Q T FLOPs per token (N without the embedding) against
  ``--peak_tflops`` (dense bf16);
- the split of a step: the forward pass alone (timed on the same row), the CPU optimizer's busy time per step
  (worker thread), and its exposed time: how long the host thread waited for the optimizer (before a unit's page
  was copied in, or for a staging buffer), which is what the GPU can wait for;
- the copies' floor: 2 x paged block bytes in (forward and backward) + 4 bytes a parameter out (fp32 gradients),
  over the pinned bandwidth measured in the same run;
- peak GPU memory (max_memory_allocated) and peak host RSS (VmHWM) against the plan's figures.

``--check`` first proves, on a 7B shape, that two paged steps equal two resident steps bit for bit (every 16-bit
weight compared, and the master weights' bits summed). ``--consumer`` runs a 7B shape at 8,192 tokens under a
24 GiB GPU budget. The FSDP2 peer is ``bench_fsdp2_offload.py``, run beside it in the same session.

Usage, on the GPU machine::

    python scripts/bench/bench_full_finetune.py --check --consumer --out /tmp/full.md --json_out /tmp/full.json

``--device cpu --preset tiny --seq_lens 64`` runs the same code in seconds; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from llama_offload.model.args import ModelArgs, param_counts
from llama_offload.model.presets import PRESETS
from llama_offload.model.transformer import Transformer
from llama_offload.train import budget, paged
from llama_offload.train.full_trainer import FullTrainer

GiB = 1024**3


def log(msg: str) -> None:
    print(f"[bench_full_finetune] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_peak_gib() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 / GiB for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def pinned_bandwidth(nbytes: int = GiB, reps: int = 5) -> float:
    """Host-to-GPU bytes/s from pinned memory, measured here."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - start)


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """N(0, 0.02) weights (norms 1) in ``dtype`` on the CPU, drawn on ``device`` (the same bits for a seed)."""
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1).to(dtype)
    model = model.to_empty(device="cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g))
    model.requires_grad_(False)
    return model


def make_trainer(args: ModelArgs, model: Transformer, *, seq_len: int, device: torch.device, dtype: torch.dtype,
                 optim_state: str, gpu_memory_gb: Optional[float], host_memory_gb: Optional[float],
                 offload_activations: Optional[bool], lr: float = 1e-5) -> FullTrainer:
    """FullTrainer around ``model`` with what ``finetune.prepare`` would have read, for random rows."""
    plan = budget.plan_full_training(args, seq_len=seq_len, batch_size=1, itemsize=dtype.itemsize, world=1,
                                     optim_state=optim_state, keep_grads=False,
                                     offload_activations=offload_activations, on_gpu=device.type == "cuda",
                                     gpu_memory_gb=gpu_memory_gb, host_memory_gb=host_memory_gb)
    opts = SimpleNamespace(seq_len=seq_len, batch_size=1, grad_accum=1, seed=1, lr=lr, weight_decay=0.0,
                           optim_state=optim_state, max_grad_norm=None)
    prep = SimpleNamespace(opts=opts, params=args, device=device, dtype=dtype, plan=plan, state=None,
                           eval_inputs=None, eval_targets=None)
    set_rows(prep, args, seq_len)
    return FullTrainer(prep, model)


def set_rows(prep: Any, args: ModelArgs, seq_len: int) -> None:
    g = torch.Generator().manual_seed(seq_len)
    prep.opts.seq_len = seq_len
    prep.inputs = torch.randint(0, args.vocab_size, (4, seq_len), generator=g)
    prep.targets = torch.randint(0, args.vocab_size, (4, seq_len), generator=g)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    counts = param_counts(args)
    n = counts["held"] - args.vocab_size * args.dim  # torchtitan leaves the embedding out
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def measure_row(trainer: FullTrainer, args: ModelArgs, seq_len: int, *, warmup: int, steps: int,
                pcie: Optional[float], peak_tflops: float) -> dict[str, Any]:
    prep, device, update = trainer.prep, trainer.prep.device, trainer.update
    set_rows(prep, args, seq_len)
    trainer.freqs_cis = paged.rope_table(trainer.model, seq_len, device)
    row: dict[str, Any] = {"seq_len": seq_len}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    for _ in range(warmup):
        trainer.train_step(step)
        step += 1
    update.settle()
    sync(device)
    exposed0, busy0 = update.exposed_s, update.optimizer_s
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step(step)[0])
        step += 1
    update.settle()
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    # The forward pass alone, on the same row (no checkpoints kept).
    tokens, targets = prep.inputs[:1].to(device), prep.targets[:1].to(device)
    sync(device)
    t0 = time.perf_counter()
    paged.paged_eval_loss(trainer.model, trainer.runner, tokens, targets, trainer.freqs_cis, trainer.loss_fn)
    sync(device)
    forward_s = time.perf_counter() - t0
    blocks = trainer.runner
    paged_bytes = sum(u.home.numel() for u in update.units[1 + blocks.resident : 1 + len(blocks.blocks)])
    total_params = sum(u.numel for u in update.units)
    row.update(
        step_s=step_s, tokens_per_s=seq_len / step_s,
        mfu=flops_per_token(args, seq_len) * seq_len / step_s / (peak_tflops * 1e12),
        forward_s=forward_s, optimizer_busy_s=(update.optimizer_s - busy0) / steps,
        optimizer_exposed_s=(update.exposed_s - exposed0) / steps,
        losses=losses, resident_blocks=blocks.resident, paged_blocks=len(blocks.blocks) - blocks.resident,
        planned_gpu_gib=trainer.plan.gpu.expected_peak_bytes / GiB, planned_host_gib=trainer.plan.host_bytes / GiB,
        checkpoints_on_host=trainer.plan.checkpoints_on_host, host_peak_gib=host_peak_gib())
    row["exposed_fraction"] = row["optimizer_exposed_s"] / step_s
    if device.type == "cuda":
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    if pcie:
        row["copies_floor_s"] = (2 * paged_bytes + 4 * total_params) / pcie
    return row


def check_paged_equals_resident(args: ModelArgs, device: torch.device, seq_len: int, steps: int) -> dict[str, Any]:
    """Two steps with every block paged, then with every block resident: the weights after them, compared."""
    results = []
    for budget_gb in (None, 1e6):  # None pages every block; a huge budget keeps every block on the GPU
        model = random_model(args, device, torch.bfloat16)
        trainer = make_trainer(args, model, seq_len=seq_len, device=device, dtype=torch.bfloat16, optim_state="bf16",
                               gpu_memory_gb=budget_gb, host_memory_gb=None, offload_activations=None, lr=1e-4)
        before = [float(torch.cat([v.reshape(-1) for v in u.views]).double().sum()) for u in trainer.update.units]
        for s in range(steps):
            trainer.train_step(s)
        trainer.update.settle()
        sync(device)
        weights = [torch.cat([v.reshape(-1) for v in u.views]).clone() for u in trainer.update.units]
        bits = [int(m.view(torch.int32).to(torch.int64).sum()) for m in trainer.update.masters.values()]
        moved = sum(float(w.double().sum()) != b for w, b in zip(weights, before))
        results.append((trainer.runner.resident, weights, bits, moved))
        trainer.close()
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
    (r0, w0, b0, m0), (r1, w1, b1, _) = results
    differing = sum(int((a != b).sum()) for a, b in zip(w0, w1))
    max_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(w0, w1))
    return {"resident_blocks": [r0, r1], "weights": sum(w.numel() for w in w0), "differing": differing,
            "max_abs_diff": max_diff, "master_bit_sums_equal": b0 == b1,
            "units_changed_by_training": f"{m0} of {len(w0)}"}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--seq_lens", default="4096,32768,131072")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--optim_state", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--gpu_memory_gb", type=float, default=None, help="default: what the GPU has, less 2 GiB")
    ap.add_argument("--host_memory_gb", type=float, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (989: H100 SXM)")
    ap.add_argument("--check", action="store_true", help="7B: two paged steps against two resident steps, bit for bit")
    ap.add_argument("--check_seq_len", type=int, default=2048)
    ap.add_argument("--consumer", action="store_true", help="7B at 8,192 tokens under a 24 GiB GPU budget")
    ap.add_argument("--out")
    ap.add_argument("--json_out")
    cli = ap.parse_args(argv)
    device = torch.device(cli.device)
    command = "python " + shlex.join(["scripts/bench/bench_full_finetune.py", *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {"command": command, "rows": []}
    on_gpu = device.type == "cuda"
    if on_gpu:
        report["gpu"] = torch.cuda.get_device_name(device)
        report["pinned_gbps"] = pinned_bandwidth() / 1e9
        log(f"{report['gpu']}; pinned H2D {report['pinned_gbps']:.1f} GB/s")
    pcie = report.get("pinned_gbps", 0) * 1e9 or None
    dtype = torch.bfloat16 if on_gpu else torch.float32
    small = "tiny" if cli.preset == "tiny" else "7b"
    if cli.check:
        args = ModelArgs(**PRESETS[small])
        log(f"check: {small}, {cli.check_seq_len} tokens, two steps paged and two resident")
        report["check"] = check_paged_equals_resident(args, device, cli.check_seq_len, 2)
        log(f"check: {report['check']}")
    gpu_gb = cli.gpu_memory_gb
    if gpu_gb is None and on_gpu:
        gpu_gb = torch.cuda.get_device_properties(device).total_memory / GiB - 2
    args = ModelArgs(**PRESETS[cli.preset])
    seq_lens = [int(s) for s in cli.seq_lens.split(",") if s.strip()]
    try:
        model = random_model(args, device, dtype)
        state = cli.optim_state
        for state in [cli.optim_state, *(s for s in ("bf16", "int8") if s != cli.optim_state)]:
            try:  # the plan refuses what this host cannot hold: the next smaller moments, as a user would
                trainer = make_trainer(args, model, seq_len=max(seq_lens), device=device, dtype=dtype,
                                       optim_state=state, gpu_memory_gb=gpu_gb, host_memory_gb=cli.host_memory_gb,
                                       offload_activations=None)
                break
            except ValueError as e:
                log(f"{state} moments refused: {e}")
                report.setdefault("refused", []).append(str(e))
        else:
            raise ValueError(report["refused"][-1])
        report["optim_state"] = state
        log(f"{cli.preset}: {trainer.plan.describe()}")
        report["plan"] = trainer.plan.describe()
        for seq_len in seq_lens:
            try:
                row = measure_row(trainer, args, seq_len, warmup=cli.warmup, steps=cli.steps, pcie=pcie,
                                  peak_tflops=cli.peak_tflops)
            except torch.cuda.OutOfMemoryError as e:
                row = {"seq_len": seq_len, "note": f"GPU out of memory: {str(e).splitlines()[0][:160]}"}
            row["model"] = f"{cli.preset} ({state} moments)"
            report["rows"].append(row)
            log(json.dumps(row))
        trainer.close()
        del trainer, model
    except ValueError as e:  # the plan refused
        report["rows"].append({"model": cli.preset, "note": f"refused by the plan: {e}"})
        log(str(e))
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    if cli.consumer:
        args7 = ModelArgs(**PRESETS[small])
        seq = 8192 if small == "7b" else 64
        try:
            model = random_model(args7, device, dtype)
            trainer = make_trainer(args7, model, seq_len=seq, device=device, dtype=dtype, optim_state=cli.optim_state,
                                   gpu_memory_gb=24 if on_gpu else None, host_memory_gb=cli.host_memory_gb,
                                   offload_activations=None)
            row = measure_row(trainer, args7, seq, warmup=cli.warmup, steps=cli.steps, pcie=pcie,
                              peak_tflops=cli.peak_tflops)
            row.update(model=f"{small} under 24 GiB", plan=trainer.plan.describe())
            trainer.close()
        except (ValueError, torch.cuda.OutOfMemoryError) as e:
            row = {"model": f"{small} under 24 GiB", "seq_len": seq, "note": str(e).splitlines()[0][:300]}
        report["rows"].append(row)
        log(json.dumps(row))
    text = render(report)
    print(text)
    if cli.out:
        Path(cli.out).write_text(text)
    if cli.json_out:
        Path(cli.json_out).write_text(json.dumps(report, indent=2) + "\n")


def render(report: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = [f"`{report['command']}`", "", f"GPU: {report.get('gpu', 'none')}; pinned H2D "
             f"{f(report.get('pinned_gbps'), '.1f')} GB/s; plan: {report.get('plan', '—')}", ""]
    if "check" in report:
        lines += [f"check (paged vs resident, 2 steps): {report['check']}", ""]
    lines += ["| model | tokens | step s | tokens/s | MFU | forward s | optimizer busy s | exposed s (share) | "
              "copies floor s | GPU peak / plan GiB | host peak / plan GiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        share = r.get("exposed_fraction")
        lines.append(
            f"| {r.get('model')} | {r.get('seq_len', '—')} | {f(r.get('step_s'), '.2f')} | {f(r.get('tokens_per_s'), ',.0f')} "
            f"| {f(r.get('mfu'), '.1%')} | {f(r.get('forward_s'), '.2f')} | {f(r.get('optimizer_busy_s'), '.2f')} | "
            f"{f(r.get('optimizer_exposed_s'), '.2f')} ({f(share, '.0%')}) | {f(r.get('copies_floor_s'), '.2f')} | "
            f"{f(r.get('gpu_peak_gib'), '.1f')} / {f(r.get('planned_gpu_gib'), '.1f')} | "
            f"{f(r.get('host_peak_gib'), '.1f')} / {f(r.get('planned_host_gib'), '.1f')} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
