"""Decode-step products of one block's seven matrices on the GPU: the fused quantized GEMV (quant_gemv.py)
against dequantize-then-F.linear (what QuantLinear ran before it) and against 16-bit F.linear, for int4 g64 with
mins and int8 per channel, at a few token counts. Prints ms per block and the GB/s of weight bytes read (codes,
scales and mins; 2 bytes a weight for 16-bit).

Each block pass is replayed from a CUDA graph, as decode steps run in this project, so launch overheads do not
hide the kernels' own time; ``--eager`` times plain launches instead.

Usage (on a CUDA machine; 7B shapes by default)::

    python scripts/bench/bench_quant_gemv.py
    python scripts/bench/bench_quant_gemv.py --tokens 1,8 --sweep     # also try other tiles for the fused kernel
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from llama_offload.model import quant
from llama_offload.kernels import quant_gemv, quant_triton
from llama_offload.model.quant import QuantLinear

DEVICE = "cuda"
# (block_rows, block_bytes, num_warps) tried by --sweep; the first is quant_gemv's default.
SWEEP = [(8, 256, 4), (4, 256, 4), (16, 256, 4), (8, 512, 4), (4, 512, 4), (16, 128, 4), (8, 256, 2), (16, 512, 8)]


def block_shapes(dim: int, hidden: int) -> list[tuple[int, int]]:
    """(out, in) of wq, wk, wv, wo, w1, w2, w3."""
    return [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim)]


def make_linears(shapes: list[tuple[int, int]], fmt: str) -> list[QuantLinear]:
    """Random weights quantized on the GPU, as --quantize does: realistic codes, scales and mins."""
    out = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols, device=DEVICE) * 0.02
        q = quant.quantize_matrix(w, 4, 64, device=DEVICE) if fmt == "int4 g64" else quant.quantize_matrix(w, 8, None, device=DEVICE)
        out.append(QuantLinear(q["weight"].to(DEVICE), q["scales"].to(DEVICE), q["mins"].to(DEVICE) if "mins" in q else None))
    return out


def time_ms(fn: Callable[[], None], reps: int, eager: bool) -> float:
    """Milliseconds per call of ``fn``: CUDA events around ``reps`` calls (replayed from one graph unless eager),
    after a warm-up that also compiles every kernel."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = fn
    if not eager:
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(10):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        run, reps = graph.replay, max(1, reps // 10)
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * (1 if eager else 10))


def nbytes(m: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (m.weight, m.scales, m.mins) if t is not None)


def bench(dim: int, hidden: int, tokens: list[int], reps: int, eager: bool, sweep: bool) -> None:
    shapes = block_shapes(dim, hidden)
    dense = [torch.randn(r, c, device=DEVICE, dtype=torch.float16) * 0.02 for r, c in shapes]
    dense_bytes = sum(w.numel() * 2 for w in dense)
    formats = {fmt: make_linears(shapes, fmt) for fmt in ("int4 g64", "int8")}
    print(f"{torch.cuda.get_device_name()}, block {dim}x{hidden}, {'eager launches' if eager else 'CUDA graph replay'}, "
          f"fp16 activations")
    print(f"{'weights':<18} {'tokens':>6} {'path':<26} {'ms/block':>9} {'GB/s':>7}")
    for t in tokens:
        x = {c: torch.randn(t, c, device=DEVICE, dtype=torch.float16) for c in {dim, hidden}}

        def report(name: str, path: str, ms: float, bytes_read: int) -> None:
            print(f"{name:<18} {t:>6} {path:<26} {ms:>9.4f} {bytes_read / ms / 1e6:>7.0f}")

        with torch.inference_mode():
            report("fp16", "F.linear", time_ms(lambda: [F.linear(x[w.shape[1]], w) for w in dense], reps, eager), dense_bytes)
            for fmt, lins in formats.items():
                name = "int4 g64 mins" if fmt == "int4 g64" else "int8 per channel"
                code_bytes = sum(nbytes(m) for m in lins)
                configs = SWEEP if sweep else SWEEP[:1]
                for rows, block, warps in configs:
                    fused = lambda: [quant_gemv.gemv(x[m.in_features], m.weight, m.scales, m.mins, block_rows=rows,
                                                     block_bytes=block, num_warps=warps) for m in lins]
                    label = "fused gemv" + (f" {rows}x{block}B w{warps}" if sweep else "")
                    report(name, label, time_ms(fused, reps, eager), code_bytes)
                quant_gemv.enabled = False  # QuantLinear's other path: dequantize into the scratch, then cuBLAS
                try:
                    report(name, "dequantize + F.linear", time_ms(lambda: [m(x[m.in_features]) for m in lins], reps, eager),
                           code_bytes)
                finally:
                    quant_gemv.enabled = True


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in str(text).split(",")]
    except ValueError:
        tokens = []
    if not tokens or any(not 1 <= t <= quant_gemv.MAX_TOKENS for t in tokens):
        raise SystemExit(f"--tokens must be integers in 1..{quant_gemv.MAX_TOKENS} separated by commas, found {text!r}.")
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=11008)
    ap.add_argument("--tokens", default="1,2,4,8", help="comma-separated token counts (default 1,2,4,8)")
    ap.add_argument("--reps", type=int, default=200, help="block passes timed per row (default 200)")
    ap.add_argument("--eager", action="store_true", help="time plain launches, not CUDA graph replays")
    ap.add_argument("--sweep", action="store_true", help="also time other tiles of the fused kernel")
    args = ap.parse_args()
    tokens = parse_tokens(args.tokens)
    if not torch.cuda.is_available():
        print("bench_quant_gemv: no CUDA GPU here; nothing to time (run it on the GPU machine).")
        return
    if not quant_triton.available():
        print("bench_quant_gemv: Triton is not installed (or LLAMA_OFFLOAD_TRITON=0); the fused kernel needs it.")
        return
    bench(args.dim, args.hidden, tokens, args.reps, args.eager, args.sweep)


if __name__ == "__main__":
    main()
