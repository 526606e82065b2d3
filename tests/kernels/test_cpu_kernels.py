"""The CPU lane's native kernels (kernels/csrc/cpu_gemv.cpp via kernels/native_build.py and kernels/cpu.py): equal to torch's
products within fp32 rounding (and, for quantized weights against int16 activations, within the bound that
rounding x to int16 per group allows), for every weight format, token count and shape tail; how they plug into
the modules; and the build's failures, which fall back to torch's kernels without an error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_offload.kernels import cpu as cpu_kernels, native_build
from llama_offload.model.cpu_linear import CpuLinear, set_cpu_kernel
from llama_offload.kernels.cpu import gemv_linear, gemv_quant, kernels_for
from llama_offload.model.quant import QuantLinear, dequantize, group_weight, quantize_int4, quantize_int8

needs_gemv = pytest.mark.skipif(not cpu_kernels.gemv_available(verbose=False),
                                reason="no C++ compiler here for the native kernels")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.double())  # (..., out)


def int16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most rounding x to int16 can move x @ w^T: each element moves at most half a step of its group's
    max|x| / 32767, which is at most its row's max|x| / 65534. (..., out)."""
    return x.double().abs().amax(-1, keepdim=True) / 65534 * w.double().abs().sum(-1)


def assert_quant_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, int16_x: bool) -> None:
    """y = x @ w^T within fp32 sums, plus the int16 rounding of a 16-bit x (int16_x) and the rounding of the
    result to y's dtype (the kernel returns x's dtype)."""
    want = reference(x, w)
    allowed = 1e-5 * want.abs().max().item() + want.abs() * {torch.float16: 2 ** -11, torch.float32: 1e-5}[y.dtype]
    if int16_x and x.dtype != torch.float32:
        allowed = allowed + int16_bound(x, w)
    err = (y.double() - want).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item():.3e}"


@needs_gemv
@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_16_bit_gemv_equals_the_product(wdtype: torch.dtype, xdtype: torch.dtype, tokens: int) -> None:
    torch.manual_seed(tokens)
    # 37 rows: the bands of 4 rows and a remainder; 200 inputs: full vectors and a tail of each width.
    w = (torch.randn(37, 200) * 0.05).to(wdtype)
    x = torch.randn(2, tokens, 200).to(xdtype)
    y = gemv_linear(x, w)
    assert y.shape == (2, tokens, 37) and y.dtype == xdtype
    want = reference(x, w)
    # fp32 accumulation, rounded once to x's dtype
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[xdtype]
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())


@needs_gemv
@pytest.mark.parametrize("fmt", ["int8", "int8 g16", "int8 g32 mins", "int8 g48", "int4 g32", "int4 g64 mins", "int4 g128",
                                 "int4 g48 mins", "int4 g8"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 4, 6])
@pytest.mark.parametrize("int16_x", [True, False])
def test_quantized_gemv_equals_dequantize_then_matmul(fmt: str, scale_dtype: torch.dtype, tokens: int,
                                                       int16_x: bool) -> None:
    torch.manual_seed(tokens)
    bits = 4 if fmt.startswith("int4") else 8
    group = int(fmt.split()[1][1:]) if " g" in fmt else None
    n_in = 384 if group in (None, 16, 32, 64, 128, 8) else 336  # g48: groups whose vectors leave a tail
    rows = 150  # over two 64-row bands, 4 rows at a time with 2 left: every row path of the kernel
    w = torch.randn(rows, n_in) * 0.02
    if bits == 4:
        q = quantize_int4(w, group)
        codes, scales, mins = q["weight"], q["scales"], q["mins"]
    else:
        q = quantize_int8(w.reshape(-1, group) if group else w)  # per group: quantize rows of one group each
        codes, scales = q["weight"].reshape(rows, n_in), q["scales"].reshape(rows, -1)
        mins = None
    if "mins" not in fmt:
        mins = None
    scales = scales.to(scale_dtype)
    mins = None if mins is None else (mins.to(scale_dtype) if bits == 4 else torch.randn_like(scales) * 1e-3)
    x = torch.randn(3, tokens, n_in).half()  # a fp16 model's activations: what the integer path takes
    x[1, 0, 5] = 300.0  # an outlier: its group's other elements round to coarser steps
    y = gemv_quant(x, codes, scales, mins, int16_x)
    assert y.shape == (3, tokens, rows)
    assert_quant_close(y, x, dequantize(codes, scales, mins, torch.float32), int16_x)
    # A fp32 model's x multiplies in fp32 whatever int16_x says.
    y32 = gemv_quant(x.float(), codes, scales, mins, int16_x)
    assert y32.dtype == torch.float32 and torch.equal(y32, gemv_quant(x.float(), codes, scales, mins, False))


