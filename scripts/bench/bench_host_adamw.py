"""HostAdamW's step on one unit, timed against the host-RAM floor and against torch's own AdamW.

For each state storage (fp32, bf16, int8) and each path that runs here (the native kernel; torch's kernels: its
fused AdamW for fp32, chunk by chunk for bf16 and int8; HostAdamW's default is the fused kernel for fp32 and the
native one for the others), one unit of ``--params`` fp32 master weights (default 218,112,000: one block of an 8B
Llama 3) is stepped repeatedly after a warm-up step: the median seconds per step, parameters per second, and the
ratio to the floor. The floor is the bytes the step must move (grad and master read, master written, the moments
read and written: 28 bytes a parameter for fp32 moments, 20 for bf16, 16 plus the scales for int8) divided by the
host's memory bandwidth, measured in the same run on ``--copy_gib`` GiB (read + write bytes / seconds, best of 5,
of a tensor copy and of an in-place update: the faster; ``host_bandwidth`` says why both). The peers are
``torch.optim.AdamW(fused=True)`` and ``foreach=True`` on the same fp32 unit (fp32 moments, the same floor).

Usage (on the machine whose host you want to know)::

    python scripts/bench/bench_host_adamw.py
    python scripts/bench/bench_host_adamw.py --params 20000000 --threads 2 --json_out /tmp/host_adamw.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from llama_offload.kernels import cpu_adamw
from llama_offload.train.host_adamw import STATES, HostAdamW, fused_available, state_bytes_per_param

GiB = 1024**3
# One block of Llama 3 8B: wq, wo 4096 x 4096; wk, wv 1024 x 4096; w1, w2, w3 14336 x 4096; two norms of 4096.
DEFAULT_PARAMS = 218_112_000


def log(msg: str) -> None:
    print(f"[bench_host_adamw] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def host_bandwidth(gib: float, reps: int = 5) -> dict[str, float]:
    """Bytes per second (read + write) of two passes over ``gib`` GiB of host memory, each the best of ``reps``:
    "copy", one tensor into another, and "in_place", a tensor updated in place (``add_``). A copy's destination is
    read before it is written on most CPUs (write-allocate), a byte the count leaves out; the step's writes all go
    to tensors it has just read, as the in-place pass's do. The floor takes the faster of the two."""
    n = int(gib * GiB) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # touches every page of dst once, outside the timing
    best = {"copy": float("inf"), "in_place": float("inf")}
    for _ in range(reps):
        for name, fn in (("copy", lambda: dst.copy_(src)), ("in_place", lambda: dst.add_(1.0))):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2 * n * 4 / seconds for name, seconds in best.items()}


def moved_bytes(state: str) -> float:
    """Bytes a step must move per parameter: grad read (4), master read and written (8), moments read and written."""
    return 4 + 8 + 2 * state_bytes_per_param(state)


def time_step(step: Callable[[], None], repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(name: str, state: str, path: str, params: int, seconds: float, bandwidth: float) -> dict[str, Any]:
    floor = params * moved_bytes(state) / bandwidth
    return {"name": name, "state": state, "path": path, "params": params, "s_per_unit": seconds,
            "params_per_s": params / seconds, "bytes_per_param": moved_bytes(state), "floor_s": floor,
            "ratio_to_floor": seconds / floor}


def bench_host_adamw(params: int, repeats: int, bandwidth: float, paths: list[str]) -> list[dict[str, Any]]:
    master = torch.randn(params) * 0.02
    grad = torch.randn(params) * 1e-3
    rows = []
    for state in STATES:
        for path in paths:
            opt = HostAdamW([master], lr=1e-4, weight_decay=0.1, state=state, native=path == "native")
            seconds = time_step(functools.partial(opt.step, 0, grad), repeats)
            how = path if path == "native" else "torch fused" if state == "fp32" and fused_available() else "torch chunked"
            rows.append(row("HostAdamW", state, how, params, seconds, bandwidth))
            log(f"HostAdamW {state} {how}: {seconds * 1e3:.1f} ms ({rows[-1]['ratio_to_floor']:.2f}x the floor)")
            del opt
            gc.collect()
    return rows


def bench_peers(params: int, repeats: int, bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for kind in ("fused", "foreach"):
        p = torch.nn.Parameter(torch.randn(params) * 0.02)
        p.grad = torch.randn(params) * 1e-3
        try:
            opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.1, **{kind: True})
            seconds = time_step(opt.step, repeats)
        except (RuntimeError, ValueError) as e:  # a torch without this implementation on the CPU
            log(f"torch.optim.AdamW({kind}=True) did not run: {e}")
            continue
        rows.append(row(f"torch.optim.AdamW({kind}=True)", "fp32", f"torch {kind}", params, seconds, bandwidth))
        log(f"torch AdamW {kind}: {seconds * 1e3:.1f} ms ({rows[-1]['ratio_to_floor']:.2f}x the floor)")
        del opt, p
        gc.collect()
    return rows


def table(rows: list[dict[str, Any]], bandwidths: dict[str, float]) -> str:
    lines = [f"Host bandwidth, read + write bytes: {bandwidths['copy'] / 1e9:.1f} GB/s by a copy, "
             f"{bandwidths['in_place'] / 1e9:.1f} GB/s in place; the floor uses the faster.", "",
             "| optimizer | state | path | params | ms per unit | Mparams/s | bytes/param | floor ms | x floor |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['state']} | {r['path']} | {r['params']:,} | {r['s_per_unit'] * 1e3:.1f} | "
                     f"{r['params_per_s'] / 1e6:.0f} | {r['bytes_per_param']:.2f} | {r['floor_s'] * 1e3:.1f} | "
                     f"{r['ratio_to_floor']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="parameters in the unit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row, after one warm-up step")
    parser.add_argument("--copy_gib", type=float, default=2.0, help="size of the bandwidth copy in GiB")
    parser.add_argument("--paths", default="native,torch", help="HostAdamW paths to time: native, torch")
    parser.add_argument("--no_peers", action="store_true", help="skip torch.optim.AdamW fused and foreach")
    parser.add_argument("--json_out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.params < 1 or args.repeats < 1 or args.copy_gib <= 0:
        parser.error("--params and --repeats must be >= 1 and --copy_gib > 0")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not set(paths) <= {"native", "torch"}:
        parser.error(f"--paths takes native and/or torch; got {args.paths!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "native" in paths and not cpu_adamw.available():
        log(f"the native kernel is not available here ({cpu_adamw.unavailable_reason()}): torch's path only")
        paths.remove("native")
    bandwidths = host_bandwidth(args.copy_gib)
    bandwidth = max(bandwidths.values())
    log(f"host bandwidth: copy {bandwidths['copy'] / 1e9:.1f} GB/s, in place {bandwidths['in_place'] / 1e9:.1f} GB/s "
        f"on {torch.get_num_threads()} threads")
    rows = bench_host_adamw(args.params, args.repeats, bandwidth, paths)
    if not args.no_peers:
        rows += bench_peers(args.params, args.repeats, bandwidth)
    isa = torch.ops.llama_offload_cpu_adamw.isa() if "native" in paths else None
    result = {"command": " ".join(["python", "scripts/bench/bench_host_adamw.py", *(argv or sys.argv[1:])]),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "native_isa": isa, "host_bandwidth_bytes_per_s": bandwidths, "floor_bandwidth_bytes_per_s": bandwidth,
              "rows": rows}
    print(table(rows, bandwidths))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
