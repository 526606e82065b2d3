"""A run without a GPU multiplies its matrices with the kernel measured fastest on this machine (lanes.choose_host_kernel):
the choice is the fastest candidate, cached per machine and format, planned before loading and carried out by
offload() (the "gemv" kernel's fused blocks against the dequantized model: tests/test_cpu_block.py); the native
sources a run loads are built side by side.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_offload.offload import lanes
from llama_offload.model.args import ModelArgs
from llama_offload.kernels.cpu import gemv_available
from llama_offload.offload.plan import HostKernel
from llama_offload.generate.run_plan import plan_run
from llama_offload.model.quant import QuantLinear, QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.generate.run_options import RunOptions

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
MAX_SEQ, MAX_BATCH = 32, 2
needs_gemv = pytest.mark.skipif(not gemv_available(verbose=False), reason="the native CPU kernels do not build here")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path))
    return tmp_path / "lanes.json"


@pytest.fixture(scope="module")
def q4_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # int4 in groups of 32 with minimums: the layout of GGUF's Q4_1, the default model's blocks.
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-q4", QuantSpec(4, 32))


def fake_times(monkeypatch: pytest.MonkeyPatch, ms: dict[str, float]) -> list[str]:
    """Make measure_cpu_block report ``ms`` for whichever kernel the block's matrices were set to."""
    timed: list[str] = []

    def measure(block: torch.nn.Module, threads: int, token_counts: tuple[int, ...] = (1,), **_: object):
        kernel = next(m.cpu_kernel for m in block.modules() if isinstance(m, QuantLinear))
        timed.append(kernel)
        return tuple((t, ms[kernel]) for t in token_counts)

    monkeypatch.setattr(lanes, "measure_cpu_block", measure)
    return timed


def test_a_float32_model_has_one_kernel_and_nothing_to_choose(cache: Path) -> None:
    assert lanes.choose_host_kernel(ARGS, torch.float32) is None
    assert not cache.exists()


@needs_gemv
@pytest.mark.parametrize("ms, fastest", [({"dequantize": 5.0, "torch": 3.0, "gemv": 1.0}, "gemv"),
                                         ({"dequantize": 5.0, "torch": 0.5, "gemv": 1.0}, "torch")])
def test_the_fastest_kernel_is_chosen_then_read_from_the_cache(monkeypatch: pytest.MonkeyPatch, cache: Path,
                                                               ms: dict[str, float], fastest: str) -> None:
    timed = fake_times(monkeypatch, ms)
    choice = lanes.choose_host_kernel(ARGS, torch.float32, spec=QuantSpec(4, 32), threads=2, verbose=False)
    assert choice is not None and choice.kernel == fastest
    assert sorted(timed) == ["dequantize", "gemv", "torch"]
    assert dict(choice.block_ms) == ms and choice.threads == 2
    assert choice.describe().startswith(f"{fastest}: {ms[fastest]:.2f} ms a block at 1 token on 2 threads")
    # Once measured, the machine's choice is read back without timing anything.
    monkeypatch.setattr(lanes, "measure_cpu_block", lambda *a, **k: pytest.fail("measured again"))
    assert lanes.choose_host_kernel(ARGS, torch.float32, spec=QuantSpec(4, 32), threads=2) == choice
    # Another format is another entry.
    fake_times(monkeypatch, {"dequantize": 1.0, "torch": 3.0, "gemv": 2.0})
    assert lanes.choose_host_kernel(ARGS, torch.float32, spec=QuantSpec(8), threads=2).kernel == "dequantize"


@needs_gemv
def test_a_stored_format_is_timed_in_its_own_layout(q4_ckpt: Path) -> None:
    from llama_offload.checkpoint.record import open_shard

    stored = lanes.stored_block_format(open_shard(q4_ckpt / "consolidated.00.pth"))
    assert stored is not None and set(stored) == set(lanes.LINEAR_NAMES)
    block = lanes.host_block(ARGS, torch.float32, stored=stored)
    for name, t in stored.items():
        m = block.get_submodule(name)
        assert isinstance(m, QuantLinear)
        assert (tuple(m.weight.shape), m.weight.dtype) == t["weight"]
        assert (tuple(m.scales.shape), m.scales.dtype) == t["scales"]
        assert m.mins is not None and (tuple(m.mins.shape), m.mins.dtype) == t["mins"]