@needs_gemv
@pytest.mark.parametrize("fmt", ["int4 g64", "int8"])
def test_int16_activations_stay_within_fp16_rounding_of_the_result(fmt: str) -> None:
    """A fp16 x through the integer path and through the fp32 one: both results rounded to fp16 differ by less
    than one fp16 step of the largest result, the rounding the model on the GPU gives every product."""
    torch.manual_seed(1)
    w = torch.randn(256, 1024) * 0.02
    q = quantize_int4(w, 64) if fmt == "int4 g64" else quantize_int8(w)
    x = torch.randn(4, 1024).half()
    y16 = gemv_quant(x, q["weight"], q["scales"], q.get("mins"))
    y32 = gemv_quant(x, q["weight"], q["scales"], q.get("mins"), int16_x=False)
    assert y16.dtype == y32.dtype == torch.float16 and not torch.equal(y16, y32)  # the paths differ, slightly
    assert (y16.float() - y32.float()).abs().max().item() <= 2 ** -10 * y32.abs().max().item()


@needs_gemv
def test_int16_activations_give_way_to_fp32_where_x_is_not_finite() -> None:
    torch.manual_seed(2)
    q = quantize_int4(torch.randn(64, 256) * 0.02, 64)
    x = torch.randn(3, 256).half()
    x[0, 3], x[2, 100] = float("inf"), float("nan")
    y = gemv_quant(x, q["weight"], q["scales"], q["mins"])
    torch.testing.assert_close(y, gemv_quant(x, q["weight"], q["scales"], q["mins"], int16_x=False), equal_nan=True)
    assert not y[0].isfinite().all() and y[2].isnan().all() and y[1].isfinite().all()


@needs_gemv
def test_bad_operands_are_refused_before_the_kernel() -> None:
    """As ValueErrors from the wrappers: an exception thrown inside the native operator can crash the process
    where torch and the kernels were built by different compilers (kernels/cpu.py)."""
    w = torch.randn(8, 64).half()
    with pytest.raises(ValueError, match="input features"):
        gemv_linear(torch.randn(1, 32), w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gemv_linear(torch.randn(1, 64), w.float())
    with pytest.raises(ValueError, match="groups divide"):
        gemv_quant(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 5), None)
    with pytest.raises(ValueError, match="even groups"):
        gemv_quant(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 64), None)
    with pytest.raises(ValueError, match="mins must match"):
        gemv_quant(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2), torch.ones(8, 4))
    with pytest.raises(ValueError, match="input features"):
        gemv_quant(torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2), None)


def test_set_cpu_kernel_wraps_linears_over_the_same_weights() -> None:
    block = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 4, bias=True))
    weight = block[0].weight
    set_cpu_kernel(block, "gemv")
    assert type(block[0]) is CpuLinear and block[0].weight is weight and block[0].cpu_kernel == "gemv"
    assert type(block[1]) is nn.Linear  # a bias: left alone
    set_cpu_kernel(block, "dequantize")  # a quantized-only kernel: 16-bit matrices use torch's
    assert block[0].cpu_kernel == "torch"
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        set_cpu_kernel(block, "fast")


def test_a_cached_native_kernel_that_no_longer_builds_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize_int4(torch.randn(8, 64) * 0.02, 32)
    block = nn.Sequential(nn.Linear(16, 8, bias=False), QuantLinear(q["weight"], q["scales"], q["mins"]))
    monkeypatch.setattr(cpu_kernels, "gemv_available", lambda verbose=True: False)
    set_cpu_kernel(block, "gemv")
    assert block[0].cpu_kernel == "torch" and block[1].cpu_kernel == "dequantize"


def test_cpu_linear_is_a_plain_linear_where_the_kernel_does_not_apply() -> None:
    lin = CpuLinear.wrap(nn.Linear(16, 8, bias=False))
    lin.cpu_kernel = "gemv"
    x = torch.randn(2, 16)
    # fp32 weights are not the native kernel's: torch's product, bit for bit
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    lin16 = CpuLinear.wrap(nn.Linear(16, 8, bias=False).to(torch.bfloat16))
    lin16.cpu_kernel = "gemv"
    x16 = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.enable_grad():  # training: autograd's product, which the native kernel is not
        y = lin16(x16)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x16, lin16.weight))


@needs_gemv
def test_quantized_groups_are_not_dequantized_on_the_cpu_lane() -> None:
    qs = [quantize_int4(torch.randn(32, 64) * 0.02, 32) for _ in range(3)]
    linears = [QuantLinear(q["weight"], q["scales"], q["mins"]) for q in qs]
    x = torch.randn(1, 64)
    with torch.inference_mode():
        assert group_weight(linears, x.dtype, x.device) is not None  # the default: dequantize, one GEMM
        for m in linears:
            m.cpu_kernel = "gemv"
        assert group_weight(linears, x.dtype, x.device) is None
        got = linears[0](x)
    assert_quant_close(got, x, dequantize(qs[0]["weight"], qs[0]["scales"], qs[0]["mins"], torch.float32), True)


def test_candidates_follow_the_dtype_and_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "gemv_available", lambda verbose=True: True)
    assert kernels_for(torch.float16, quantized=False) == ("torch", "gemv")
    assert kernels_for(torch.float32, quantized=False) == ("torch",)  # the native kernel reads 16-bit weights
    assert kernels_for(torch.float32, quantized=True) == ("dequantize", "torch", "gemv")
    monkeypatch.setattr(cpu_kernels, "gemv_available", lambda verbose=True: False)
    assert kernels_for(torch.bfloat16, quantized=False) == ("torch",)
    assert kernels_for(torch.bfloat16, quantized=True) == ("dequantize", "torch")


