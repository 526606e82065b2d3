"""The CPU lane's matrix kernels on the seven matrices of one block: torch's ``F.linear``, oneDNN's prepacked
linear and llama_offload's own (llama_offload/kernels/cpu.py), for 16-bit weights and int8/int4 codes (against int16 or fp32
activations), ms per block and the weight bytes read per second.

Usage (on the machine whose CPU lane you want to know; 7B shape, every core but one)::

    python scripts/bench/bench_cpu_kernels.py
    python scripts/bench/bench_cpu_kernels.py --dim 8192 --hidden 28672 --threads 31 --tokens 1,4,8
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llama_offload.kernels.cpu import gemv_available, gemv_isa, gemv_linear, gemv_quant, gemv_unavailable_reason
from llama_offload.offload.lanes import cpu_threads_for
from llama_offload.model.quant import quantize_matrix


def block_shapes(dim: int, hidden: int) -> list[tuple[int, int]]:
    """(out, in) of wq, wk, wv, wo, w1, w2, w3 (multi-head attention)."""
    return [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim)]


def time_ms(fns: list[Callable[[], torch.Tensor]], budget_s: float = 1.0) -> float:
    """The median of repeated passes over ``fns``, after a warm-up pass."""
    for f in fns:
        f()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t = time.perf_counter()
        for f in fns:
            f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def _onednn_packed(ws: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """oneDNN's prepacked copies of ``ws``, or None where oneDNN cannot pack them on this CPU (its fp16 path needs
    AVX-NE-CONVERT or AVX512-FP16): that row is then left out."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    except RuntimeError:
        return None


def rows(dim: int, hidden: int, tokens: list[int], budget_s: float) -> list[tuple[str, int, str, float, float]]:
    """(weights, tokens, kernel, ms per block, GB/s of weights) for every kernel that applies."""
    shapes = block_shapes(dim, hidden)
    native = gemv_available()
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        ws = [(torch.randn(s) * 0.02).to(dtype) for s in shapes]
        gb = sum(w.numel() * w.element_size() for w in ws) / 1e9
        packed = _onednn_packed(ws)
        for t in tokens:
            xs = [torch.randn(t, w.shape[1]).to(dtype) for w in ws]
            kernels = {"torch F.linear": [lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)]}
            if packed is not None:
                kernels["oneDNN prepacked"] = [lambda w=w, x=x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                               for w, x in zip(packed, xs)]
            if native:
                kernels["llama_offload gemv"] = [lambda w=w, x=x: gemv_linear(x, w) for w, x in zip(ws, xs)]
            for name, fns in kernels.items():
                ms = time_ms(fns, budget_s)
                out.append((str(dtype).replace("torch.", ""), t, name, ms, gb / ms * 1e3))
    if native:
        for bits, group in ((4, 64), (4, 32), (8, None)):
            qs = [quantize_matrix(torch.randn(s) * 0.02, bits, group) for s in shapes]
            gb = sum(v.numel() * v.element_size() for q in qs for v in q.values()) / 1e9
            label = f"int{bits}" + (f" g{group}" if group else " per channel")
            for t in tokens:
                xs = [torch.randn(t, s[1]).half() for s in shapes]
                # x rounded to int16 for integer dot products (the CPU lane's), or fp32 with the codes converted.
                for name, int16_x in (("llama_offload gemv, int16 x", True), ("llama_offload gemv, fp32 x", False)):
                    fns = [lambda q=q, x=x, i=int16_x: gemv_quant(x, q["weight"], q["scales"], q.get("mins"), i)
                           for q, x in zip(qs, xs)]
                    ms = time_ms(fns, budget_s)
                    out.append((label, t, name, ms, gb / ms * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=11008, help="the feed-forward's hidden size")
    ap.add_argument("--threads", type=int, default=None, help="default: every core but one, as the CPU lane")
    ap.add_argument("--tokens", default="1,4", help="tokens per step, comma-separated")
    ap.add_argument("--budget_s", type=float, default=1.0, help="seconds of timing per row")
    a = ap.parse_args()
    try:
        threads = cpu_threads_for(a.threads)
    except ValueError as e:
        raise SystemExit(f"bench_cpu_kernels: {str(e).replace('--cpu_threads', '--threads')}")
    tokens = [t.strip() for t in str(a.tokens).split(",") if t.strip()]
    if not tokens or not all(t.isdigit() and int(t) > 0 for t in tokens):
        raise SystemExit(f"bench_cpu_kernels: --tokens must be positive integers separated by commas, found {a.tokens!r}.")
    tokens = [int(t) for t in tokens]
    torch.set_num_threads(threads)
    print(f"{a.dim} x {a.hidden} block, {threads} threads, native kernels: {gemv_isa() or f'not available: {gemv_unavailable_reason()}'}\n")
    print("| weights | tokens | kernel | ms per block | GB/s of weights |\n|---|---|---|---|---|")
    for weights, t, name, ms, gbps in rows(a.dim, a.hidden, tokens, a.budget_s):
        print(f"| {weights} | {t} | {name} | {ms:.2f} | {gbps:.0f} |")


if __name__ == "__main__":
    main()