@needs_gemv
def test_a_cpu_run_multiplies_with_the_planned_kernel(monkeypatch: pytest.MonkeyPatch, cache: Path, q4_ckpt: Path,
                                                       tiny_ckpt: Path) -> None:
    from llama_offload.generate.generation import Llama

    fake_times(monkeypatch, {"dequantize": 5.0, "torch": 3.0, "gemv": 1.0})
    tok = tiny_ckpt.parent / "tokenizer.model"
    options = RunOptions.from_flags(dict(max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, device="cpu"))
    planned = plan_run(q4_ckpt, tok, options).offload.host_kernel
    assert isinstance(planned, HostKernel) and planned.kernel == "gemv"
    assert "CPU kernel" in plan_run(q4_ckpt, tok, options).describe()
    llama = Llama.build(q4_ckpt, tok, MAX_SEQ, MAX_BATCH, device="cpu")
    kernels = {m.cpu_kernel for m in llama.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"gemv"}
    # An unquantized float32 checkpoint keeps torch's kernels: nothing is planned.
    assert plan_run(tiny_ckpt, tok, options).offload.host_kernel is None


def test_missing_libraries_are_built_side_by_side_and_a_failure_is_remembered(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path) -> None:
    import threading

    from llama_offload.kernels import native_build

    if native_build._compiler() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "_loaded", {})
    started, both = [], threading.Barrier(2, timeout=10)

    def build(source: Path, target: Path, cxx: str) -> str | None:
        started.append(source.stem)
        both.wait()  # returns only once the other build runs too: they run side by side
        if source.stem == "cpu_attention":
            return "an error"
        target.write_bytes(b"")
        return None

    monkeypatch.setattr(native_build, "_build", build)
    native_build.build_together(["cpu_gemv", "cpu_attention"], verbose=False)
    assert sorted(started) == ["cpu_attention", "cpu_gemv"]
    assert native_build._loaded == {"cpu_attention": "the build failed: an error"}
    assert native_build.load("cpu_attention", verbose=False) == "the build failed: an error"
    native_build.build_together(["cpu_gemv"], verbose=False)  # built already: nothing to do
    assert len(started) == 2


@needs_gemv
def test_a_kernel_that_fails_here_is_left_out(monkeypatch: pytest.MonkeyPatch, cache: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    timed = fake_times(monkeypatch, {"dequantize": 5.0, "torch": 0.5, "gemv": 1.0})
    fake = lanes.measure_cpu_block

    def measure(block: torch.nn.Module, threads: int, **kw: object):
        if next(m.cpu_kernel for m in block.modules() if isinstance(m, QuantLinear)) == "torch":
            raise RuntimeError("_weight_int4pack_mm_for_cpu: not in this torch")
        return fake(block, threads, **kw)

    monkeypatch.setattr(lanes, "measure_cpu_block", measure)
    choice = lanes.choose_host_kernel(ARGS, torch.float32, spec=QuantSpec(4, 32), threads=2)
    assert choice is not None and choice.kernel == "gemv" and [k for k, _ in choice.block_ms] == ["dequantize", "gemv"]
    assert "the torch CPU kernel does not run here (_weight_int4pack_mm_for_cpu: not in this torch)" in capsys.readouterr().err
    assert timed == ["dequantize", "gemv"]
    # The kernel left out is remembered with the others' times: the next run reads the choice back.
    monkeypatch.setattr(lanes, "measure_cpu_block", lambda *a, **k: pytest.fail("measured again"))
    assert lanes.choose_host_kernel(ARGS, torch.float32, spec=QuantSpec(4, 32), threads=2) == choice
