"""Decode and prefill speed of llama_offload against the PCIe floor and against peers, in one process.

    python scripts/bench/benchmark.py --shape 7b --budgets 6,8,12 --peers accelerate,airllm --out BENCHMARKS.md

Everything runs on one random-weight fp16 checkpoint (N(0, 0.02)), written once under --workdir in the
Meta layout (and in the Hugging Face layout for the peers). For each variant it reports decode ms/token
at batch 1 and 8, the time of a 512-token prefill, peak GPU memory, and the ratio of the batch-1 decode
step to its floor: the bytes the variant streams per step divided by the pinned host-to-device bandwidth
measured in the same run. Needs a CUDA GPU.
"""

from __future__ import annotations

import datetime
import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from llama_offload.cli.options import fire_main
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import load_model
from llama_offload.offload.offloaded import offload
from llama_offload.offload.plan import GiB

from common import (
    DECODE_PROMPT_LEN, MAX_BATCH, MAX_SEQ_LEN, SHAPES, free_gpu, list_arg, make_checkpoint, pinned_bandwidth,
    hbm_bandwidth, run_variant, timed,
)


def ours(ckpt_dir: Path, **offload_kwargs) -> Callable[[], tuple[object, int, str]]:
    def build():
        cpu = load_model(ckpt_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, show_progress=False)
        model = offload(cpu, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, **offload_kwargs)
        plan = model.plan
        return model, plan.streamed_bytes, f"{plan.resident_layers} resident, {plan.paged_layers} paged"
    return build


def resident(ckpt_dir: Path) -> Callable[[], tuple[object, int, str]]:
    def build():
        model = load_model(ckpt_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, show_progress=False).cuda()
        model.setup_caches(MAX_BATCH, MAX_SEQ_LEN, "cuda", torch.float16)
        return model, 0, "plain Transformer (the unoffloaded reference), eager kernel launches"
    return build


def read_per_step(args: ModelArgs, positions: int) -> int:
    """Bytes a batch-1 decode step must read from device memory: every block, the final norm and the output
    head, and the keys/values of ``positions`` cached tokens (the embedding contributes one row)."""
    from llama_offload.offload.plan import block_bytes

    kv = 2 * args.n_layers * positions * args.kv_heads * args.head_dim * 2
    return args.n_layers * block_bytes(args, torch.float16) + (args.vocab_size + 1) * args.dim * 2 + kv