# --- the build --------------------------------------------------------------------------------------------


def test_the_build_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native_build, "_said", set())
    monkeypatch.setenv("LLAMA_OFFLOAD_NATIVE", "0")
    assert native_build.load("cpu_gemv", verbose=False) == "LLAMA_OFFLOAD_NATIVE=0"  # a quiet first call
    assert capsys.readouterr().err == ""
    assert native_build.load("cpu_gemv") == "LLAMA_OFFLOAD_NATIVE=0"
    assert "torch's kernels" in capsys.readouterr().err
    assert native_build.load("cpu_gemv") == "LLAMA_OFFLOAD_NATIVE=0"  # remembered: said once
    assert capsys.readouterr().err == ""


def test_no_compiler_is_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native_build, "_compiler", lambda: None)
    assert "no C++ compiler" in native_build.load("cpu_gemv", verbose=False)


def test_a_failed_build_is_a_reason_and_leaves_no_library(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    if native_build._compiler() is None:
        pytest.skip("no C++ compiler here")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native_build, "CSRC", csrc)
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path / "cache"))
    why = native_build.load("broken", verbose=False)
    assert why is not None and why.startswith("the build failed")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library


@needs_gemv
def test_the_library_is_cached_per_machine(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A second process (here: a cleared in-process record) finds the library built and does not build it. The
    "build" copies the library this process loaded (a real compile is the other tests' business, and takes 15 s)."""
    import shutil

    assert cpu_kernels.gemv_available(verbose=False)
    prebuilt = next(p for p in torch.ops.loaded_libraries if "cpu_gemv-" in p)
    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "_loaded", {})
    calls = []

    def build(source, target, cxx):  # native_build._build's contract: None on success
        calls.append(source)
        shutil.copy(prebuilt, target)

    monkeypatch.setattr(native_build, "_build", build)
    assert native_build.load("cpu_gemv", verbose=False) is None
    built = list((tmp_path / "kernels").glob("cpu_gemv-*.so"))
    assert len(built) == 1 and len(calls) == 1
    monkeypatch.setattr(native_build, "_loaded", {})
    assert native_build.load("cpu_gemv", verbose=False) is None
    assert len(calls) == 1


_CHECK_BUILD = """
import sys, torch, torch.nn.functional as F
from llama_offload.kernels.cpu import gemv_isa, gemv_linear, gemv_quant
from llama_offload.model.quant import dequantize, quantize_int4, quantize_int8
assert gemv_isa() == sys.argv[1], (gemv_isa(), sys.argv[1])
torch.manual_seed(0)
for tokens in (1, 3, 6):
    x = torch.randn(tokens, 200)
    for dtype in (torch.float16, torch.bfloat16):
        w = (torch.randn(37, 200) * 0.05).to(dtype)
        want = F.linear(x.double(), w.double())
        torch.testing.assert_close(gemv_linear(x, w).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for q, mins in ((quantize_int4(torch.randn(150, 200) * 0.02, 40), True), (quantize_int8(torch.randn(150, 200)), False)):
        m = q.get("mins") if mins else None
        want = F.linear(x.double(), dequantize(q["weight"], q["scales"], m, torch.float64))
        got = gemv_quant(x, q["weight"], q["scales"], m).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # Groups the integer path takes (int16 x): within the bound rounding x to int16 allows.
    x = torch.randn(tokens, 256).half()  # a 16-bit x: the integer path
    for q in (quantize_int4(torch.randn(150, 256) * 0.02, 64), quantize_int8(torch.randn(150, 256) * 0.02)):
        w = dequantize(q["weight"], q["scales"], q.get("mins"), torch.float64)
        want = F.linear(x.double(), w)
        bound = x.double().abs().amax(-1, keepdim=True) / 65534 * w.abs().sum(-1)
        err = (gemv_quant(x, q["weight"], q["scales"], q.get("mins")).double() - want).abs()
        assert bool((err <= bound + 1e-5 * want.abs().max() + 2 ** -11 * want.abs()).all()), err.max()
print("ok")
"""


@pytest.mark.parametrize("flags,isa", [("-mno-avx512f", "avx2"), ("-mno-avx512f -mno-avx2 -mno-fma", "scalar")])
def test_the_avx2_and_plain_builds_equal_the_product(flags: str, isa: str, isa_builds) -> None:
    """The same source built for CPUs without AVX-512 (and without AVX2), in a process of its own (a process
    registers the operators once), against float64 products. The process (conftest.isa_builds, built with
    ``flags``) also runs test_cpu_attention's check, and runs beside the other instruction set's."""
    import platform

    from conftest import ISA_FLAGS

    assert ISA_FLAGS[isa] == flags
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    if isa == "avx2" and " avx2" not in native_build._cpu_flags():
        pytest.skip("this CPU cannot run the AVX2 build")
    if native_build._compiler() is None:
        pytest.skip("no C++ compiler here")
    done = isa_builds(isa, "cpu_gemv")
    assert done["error"] is None and done["stdout"].strip() == "ok", done
