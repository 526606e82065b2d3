"""Load generator for ``llama-offload serve``: 1, 4, 8 and 16 concurrent clients against one server, each sending
completion requests back to back; reports aggregate tokens/s, per-request tokens/s and p50/p95 latency.

The server runs in this process (the same engine and app as the command) on a free local port, and the clients
are OpenAI's own Python client, one thread each. Every level runs ``--rounds`` requests per client after one
warm-up request; requests are greedy with ``max_tokens`` new tokens (fewer where a sequence ends on its stop
token: the token counts come from each response's usage, so the rates stay honest).

    python scripts/bench/bench_serve.py --ckpt_dir checkpoints/random-7b --tokenizer_path T --clients 1,4,8,16 \\
        --max_tokens 32 --out /tmp/serve.md
    python scripts/bench/bench_serve.py --dtype float32 --clients 1,4,8 --max_tokens 16    # the default model, CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional


PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In a distant galaxy",
           "The recipe calls for", "My favourite book is", "Dear diary, today", "The weather in spring"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=3600)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        r = client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                      temperature=0)
        return time.perf_counter() - start, r.usage.completion_tokens

    def client_loop(c: int) -> list[tuple[float, int]]:
        return [one(c * rounds + k) for k in range(rounds)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latencies = [s for s, _ in results]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall, "per_request_tok_s": statistics.mean(n / s for s, n in results),
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95)}


def table(rows: list[dict[str, Any]], floor_s: Optional[float] = None) -> str:
    """``floor_s``: the PCIe floor of one pass (streamed bytes / pinned bandwidth); with it, each level's
    aggregate is also set against clients / floor_s, the most that many sequences get if every pass is at the floor."""
    base = rows[0]["aggregate_tok_s"] if rows else 1.0
    floor_head = " floor tok/s | aggregate / floor |" if floor_s else ""
    lines = ["| clients | requests | tokens | aggregate tok/s | vs 1 client |" + floor_head
             + " per-request tok/s | p50 s | p95 s |",
             "|---|---|---|---|---|" + ("---|---|" if floor_s else "") + "---|---|---|"]
    for r in rows:
        floor = ""
        if floor_s:
            most = r["clients"] / floor_s
            floor = f" {most:.1f} | {r['aggregate_tok_s'] / most:.2f} |"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['aggregate_tok_s']:.1f} | "
                     f"{r['aggregate_tok_s'] / base:.2f}x |{floor} {r['per_request_tok_s']:.1f} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt_dir", default=None, help="checkpoint (default: the default model)")
    ap.add_argument("--tokenizer_path", default=None)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each level, after a warm-up")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gpu_memory_gb", type=float, default=None, help="unset: every block paged")
    ap.add_argument("--cpu_blocks", type=int, default=0,
                    help="blocks on the CPU lane (default 0: every block streamed over PCIe)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args(argv)
    levels = [int(c) for c in a.clients.split(",")]
    if not levels or min(levels) < 1:
        raise SystemExit(f"--clients must be positive counts, found {a.clients!r}.")

    import threading

    import torch
    import uvicorn

    from llama_offload.cli.options import build_llama
    from llama_offload.serve.app import create_app
    from llama_offload.serve.server import engine_for, served_from

    flags: dict[str, Any] = dict(ckpt_dir=a.ckpt_dir, tokenizer_path=a.tokenizer_path, max_seq_len=a.max_seq_len,
                                 max_batch_size=max(levels))
    if torch.cuda.is_available():
        flags["cpu_blocks"] = a.cpu_blocks
    for key in ("dtype", "gpu_memory_gb"):
        if getattr(a, key) is not None:
            flags[key] = getattr(a, key)
    llama = build_llama(**flags)
    model = "bench"
    app = create_app(engine_for(llama, max_queue=max(levels)), served_from(llama, model))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        run_level(url, model, 1, 1, a.max_tokens)  # warm-up: lazy initialisation, CUDA graphs
        rows = []
        for n in levels:
            rows.append(run_level(url, model, n, a.rounds, a.max_tokens))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    floor_s, floor_note = None, ""
    plan = getattr(llama.model, "plan", None)
    if plan is not None and llama.device.type == "cuda" and plan.streamed_bytes:
        from llama_offload.offload.lanes import measure_pcie

        gbps = measure_pcie(llama.device)
        floor_s = plan.streamed_bytes / (gbps * 1e9)
        floor_note = (f"; pinned H2D {gbps:.1f} GB/s measured after the levels, so a pass, which streams "
                      f"{plan.streamed_bytes / 1e9:.2f} GB, has a PCIe floor of {floor_s * 1e3:.0f} ms")
    where = (f"{plan.resident_layers} blocks resident, {plan.paged_layers} paged, {plan.cpu_blocks} on the CPU lane"
             if plan is not None and llama.device.type == "cuda" else "unoffloaded on the CPU")
    head = (f"{Path(llama.options.ckpt_dir or 'default').name} ({llama.model.dtype if hasattr(llama.model, 'dtype') else ''}), "
            f"{device}, {where}; greedy, {a.max_tokens} new tokens a request, {a.rounds} requests per client "
            f"after a warm-up; max_batch_size {max(levels)}{floor_note}\n\n")
    text = head + table(rows, floor_s)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
