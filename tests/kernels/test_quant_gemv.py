"""The fused quantized GEMV (quant_gemv.py) against dequantize-then-matmul in fp32, and when QuantLinear uses it.

CI has no GPU: there the real kernel runs in Triton's interpreter (numpy, CPU tensors), in a subprocess since
TRITON_INTERPRET must be set before Triton is imported. The CUDA tests run on the GPU machine with
``python -m pytest -m cuda -s tests/test_quant_gemv.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from llama_offload.model import quant
from llama_offload.kernels import quant_gemv, quant_triton
from llama_offload.model.quant import QuantLinear, dequantize, group_weight

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
has_triton = importlib.util.find_spec("triton") is not None


def codes(rows: int, n_in: int, fmt: str, scale_dtype: torch.dtype, seed: int = 0,
          device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Random codes of ``fmt`` ("int4 g64 mins", "int8", "int8 g32"): every nibble and byte value, scales of a
    realistic size."""
    gen = torch.Generator().manual_seed(seed)
    bits = 4 if fmt.startswith("int4") else 8
    g = int(fmt.split()[1][1:]) if " g" in fmt else n_in
    if bits == 4:
        weight = torch.randint(0, 256, (rows, n_in // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    else:
        weight = torch.randint(-127, 128, (rows, n_in), generator=gen, dtype=torch.int32).to(torch.int8)
    scales = (torch.rand(rows, n_in // g, generator=gen) * 0.01 + 1e-3).to(scale_dtype)
    mins = (torch.randn(rows, n_in // g, generator=gen) * 0.05).to(scale_dtype) if "mins" in fmt else None
    move = lambda t: None if t is None else t.to(device)
    return move(weight), move(scales), move(mins)


def max_error(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor]) -> float:
    """|gemv - reference| / max |reference|, the reference in fp32 from the dequantized matrix."""
    y = quant_gemv.gemv(x, weight, scales, mins)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    want = F.linear(x.float(), dequantize(weight, scales, mins, torch.float32))  # (..., rows)
    return ((y.float() - want).abs().max() / want.abs().max()).item()


# fp16 output: rounding of the result (2^-11 relative) dominates; bf16 2^-8; fp32 only the summation order.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}

# (rows, in_features, format, scale dtype, x dtype, tokens): row tails (20, 37, 150 rows against 8-row bands),
# K tails (4160 = 16 * 256 + 64 inputs), non-power-of-two groups and every token path.
INTERPRETER_CASES = [
    (20, 4160, "int4 g64 mins", torch.float16, torch.float16, 3),
    (37, 384, "int4 g32", torch.float16, torch.float16, 1),
    (16, 512, "int4 g128 mins", torch.float32, torch.float32, 8),
    (12, 256, "int4 g128", torch.float32, torch.bfloat16, 2),
    (9, 336, "int4 g48 mins", torch.float16, torch.float16, 5),
    (17, 4160, "int8", torch.float16, torch.float16, 4),
    (21, 1088, "int8", torch.float32, torch.float32, 1),
    (10, 384, "int8 g32", torch.float16, torch.bfloat16, 7),
    (10, 336, "int8 g48 mins", torch.float16, torch.float32, 8),
    (3, 24, "int4 g6", torch.float16, torch.float16, 2),
]


def _interpreter_main() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1: each case's error, as JSON on the last line."""
    errors = []
    for i, (rows, n_in, fmt, sdt, xdt, tokens) in enumerate(INTERPRETER_CASES):
        weight, scales, mins = codes(rows, n_in, fmt, sdt, seed=i)
        x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(i)).to(xdt)
        if i == 0:  # (bs, seqlen, dim) in, (bs, seqlen, rows) out, as QuantLinear passes it
            x = x.view(1, tokens, n_in)
        errors.append(max_error(x, weight, scales, mins))
    print(json.dumps(errors))


@pytest.fixture(scope="module")
def interpreter_errors() -> list[float]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", "import test_quant_gemv as t; t._interpreter_main()"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not has_triton, reason="Triton is not installed")
@pytest.mark.parametrize("case", range(len(INTERPRETER_CASES)),
                         ids=[f"{r}x{n}-{f.replace(' ', '_')}-{str(x).split('.')[-1]}-t{t}"
                              for r, n, f, _, x, t in INTERPRETER_CASES])
def test_interpreted_kernel_equals_dequantize_then_matmul(interpreter_errors: list[float], case: int) -> None:
    xdt = INTERPRETER_CASES[case][4]
    assert interpreter_errors[case] < TOLERANCE[xdt], INTERPRETER_CASES[case]


def test_shapes_the_kernel_refuses_say_why() -> None:
    weight, scales, mins = codes(8, 64, "int4 g32 mins", torch.float16)
    assert quant_gemv.check(torch.randn(2, 64), weight, scales, mins) is None
    assert "tokens" in quant_gemv.check(torch.randn(quant_gemv.MAX_TOKENS + 1, 64), weight, scales, mins)
    assert "input features" in quant_gemv.check(torch.randn(1, 32), weight, scales, mins)
    assert "mins" in quant_gemv.check(torch.randn(1, 64), weight, scales, mins.float())
    assert "groups" in quant_gemv.check(torch.randn(1, 64), weight, scales[:, :1].repeat(1, 3), None)
    assert "x is" in quant_gemv.check(torch.randn(1, 64).double(), weight, scales, mins)
    with pytest.raises(ValueError, match="cannot multiply"):
        quant_gemv.gemv(torch.randn(1, 32), weight, scales, mins)


def linears(n: int = 3, rows: int = 16, n_in: int = 64) -> list[QuantLinear]:
    return [QuantLinear(*codes(rows, n_in, "int4 g32 mins", torch.float16, seed=i)) for i in range(n)]


def test_the_fused_path_is_for_decode_steps_on_a_gpu_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    m, gpu = linears(1)[0], torch.device("cuda")  # a device object needs no GPU: only its type is read
    monkeypatch.setattr(quant_triton, "available", lambda: True)
    monkeypatch.setattr(quant_gemv, "enabled", True)
    with torch.no_grad():
        assert m.fused_gemv(1, torch.float16, gpu) and m.fused_gemv(quant.FUSED_GEMV_MAX_TOKENS[m.bits], torch.bfloat16, gpu)
        assert not m.fused_gemv(quant.FUSED_GEMV_MAX_TOKENS[m.bits] + 1, torch.float16, gpu)  # a prefill: GEMM
        int8 = QuantLinear(*codes(16, 64, "int8", torch.float16))
        assert int8.fused_gemv(4, torch.float16, gpu) and not int8.fused_gemv(5, torch.float16, gpu)  # measured slower
        assert not m.fused_gemv(1, torch.float16, torch.device("cpu"))
        assert not m.fused_gemv(1, torch.float64, gpu)
        monkeypatch.setattr(quant_gemv, "enabled", False)  # LLAMA_OFFLOAD_FUSED_GEMV=0
        assert not m.fused_gemv(1, torch.float16, gpu)
        monkeypatch.setattr(quant_gemv, "enabled", True)
        monkeypatch.setattr(quant_triton, "available", lambda: False)  # LLAMA_OFFLOAD_TRITON=0, or no Triton
        assert not m.fused_gemv(1, torch.float16, gpu)
    monkeypatch.setattr(quant_triton, "available", lambda: True)
    with torch.enable_grad():  # training a LoRA over the codes: autograd's matmul
        assert not m.fused_gemv(1, torch.float16, gpu)


def test_groups_are_not_dequantized_when_each_linear_multiplies_its_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    group = linears(3)
    monkeypatch.setattr(quant_triton, "available", lambda: True)
    with torch.no_grad():
        assert group_weight(group, torch.float16, torch.device("cuda"), tokens=1) is None
        # on the CPU, a prefill, or without the token count: one GEMM over the matrices dequantized back to back
        assert group_weight(group, torch.float32, torch.device("cpu"), tokens=1) is not None
        assert group_weight(group, torch.float32, torch.device("cpu")) is not None


def test_the_cpu_never_takes_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kw):
        raise AssertionError("quant_gemv.gemv ran on the CPU")

    monkeypatch.setattr(quant_gemv, "gemv", refuse)
    monkeypatch.setattr(quant_triton, "available", lambda: True)
    m = linears(1)[0]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        got = m(x)
    want = F.linear(x, dequantize(m.weight, m.scales, m.mins, torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- on a GPU ----------------------------------------------------------------------------------------------

GPU_FORMATS = ["int4 g32", "int4 g32 mins", "int4 g64", "int4 g64 mins", "int4 g128", "int4 g128 mins",
               "int8", "int8 g64", "int8 g32 mins"]


@pytest.mark.parametrize("fmt", GPU_FORMATS)
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (150, 4160)])
# Two pairs, not all four: each (format, group, tokens, dtypes) compiles once, and these already compile ~200.
@pytest.mark.parametrize("xdtype,scale_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.skipif(not has_triton, reason="Triton is not installed")
def test_gpu_kernel_equals_dequantize_then_matmul(fmt: str, scale_dtype: torch.dtype, shape: tuple[int, int],
                                                  xdtype: torch.dtype) -> None:
    if shape[1] % int(fmt.split()[1][1:]) if " g" in fmt else False:
        pytest.skip("group does not divide the input features")
    weight, scales, mins = codes(*shape, fmt, scale_dtype, device="cuda")
    for tokens in range(1, 9):
        x = torch.randn(tokens, shape[1], device="cuda").to(xdtype)
        assert max_error(x, weight, scales, mins) < TOLERANCE[xdtype], (fmt, shape, tokens)


for _mark in cuda:
    test_gpu_kernel_equals_dequantize_then_matmul = _mark(test_gpu_kernel_equals_dequantize_then_matmul)


@pytest.mark.parametrize("case", range(len(INTERPRETER_CASES)))
@pytest.mark.skipif(not has_triton, reason="Triton is not installed")
def test_gpu_kernel_on_the_interpreter_cases(case: int) -> None:
    rows, n_in, fmt, sdt, xdt, tokens = INTERPRETER_CASES[case]
    weight, scales, mins = codes(rows, n_in, fmt, sdt, seed=case, device="cuda")
    x = torch.randn(tokens, n_in, device="cuda").to(xdt)
    assert max_error(x, weight, scales, mins) < TOLERANCE[xdt]


for _mark in cuda:
    test_gpu_kernel_on_the_interpreter_cases = _mark(test_gpu_kernel_on_the_interpreter_cases)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not quant_triton.available() or not quant_gemv.enabled,
                    reason="needs a CUDA GPU, Triton and LLAMA_OFFLOAD_FUSED_GEMV unset")
def test_gpu_quant_linear_uses_the_kernel_at_decode_and_replays_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    m = QuantLinear(*codes(4096, 4096, "int4 g64 mins", torch.float16, device="cuda"))
    calls = []
    real = quant_gemv.gemv
    monkeypatch.setattr(quant_gemv, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.inference_mode():
        x = torch.randn(1, 4, 4096, device="cuda", dtype=torch.float16)
        y = m(x)
        assert len(calls) == 1 and y.shape == (1, 4, 4096)
        m(torch.randn(1, quant.FUSED_GEMV_MAX_TOKENS[m.bits] + 1, 4096, device="cuda", dtype=torch.float16))
        assert len(calls) == 1  # a prefill: dequantize, then cuBLAS
        graph = torch.cuda.CUDAGraph()  # the first call compiled the kernel; a capture only launches it
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                out = m(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y)  # no split-K: the same sums in the same order
