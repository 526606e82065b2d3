"""Fine-tuning through paged blocks, benchmarked: peak GPU memory, tokens/s and the PCIe floor per step.

For a 7B shape (random N(0, 0.02) weights in bf16, LoRA rank 16 on all seven matrices) at each ``--seq_lens`` x
``--budgets``, one optimizer step's forward and backward are timed after a warm-up step. The floor of a step is
2 x paged bytes / pinned bandwidth (the forward and the backward each stream every paged block once), with the
bandwidth measured in the same run. Then an 8B Llama 3 shape (128,256-token vocabulary) is tried at growing
``--long_seq_lens`` under ``--long_budget`` GiB until one does not fit: the longest that fits is reported.

``--check_grads`` first compares one step's LoRA gradients, every block paged against every block resident, on
the 7B shape at ``--check_seq_len`` tokens: max |difference| (0 means bit-equal).

Usage, on the GPU machine::

    python scripts/bench/bench_finetune.py --out /tmp/finetune.md --json_out /tmp/finetune.json

``--full`` runs ``bench_full_finetune.py`` (full fine-tuning) with the other flags instead.

``--device cpu --preset tiny`` runs the same code in seconds (the CPU test does that); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import Transformer
from llama_offload.train import budget, paged
from llama_offload.model import lora
from llama_offload.train.loss import chunked_cross_entropy
from llama_offload.model.presets import PRESETS

GiB = 1024**3


def log(msg: str) -> None:
    print(f"[bench_finetune] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    model: str
    seq_len: int
    budget_gb: Optional[float]
    resident: int = 0
    paged: int = 0
    step_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_gib: Optional[float] = None
    planned_gib: Optional[float] = None
    floor_s: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def random_state_dict(args: ModelArgs, device: torch.device) -> dict[str, torch.Tensor]:
    """N(0, 0.02) weights, norms 1, in bf16, drawn on ``device`` and kept on the CPU."""
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1).to(torch.bfloat16)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=g)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sd


def build(sd: dict[str, torch.Tensor], args: ModelArgs, rank: int, device: torch.device):
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    model.load_state_dict(sd, assign=True, strict=True)
    torch.manual_seed(0)
    adapter = lora.LoRAAdapter(lora.LoRAConfig(rank, 2.0 * rank, lora.TARGETS, lora.ModelShape.of(args)), device)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.01)  # B is zero at init: nonzero B lets every gradient reach the blocks below
    lora.attach(model, adapter)
    for m in (model.tok_embeddings, model.norm, model.output):
        m.to(device)
    return model, adapter


def step(model, runner, args: ModelArgs, seq_len: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len), generator=g).to(device)
    targets = torch.randint(0, args.vocab_size, (1, seq_len), generator=g).to(device)
    freqs = paged.rope_table(model, seq_len, device)
    chunk = budget.loss_chunk_tokens(args.vocab_size)
    loss_fn = lambda h, w, t, reduction: chunked_cross_entropy(h, w, t, chunk_tokens=chunk, reduction=reduction)
    _sync(device)
    start = time.perf_counter()
    paged.paged_loss_and_backward(model, runner, tokens, targets, freqs, float(seq_len), loss_fn)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_bytes(model: Transformer) -> int:
    layer = model.layers[0]
    return sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])


def measure(name: str, sd, args: ModelArgs, seq_len: int, budget_gb: Optional[float], rank: int,
            device: torch.device, pcie_gbps: Optional[float], steps: int) -> Row:
    row = Row(name, seq_len, budget_gb)
    model, adapter = build(sd, args, rank, device)
    one = block_bytes(model)
    fixed = sum(t.numel() * t.element_size() for m in (model.tok_embeddings, model.norm, model.output)
                for t in m.parameters())
    try:
        plan = budget.plan_training(args, block_bytes=one, fixed_weight_bytes=fixed,
                                    lora_params=sum(p.numel() for p in adapter.parameters()), seq_len=seq_len,
                                    batch_size=1, itemsize=2, lora_rank=rank, offload_activations=True,
                                    gpu_memory_gb=budget_gb)
    except ValueError as e:
        row.note = f"refused by the plan: {e}"
        return row
    row.resident, row.paged, row.planned_gib = plan.resident_layers, plan.paged_layers, plan.expected_peak_bytes / GiB
    if pcie_gbps:
        row.floor_s = 2 * plan.paged_layers * one / (pcie_gbps * 1e9)
    try:
        runner = paged.BlockRunner(model.layers, device, resident=plan.resident_layers, offload_activations=True,
                                   autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                                   ffn_chunk=budget.FFN_CHUNK_TOKENS)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [step(model, runner, args, seq_len, device) for _ in range(steps + 1)]
        times = times[1:] or times  # the first step warms up, unless it is the only one
        row.step_s = min(times)
        row.tokens_per_s = seq_len / row.step_s
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
    except torch.OutOfMemoryError as e:
        row.note = f"out of GPU memory: {str(e).splitlines()[0][:160]}"
    finally:
        del model, adapter
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def check_grads(sd, args: ModelArgs, seq_len: int, rank: int, device: torch.device) -> dict:
    """One step with every block paged, then the same blocks all resident: LoRA gradients compared."""
    grads = []
    for resident in (0, args.n_layers):
        model, adapter = build(sd, args, rank, device)
        runner = paged.BlockRunner(model.layers, device, resident=resident, offload_activations=resident == 0,
                                   autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                                   ffn_chunk=budget.FFN_CHUNK_TOKENS)
        step(model, runner, args, seq_len, device)
        grads.append([p.grad.float().cpu() for p in adapter.parameters()])
        del model, adapter, runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    scale = max(a.abs().max().item() for a in grads[1])
    return {"seq_len": seq_len, "max_abs_diff": diff, "max_abs_grad": scale,
            "bit_equal": all(torch.equal(a, b) for a, b in zip(*grads))}


def table(rows: list[Row], pcie: Optional[float]) -> str:
    out = [f"Pinned host-to-device bandwidth measured in this run: {pcie:.1f} GB/s." if pcie else "",
           "", "| model | seq_len | budget | resident / paged | step | tokens/s | floor (2 x paged bytes / PCIe) "
           "| step / floor | peak GPU memory (planned) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v, fmt, unit="": "" if v is None else format(v, fmt) + unit
        ratio = f"{r.step_s / r.floor_s:.2f}x" if r.step_s and r.floor_s else ""
        out.append(f"| {r.model} | {r.seq_len} | {f(r.budget_gb, 'g', ' GiB')} | {r.resident} / {r.paged} | "
                   f"{f(r.step_s, '.2f', ' s')} | {f(r.tokens_per_s, ',.0f')} | {f(r.floor_s, '.2f', ' s')} | {ratio} | "
                   f"{f(r.peak_gib, '.2f', ' GiB')} ({f(r.planned_gib, '.2f', ' GiB')}) | {r.note} |")
    return "\n".join(out)


def main() -> None:
    if "--full" in sys.argv[1:]:  # full fine-tuning has its own benchmark; the flag keeps one entry point
        import bench_full_finetune

        return bench_full_finetune.main([a for a in sys.argv[1:] if a != "--full"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--seq_lens", default="4096,16384,32768")
    ap.add_argument("--budgets", default="8,16")
    ap.add_argument("--long_preset", default="llama3.1-8b")
    ap.add_argument("--long_budget", type=float, default=24.0)
    ap.add_argument("--long_seq_lens", default="32768,65536,98304,131072")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step (best is reported)")
    ap.add_argument("--check_grads", action="store_true")
    ap.add_argument("--check_seq_len", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n_layers", type=int, default=None, help="fewer blocks than the preset (a quick run)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    pcie = None
    if device.type == "cuda":
        from llama_offload.offload.lanes import measure_pcie

        pcie = measure_pcie(device)
        log(f"pinned H2D {pcie:.1f} GB/s")
    result: dict = {"pcie_gbps": pcie, "rows": [], "grads": None, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    rows: list[Row] = []

    def shape(preset: str, seq_len: int) -> ModelArgs:
        params = dict(PRESETS[preset])
        if a.n_layers:
            params["n_layers"] = a.n_layers
        return ModelArgs(**params, max_seq_len=seq_len, max_batch_size=1)

    seq_lens = [int(s) for s in a.seq_lens.split(",") if s]
    args = shape(a.preset, max(seq_lens))
    log(f"drawing {a.preset} weights")
    sd = random_state_dict(args, device)
    if a.check_grads:
        result["grads"] = check_grads(sd, args, a.check_seq_len, a.lora_rank, device)
        log(f"gradients paged vs resident: {result['grads']}")
    for seq_len in seq_lens:
        for b in [float(x) for x in a.budgets.split(",") if x]:
            rows.append(measure(a.preset, sd, args, seq_len, b, a.lora_rank, device, pcie, a.steps))
            log(str(asdict(rows[-1])))
    del sd
    gc.collect()
    if a.long_preset:
        long_lens = [int(s) for s in a.long_seq_lens.split(",") if s]
        args = shape(a.long_preset, max(long_lens))
        log(f"drawing {a.long_preset} weights")
        sd = random_state_dict(args, device)
        for seq_len in long_lens:
            row = measure(a.long_preset, sd, args, seq_len, a.long_budget, a.lora_rank, device, pcie, 0)  # one step each: long ones take minutes
            rows.append(row)
            log(str(asdict(row)))
            if row.step_s is None:
                break
        fits = [r.seq_len for r in rows if r.model == a.long_preset and r.step_s is not None]
        result["longest_fitting_seq_len"] = max(fits) if fits else None
    result["rows"] = [asdict(r) for r in rows]
    text = table(rows, pcie)
    if result["grads"]:
        g = result["grads"]
        text += (f"\n\nOne step at {g['seq_len']} tokens, LoRA gradients every block paged vs every block resident: "
                 f"{'bit-equal' if g['bit_equal'] else 'max |diff| ' + format(g['max_abs_diff'], '.3g')} "
                 f"(largest gradient {g['max_abs_grad']:.3g}).")
    if result.get("longest_fitting_seq_len") is not None or a.long_preset:
        text += f"\n\nLongest --seq_len of {a.long_preset} that fits {a.long_budget:g} GiB: {result.get('longest_fitting_seq_len')}."
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