def prefill_long(ckpt_dir: Path, tokens: int, budget: float, vocab_size: int) -> dict:
    """One prompt of ``tokens`` tokens, prefilled in chunks at a GPU budget: seconds and peak memory."""
    name = f"ours, {tokens}-token prefill at {budget:g} GiB"
    free_gpu()
    before = torch.cuda.memory_allocated()  # whatever earlier variants left: not this run's
    torch.cuda.reset_peak_memory_stats()
    cpu = load_model(ckpt_dir, max_seq_len=tokens + 16, max_batch_size=1, show_progress=False)
    try:
        model = offload(cpu, max_batch_size=1, max_seq_len=tokens + 16, gpu_memory_gb=budget)
    except ValueError as e:  # the plan's minimum is above the budget: reported, not fatal
        print(f"{name}: {e}", flush=True)
        return {"name": name, "note": str(e)}
    from llama_offload.generate.decode import BatchDecoder

    prompt = torch.randint(0, vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder = BatchDecoder(model, max_batch_size=1, max_seq_len=tokens + 16, device=torch.device("cuda"),
                           temperature=0, prefill_chunk=model.plan.prefill_chunk)
    loaded = torch.cuda.memory_allocated() - before
    # The prompt's prefill and one sampled token; bound now (a partial, not a lambda reading `decoder` when
    # called), as `decoder` is deleted below.
    seconds = timed(functools.partial(decoder.join, [prompt], 1, {-1}))
    row = {"name": name, "prefill_s": seconds, "peak_gpu_gib": (torch.cuda.max_memory_allocated() - before) / GiB,
           "plan_gib": model.plan.gpu_bytes / GiB, "chunk": model.plan.prefill_chunk,
           "note": f"{model.plan.resident_layers} resident, {model.plan.paged_layers} paged, chunks of "
                   f"{model.plan.prefill_chunk} positions; {loaded / GiB:.2f} GiB allocated by the model before the "
                   f"prefill; {before / GiB:.2f} GiB left by earlier variants not counted"}
    print(json.dumps(row), flush=True)
    del model, decoder, cpu
    free_gpu()
    return row


def stock(ckpt_dir: Path, args: ModelArgs) -> Callable[[], tuple[object, int, str]]:
    def build():
        cpu = load_model(ckpt_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH, show_progress=False)
        model = offload(cpu, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, num_slices=args.n_layers, stock=True)
        return model, model.plan.streamed_bytes, "FairScale OffloadModel as shipped: its outputs are wrong"
    return build


def load_speed(ckpt_dir: Path) -> dict:
    """Checkpoint file -> pinned host buffers, the cost paid once at start-up."""
    nbytes = sum(p.stat().st_size for p in ckpt_dir.glob("consolidated.*.pth"))
    start = time.perf_counter()
    cpu = load_model(ckpt_dir, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, show_progress=False)
    mapped = time.perf_counter() - start
    model = offload(cpu, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)
    total = time.perf_counter() - start
    del model, cpu
    free_gpu()
    return {"checkpoint_gib": nbytes / GiB, "mmap_s": mapped, "to_pinned_s": total, "gib_per_s": nbytes / GiB / total}


def table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    out = ["| variant | decode ms/token b=1 | b=8 | b8/b1 | prefill 512 (s) | peak GPU GiB | streamed GiB/step "
           "| floor ms | b=1 / floor | b=1 / HBM floor | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {f(r.get('decode_ms_b1'), '.1f')} | {f(r.get('decode_ms_b8'), '.1f')} "
                   f"| {f(r.get('b8_over_b1'), '.2f')} | {f(r.get('prefill_s_512'), '.3f')} "
                   f"| {f(r.get('peak_gpu_gib'), '.2f')} | {f(r.get('streamed_gib'), '.2f')} "
                   f"| {f(r.get('floor_ms'), '.1f')} | {f(r.get('ratio_b1'), '.3f')} | {f(r.get('ratio_hbm'), '.2f')} "
                   f"| {r.get('note', '')} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours_rows = sorted((r for r in rows if r.get("budget_gib") is not None), key=lambda r: r["budget_gib"])
    ax.plot([r["budget_gib"] for r in ours_rows], [1e3 / r["decode_ms_b1"] for r in ours_rows], "o-",
            label="llama_offload")
    for r in rows:
        if r.get("budget_gib") is None and r.get("decode_ms_b1"):
            ax.axhline(1e3 / r["decode_ms_b1"], linestyle="--", linewidth=1, color="gray")
            ax.annotate(r["name"], (0, 1e3 / r["decode_ms_b1"]), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("GPU memory budget (GiB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("7B-shaped fp16, random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(shape: str = "7b", budgets: str = "6,8,12", peers: str = "meta,llamacpp,accelerate,airllm", steps: int = 8,
         peer_steps: int = 4, peer_budget: float = 8.0, long_prompt: int = 8192, long_budgets: str = "4,6",
         llamacpp_bin: str = "/tmp/llamacpp/llama.cpp/build/bin",
         workdir: str = "/tmp/llama_offload_bench", out: Optional[str] = None, json_out: Optional[str] = None,
         png: Optional[str] = None) -> None:
    """Run every variant and print (and optionally write) the table. --budgets in GiB, comma-separated;
    accelerate gets --peer_budget GiB; peers, being slow, are timed over --peer_steps decode steps. Meta's
    reference code and llama.cpp (all layers on the GPU, built by ../shared/tools/llamacpp-peer.sh into
    --llamacpp_bin) run on the same weights. A --long_prompt prompt is prefilled at each of --long_budgets."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py needs a CUDA GPU: PyTorch sees none here.")
    args = SHAPES[shape]
    args = ModelArgs(**{**args.to_params(), "max_batch_size": MAX_BATCH, "max_seq_len": MAX_SEQ_LEN})
    work = Path(workdir)
    ckpt = work / f"meta-{shape}"
    start = time.perf_counter()
    sd = make_checkpoint(args, ckpt)
    print(f"checkpoint ready in {time.perf_counter() - start:.1f} s at {ckpt}", flush=True)

    bandwidth = pinned_bandwidth()
    print(f"pinned host-to-device bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape,
            "date": datetime.date.today().isoformat(), "bandwidth_gbps": bandwidth / 1e9, "steps": steps,
            "peer_steps": peer_steps}
    info["load"] = load_speed(ckpt)
    print(json.dumps(info["load"]), flush=True)

    hbm = hbm_bandwidth()
    hbm_floor_ms = 1e3 * read_per_step(args, DECODE_PROMPT_LEN + steps) / hbm
    info["hbm_gbps"], info["hbm_floor_ms"] = hbm / 1e9, hbm_floor_ms
    info["read_gib"] = read_per_step(args, DECODE_PROMPT_LEN + steps) / GiB
    print(f"device memory bandwidth: {hbm / 1e9:.0f} GB/s; batch-1 decode floor {hbm_floor_ms:.2f} ms", flush=True)

    v = args.vocab_size
    rows = [run_variant("plain Transformer, all resident", resident(ckpt), v, steps, bandwidth, hbm_floor_ms)]
    rows.append(run_variant("ours, all resident, CUDA graphs", ours(ckpt, resident=True), v, steps, bandwidth,
                            hbm_floor_ms))
    rows.append(run_variant("ours, all resident, --cuda_graphs false", ours(ckpt, resident=True, cuda_graphs=False),
                            v, steps, bandwidth, hbm_floor_ms))
    if "meta" in list_arg(peers):
        import bench_meta  # scripts/bench/bench_meta.py

        r = bench_meta.bench_meta(ckpt, args, steps=steps)
        if r.get("decode_ms_b1"):
            r["hbm_floor_ms"], r["ratio_hbm"] = hbm_floor_ms, r["decode_ms_b1"] / hbm_floor_ms
        print(json.dumps(r), flush=True)
        rows.append(r)
    if "llamacpp" in list_arg(peers):
        import bench_llamacpp  # scripts/bench/bench_llamacpp.py

        gguf = work / f"{shape}-f16.gguf"
        if not gguf.exists():
            sd = sd or torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
            bench_llamacpp.write_gguf(sd, args, gguf)
        r = bench_llamacpp.bench_llamacpp(gguf, Path(llamacpp_bin), n_gpu_layers=99)
        if r.get("decode_ms_b1"):
            r["hbm_floor_ms"], r["ratio_hbm"] = hbm_floor_ms, r["decode_ms_b1"] / hbm_floor_ms
        print(json.dumps(r), flush=True)
        rows.append(r)
    rows.append(run_variant(f"stock OffloadModel, {args.n_layers} slices", stock(ckpt, args), v, steps, bandwidth))
    row = run_variant("ours, everything paged", ours(ckpt), v, steps, bandwidth)
    row["budget_gib"] = row["peak_gpu_gib"]
    rows.append(row)
    for b in map(float, list_arg(budgets)):
        row = run_variant(f"ours, budget {b:g} GiB", ours(ckpt, gpu_memory_gb=b), v, steps, bandwidth)
        if "decode_ms_b1" in row:
            row["budget_gib"] = b
        rows.append(row)
    info["long_prefill"] = [prefill_long(ckpt, long_prompt, float(b), v) for b in list_arg(long_budgets)]

    peer_names = list_arg(peers)
    if set(peer_names) - {"meta", "llamacpp"}:
        import bench_peers  # scripts/bench/bench_peers.py: accelerate and AirLLM

        hf_dir = work / f"hf-{shape}"
        if not (hf_dir / "config.json").exists():
            sd = sd or {k: v for k, v in torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True).items()}
            bench_peers.write_hf_checkpoint(sd, args, hf_dir)
        del sd
        for name in peer_names:
            if name in ("meta", "llamacpp"):
                continue  # measured above, beside the resident rows
            if name == "accelerate":
                r = bench_peers.bench_accelerate(hf_dir, float(peer_budget), steps=peer_steps)
                rows.append(_peer_row(r, bandwidth, args))
            elif name == "airllm":
                rows.append(_peer_row(bench_peers.bench_airllm(hf_dir, steps=peer_steps), bandwidth, args))
            else:
                raise SystemExit(f"unknown peer {name!r}: choose from meta, llamacpp, accelerate, airllm")
    info["rows"] = rows

    text = table(rows)
    print(text)
    if json_out:
        Path(json_out).write_text(json.dumps(info, indent=2))
    if png:
        plot(rows, Path(png))
    if out:
        write_markdown(Path(out), info, text, png)


def _peer_row(r: dict, bandwidth: float, args: ModelArgs) -> dict:
    # Peers stream whatever they keep off the GPU; the floor is taken as every block, an optimistic bound for them.
    from llama_offload.offload.plan import block_bytes

    streamed = r.pop("streamed_bytes", args.n_layers * block_bytes(args, torch.float16))
    r["streamed_gib"] = streamed / GiB
    r["floor_ms"] = 1e3 * streamed / bandwidth
    r["ratio_b1"] = r["decode_ms_b1"] / r["floor_ms"] if r.get("decode_ms_b1") else None
    r["b8_over_b1"] = r["decode_ms_b8"] / r["decode_ms_b1"] if r.get("decode_ms_b1") and r.get("decode_ms_b8") else None
    print(json.dumps(r), flush=True)
    return r


def write_markdown(path: Path, info: dict, text: str, png: Optional[str]) -> None:
    load = info["load"]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `python scripts/bench/benchmark.py --shape {info['shape']} ...` (see the scripts' docstring)  ",
        f"Device: {info['device']}, torch {info['torch']}, {info['date']}  ",
        f"Pinned host-to-device bandwidth measured in the same run: {info['bandwidth_gbps']:.1f} GB/s  ",
        f"Device memory bandwidth measured in the same run: {info['hbm_gbps']:.0f} GB/s, so a batch-1 decode step, "
        f"which must read {info['read_gib']:.2f} GiB, has an HBM floor of {info['hbm_floor_ms']:.2f} ms  ",
        f"Decode steps timed per batch size: {info['steps']} (peers: {info['peer_steps']})",
        "",
        text,
        "",
        "Long prompt, prefilled in chunks at a GPU budget:",
        "",
        "| run | prefill s | peak GPU GiB | plan GiB | note |",
        "|---|---|---|---|---|",
        *[f"| {r['name']} | {r['prefill_s']:.2f} | {r['peak_gpu_gib']:.2f} | {r['plan_gib']:.2f} | {r['note']} |"
          if "prefill_s" in r else f"| {r['name']} | n/a | n/a | n/a | {r['note']} |" for r in info["long_prefill"]],
        "",
        f"Load: {load['checkpoint_gib']:.2f} GiB checkpoint to pinned host buffers in {load['to_pinned_s']:.1f} s "
        f"({load['gib_per_s']:.2f} GiB/s; memory-mapping alone {load['mmap_s']:.2f} s).",
    ]
    if png:
        lines += ["", f"![tokens/s against the GPU budget]({Path(png).name})"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)  # one-line errors, and help printed without a pager
