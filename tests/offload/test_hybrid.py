"""The CPU lane (hybrid.py, lanes.py, the plan's split), on the CPU: the planner, the split schedule with both
lanes on the CPU against the plain model, and the KV-cache hand-over from a GPU-style prefill to CPU decode."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llama_offload.offload import lanes as lanes_mod
from llama_offload.model.cpu_linear import CpuLinear
from llama_offload.kernels.cpu import gemv_available
from llama_offload.offload.hybrid import HybridOffloadModel
from llama_offload.offload.lanes import (
    calibrate, check_cpu_lane_cores, cpu_threads_for, lanes_for_run, measure_cpu_block, random_block,
)
from llama_offload.offload.offloaded import OffloadedTransformer
from llama_offload.offload.packing import PackedBlock, StepContext
from llama_offload.offload.plan import LaneTimes, OffloadPlan, plan_host, plan_offload, spread
from llama_offload.generate.run_options import RunOptions
from llama_offload.generate.speculative import kv_caches, zero_positions
from llama_offload.model.step import make_step

from tiny import tiny_args, tiny_model

SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)


def lanes(page_ms: float, cpu_ms: dict[int, float], block_bytes: int) -> LaneTimes:
    """Lanes whose copy of a ``block_bytes`` block takes ``page_ms``."""
    return LaneTimes(block_bytes / page_ms / 1e6, tuple(sorted(cpu_ms.items())), threads=4, crossing_ms=0.0)


# --- the planner ------------------------------------------------------------------------------------------


def test_spread_is_even_and_ends_on_the_cpu() -> None:
    assert spread(4, 2) == [False, True, False, True]
    assert spread(5, 0) == [False] * 5 and spread(3, 3) == [True] * 3
    for n in range(1, 12):
        for k in range(1, n + 1):
            marks = spread(n, k)
            assert sum(marks) == k and marks[-1]
            runs = [i for i, m in enumerate(marks) if not m]
            assert all(b - a <= -(-n // max(n - k, 1)) + 1 for a, b in zip(runs, runs[1:]))  # no long CPU stretches


def test_the_split_balances_the_lanes() -> None:
    args = tiny_args(**SEVEN_B)
    paged = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256)
    b = paged.block_bytes
    # CPU as fast as PCIe: half the blocks each, and the step takes half the all-paged time.
    even = lanes(7.0, {1: 7.0, 4: 7.5, 16: 20.0}, b)
    plan = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=None, lanes=even)
    assert plan.cpu_blocks == 16 and plan.paged_layers == 16 and plan.num_slices == 32
    assert plan.expected_decode_ms() == pytest.approx(16 * 7.0)
    assert plan.streamed_bytes == 16 * b
    assert plan.placement()[-1] == "cpu" and plan.placement().count("cpu") == 16
    # 16 tokens take 16 x 20 ms on the CPU > 32 x 7 ms streamed: such steps go all-GPU; 4 tokens do not.
    assert plan.max_cpu_tokens == 4
    # A CPU three times slower gets a quarter of the blocks; one far slower gets none.
    slow = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=None,
                        lanes=lanes(7.0, {1: 21.0}, b))
    assert slow.cpu_blocks == 8
    none = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=None,
                        lanes=lanes(7.0, {1: 1000.0}, b))
    assert none.cpu_blocks == 0 and none.num_slices == 32
    # The budget's resident blocks come first; the split is of the rest.
    budget = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, gpu_memory_gb=8, cpu_blocks=None,
                          lanes=even)
    assert budget.resident_layers > 0
    assert budget.cpu_blocks + budget.paged_layers == 32 - budget.resident_layers
    assert abs(budget.cpu_blocks - budget.paged_layers) <= 1
    assert "expected decode" in budget.describe() and "CPU lane" in budget.describe()


def test_the_host_thread_drives_both_lanes() -> None:
    """The paged blocks' launches are host time spent between CPU blocks: they take CPU blocks off the split."""
    from dataclasses import replace

    args = tiny_args(**SEVEN_B)
    b = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256).block_bytes
    even = replace(lanes(7.0, {1: 7.0, 8: 12.0}, b), gpu_block_ms=1.0)
    # c CPU blocks: host 7c + (32 - c) x 1 ms, copies 7 x (32 - c) ms; c = 15 gives max(122, 119).
    assert even.step_ms(17, 15, b) == pytest.approx(7 * 15 + 17 * 1.0)
    assert even.step_ms(18, 14, b) == pytest.approx(7 * 18)
    plan = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=None, lanes=even)
    assert plan.cpu_blocks == 15 and plan.expected_decode_ms() == pytest.approx(122.0)
    # 8 tokens: 15 x 12 + 17 = 197 ms against 224 ms with every block streamed: batch 8 stays on the CPU lane.
    assert plan.max_cpu_tokens == 8
    # Launches as slow as the copies leave nothing for the CPU lane to win.
    assert replace(even, gpu_block_ms=7.0).best_split(32, b) == 0


def test_resident_blocks_count_on_the_host_lane_and_large_steps_need_a_margin() -> None:
    """The first crossing waits for the resident blocks; a step above one token takes the CPU lane only where it
    is expected 10% faster than streaming (the model's fp16 steps were 9-13% optimistic on the GPU host)."""
    from dataclasses import replace

    from llama_offload.offload.plan import SPLIT_MARGIN

    b = plan_offload(tiny_args(**SEVEN_B), torch.float16, max_batch_size=1, max_seq_len=256).block_bytes
    lane = replace(lanes(7.0, {1: 7.0, 8: 13.0}, b), gpu_block_ms=0.5)
    assert lane.step_ms(11, 11, b) == pytest.approx(11 * 7.0 + 11 * 0.5)  # the host lane, against 77 ms of copies
    assert lane.step_ms(11, 11, b, resident=10) == pytest.approx(11 * 7.0 + 21 * 0.5)
    # 8 tokens: 11 x 13 + 21 x 0.5 = 153.5 ms against 22 x 7 = 154 streamed: faster, but within the margin.
    assert SPLIT_MARGIN == 0.9 and lane.max_cpu_tokens(11, 11, b, resident=10) == 1
    assert replace(lane, cpu_ms=((1, 7.0), (8, 11.0))).max_cpu_tokens(11, 11, b, resident=10) == 8  # 131.5 < 138.6
    # Resident time moves the best split towards the copy lane.
    assert lane.best_split(22, b, resident=10) < lane.best_split(22, b)


def test_copies_beside_the_cpu_lane_go_at_their_measured_pace() -> None:
    """Copies and CPU blocks both read host memory: with a CPU lane the copy lane takes the bandwidth measured
    beside it; with none, the bandwidth alone."""
    from dataclasses import replace

    b = plan_offload(tiny_args(**SEVEN_B), torch.float16, max_batch_size=1, max_seq_len=256).block_bytes
    alone = lanes(7.0, {1: 5.0}, b)
    beside = replace(alone, pcie_loaded_gbps=alone.pcie_gbps * 0.8)
    assert beside.page_ms(b) == pytest.approx(7.0) and beside.page_ms(b, beside_cpu=True) == pytest.approx(7.0 / 0.8)
    assert beside.step_ms(32, 0, b) == pytest.approx(32 * 7.0)  # no CPU lane: copies alone
    assert beside.step_ms(16, 16, b) == pytest.approx(16 * 7.0 / 0.8)
    # Slower copies beside the CPU lane move blocks to it.
    assert beside.best_split(32, b) > alone.best_split(32, b)
    assert "beside the CPU lane" in beside.describe(b)


def test_an_explicit_split_and_its_errors() -> None:
    args = tiny_args(**SEVEN_B)
    plan = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=5)
    assert plan.cpu_blocks == 5 and plan.expected_decode_ms() is None and plan.max_cpu_tokens == 1
    with pytest.raises(ValueError, match=r"--cpu_blocks 33 .* between 0 and 32"):
        plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=33)
    with pytest.raises(ValueError, match=r"all 32 stay resident"):
        plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, gpu_memory_gb=100, cpu_blocks=1)
    with pytest.raises(ValueError, match=r"--num_slices 4 with --cpu_blocks 2"):
        plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, num_slices=4, cpu_blocks=2)
    with pytest.raises(ValueError, match=r"with 2 processes: the CPU lane runs in one process"):
        plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, cpu_blocks=2, model_parallel_size=2)


def test_host_plan_counts_the_cpu_caches() -> None:
    args = tiny_args(**SEVEN_B)
    plan = plan_offload(args, torch.float16, max_batch_size=4, max_seq_len=1024, gpu_memory_gb=8, cpu_blocks=6)
    host = plan_host(plan, on_cpu=False)
    assert host.parts["pinned pages"] == plan.host_layers * plan.block_bytes
    assert host.parts["CPU-lane KV cache"] == plan.fixed_bytes["KV cache"] * 6 // 32
    with pytest.raises(ValueError, match="host memory"):
        from llama_offload.offload.plan import check_host_memory

        check_host_memory(host, available=host.total_bytes - 1)


# --- the split path, both lanes on the CPU ------------------------------------------------------------------


def hybrid_model(args, plain, *, resident: int, on_cpu: list[bool], max_cpu_tokens: int,
                 cpu_kernel: str = "torch") -> OffloadedTransformer:
    """The offloaded model as offload() builds it on a GPU, with the CPU standing in for the GPU."""
    model = copy.deepcopy(plain)
    model.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", model.dtype)
    context = StepContext()
    packed = [PackedBlock(layer, context) for layer in model.layers]
    rest = HybridOffloadModel(packed[resident:], on_cpu, torch.device("cpu"), context, max_cpu_tokens, cpu_kernel)
    n_cpu = sum(on_cpu)
    plan = OffloadPlan(args.n_layers, resident, len(on_cpu), 0, {"KV cache": 0}, cpu_blocks=n_cpu)
    return OffloadedTransformer(model, packed[:resident], rest, context, torch.device("cpu"), plan, cuda_graphs=False)


def run_steps(model, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill every prompt in its own row (rows of unequal length), then greedy decode all rows together."""
    logits, out = [], [[] for _ in prompts]
    for row, prompt in enumerate(prompts):
        step = make_step(torch.tensor([prompt]), 0, max_positions=model.max_positions, row0=row, last=[len(prompt) - 1])
        lg = model.step(step)
        logits.append(lg)
        out[row].append(int(lg.argmax(-1)))
    for _ in range(steps):
        tokens = torch.tensor([[o[-1]] for o in out])
        starts = [len(p) + len(o) - 1 for p, o in zip(prompts, out)]
        lg = model.step(make_step(tokens, starts, max_positions=model.max_positions, last=[0] * len(prompts)))
        logits.append(lg)
        for row, t in enumerate(lg.argmax(-1).tolist()):
            out[row].append(t)
    return logits, out


PROMPTS = [[1, 5, 9, 13, 2, 7, 11], [1, 40, 41], [1, 3, 3, 3, 3, 60, 61, 62, 63, 70]]


@pytest.fixture(scope="module")
def plain_and_args():
    args = tiny_args(n_layers=6, max_seq_len=64)
    return tiny_model(args), args


@pytest.mark.parametrize("resident,on_cpu", [(0, [False, True, False, True, False, True]),
                                             (2, [True, False, False, True]),
                                             (1, [True] * 5)])
def test_split_path_equals_plain(plain_and_args, resident: int, on_cpu: list[bool]) -> None:
    plain, args = plain_and_args
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", reference.dtype)
    want_logits, want = run_steps(reference, PROMPTS, 8)
    # Every step on the CPU lane (crossings in both directions, host caches), and every step above one token
    # on the "GPU" lane (prefill and the batch of 3, over the CPU blocks' GPU caches).
    for max_cpu_tokens in (10**6, 1):
        model = hybrid_model(args, plain, resident=resident, on_cpu=on_cpu, max_cpu_tokens=max_cpu_tokens)
        got_logits, got = run_steps(model, PROMPTS, 8)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_kv_hand_over_from_gpu_prefill_to_cpu_decode(plain_and_args) -> None:
    """Prefill runs the CPU blocks on the "GPU" lane (over their GPU caches), decode on the CPU lane:
    equal to a run whose every step is on the CPU lane, caches included."""
    plain, args = plain_and_args
    on_cpu = [True, False, True, False, True, True]
    prompt = [1, 8, 16, 24, 32, 40, 48, 56, 64]
    runs = {}
    for name, max_cpu_tokens in (("handed over", 1), ("all CPU", 10**6)):
        model = hybrid_model(args, plain, resident=0, on_cpu=on_cpu, max_cpu_tokens=max_cpu_tokens)
        logits, out = run_steps(model, [prompt], 10)
        runs[name] = (logits, out, [c.k.clone() for c in kv_caches(model)])
        if name == "handed over":
            from llama_offload.offload.kv_mirror import HOST

            assert all(c.side == HOST for c in model.paged.caches if c is not None)  # decode ended on the host
    (la, oa, ka), (lb, ob, kb) = runs["handed over"], runs["all CPU"]
    assert oa == ob
    for a, b in zip(la, lb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ka, kb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_steps_that_switch_lanes_row_by_row_equal_plain(plain_and_args) -> None:
    """Decode steps that alternate between the lanes (3 rows: the "GPU"; 1 or 2 rows: the CPU lane), over rows of
    unequal lengths: each side's new keys and values reach the other before it reads them (kv_mirror.py)."""
    from llama_offload.offload.kv_mirror import GPU, HOST

    plain, args = plain_and_args
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", reference.dtype)
    model = hybrid_model(args, plain, resident=1, on_cpu=[True, False, True, False, True], max_cpu_tokens=2)
    mirrored = [c for c in model.paged.caches if c is not None]
    schedule = [(0, 3), (0, 1), (1, 2), (0, 3), (2, 1), (0, 2), (0, 3), (0, 3), (1, 1)]  # (row0, rows) per step
    outs = {}
    for name, m in (("plain", reference), ("split", model)):
        out = [[] for _ in PROMPTS]
        for row, prompt in enumerate(PROMPTS):
            lg = m.step(make_step(torch.tensor([prompt]), 0, max_positions=m.max_positions, row0=row,
                                  last=[len(prompt) - 1]))
            out[row].append(int(lg.argmax(-1)))
        for row0, rows in schedule:
            span = range(row0, row0 + rows)
            tokens = torch.tensor([[out[r][-1]] for r in span])
            starts = [len(PROMPTS[r]) + len(out[r]) - 1 for r in span]
            lg = m.step(make_step(tokens, starts, max_positions=m.max_positions, row0=row0, last=[0] * rows))
            for r, t in zip(span, lg.argmax(-1).tolist()):
                out[r].append(t)
            if m is model:
                assert all(c.side == (GPU if rows > 2 else HOST) for c in mirrored)
        outs[name] = out
    assert outs["split"] == outs["plain"]
    # The last step ran row 1 on the host: the positions before it are the same on both sides, its own is the
    # host's alone until a step on the GPU reads the row.
    for c in mirrored:
        n = len(PROMPTS[1]) + len(outs["split"][1]) - 1  # positions written in row 1
        torch.testing.assert_close(c.sides[HOST].k[1, : n - 1], c.sides[GPU].k[1, : n - 1], rtol=0, atol=0)
        assert c.dirty[1] == (HOST, n - 1, n) and c.sides[GPU].k[1, n - 1].abs().sum() == 0


def test_a_run_of_large_steps_copies_nothing_between_the_sides(plain_and_args) -> None:
    """Batch decode above the CPU lane's size runs on the GPU caches alone: the host copy is not touched until a
    step on the CPU lane needs it, which then gets exactly what the GPU wrote."""
    from llama_offload.offload.kv_mirror import GPU, HOST

    plain, args = plain_and_args
    model = hybrid_model(args, plain, resident=0, on_cpu=[False, True, False, True, False, True], max_cpu_tokens=1)
    run_steps(model, PROMPTS, 4)  # prefills and batch-3 decode: all on the "GPU"
    mirrored = [c for c in model.paged.caches if c is not None]
    for c in mirrored:
        assert c.sides[HOST].k.abs().sum() == 0  # nothing copied yet
        lengths = [len(p) + 4 for p in PROMPTS]
        # Each row is marked from where its own steps wrote: its prefill from 0, then the batch's decode positions.
        assert [c.dirty[r][0] for r in range(3)] == [GPU] * 3 and all(c.dirty[r][1] == 0 for r in range(3))
        assert all(c.dirty[r][2] >= n for r, n in enumerate(lengths))
    step = make_step(torch.tensor([[3]]), len(PROMPTS[0]) + 4, max_positions=model.max_positions, row0=0, last=[0])
    model.step(step)  # row 0 on the CPU lane
    for c in mirrored:
        n = len(PROMPTS[0]) + 4
        torch.testing.assert_close(c.sides[HOST].k[0, :n], c.sides[GPU].k[0, :n], rtol=0, atol=0)
        assert c.sides[HOST].k[1:].abs().sum() == 0 and c.dirty[0][0] == HOST and c.dirty[1][0] == GPU


def test_the_lane_clock_counts_the_host_threads_time(plain_and_args) -> None:
    from llama_offload.offload.hybrid import LaneClock

    plain, args = plain_and_args
    model = hybrid_model(args, plain, resident=0, on_cpu=[False, True, False, True, False, True], max_cpu_tokens=1)
    run_steps(model, PROMPTS[:1], 1)
    clock = LaneClock()
    clock.attach(model.paged)
    run_steps(model, PROMPTS[:1], 3)  # a prefill (every block streamed), then 3 decode steps on both lanes
    got = clock.report(steps=4)
    assert got["cpu_ms"] > 0 and got["gpu_ms"] > 0 and got["wait_ms"] > 0
    assert "copy_busy_ms" not in got  # no copy lane without a GPU
    assert model.paged.clock is None  # detached: later steps are not timed


def test_rollback_reaches_the_host_caches(plain_and_args) -> None:
    plain, args = plain_and_args
    model = hybrid_model(args, plain, resident=1, on_cpu=[False, True, False, True, True], max_cpu_tokens=1)
    run_steps(model, [[1, 2, 3, 4, 5, 6]], 3)
    caches = kv_caches(model)
    zero_positions(caches, [(0, 4, 9)])
    for c in caches:
        assert c.k[0, 4:9].abs().sum() == 0 and c.k[0, :4].abs().sum() > 0


# --- lanes: threads, cores, calibration ---------------------------------------------------------------------


def test_threads_and_cores() -> None:
    assert cpu_threads_for(None, cores=16) == 15
    assert cpu_threads_for(None, processes=2, cores=16) == 7
    assert cpu_threads_for(4, cores=16) == 4
    with pytest.raises(ValueError, match=r"--cpu_threads 20 is more than the 16 cores"):
        cpu_threads_for(20, cores=16)
    with pytest.raises(ValueError, match=r"shared by 4 processes \(4 each\)"):
        cpu_threads_for(6, processes=4, cores=16)
    with pytest.raises(ValueError, match=r"needs at least 2 CPU cores per process"):
        check_cpu_lane_cores(4, cores=1)
    check_cpu_lane_cores(0, cores=1)


def test_flags_that_cannot_run_are_refused() -> None:
    args = tiny_args()
    with pytest.raises(ValueError, match=r"--cpu_blocks 2 splits the blocks that are paged through a GPU, but no GPU"):
        lanes_for_run(2, None, args, torch.float32, torch.device("cpu"), offload=True)
    assert lanes_for_run(None, None, args, torch.float32, torch.device("cpu"), offload=True) == (None, None)
    with pytest.raises(ValueError, match=r"--cpu_blocks must be a whole number"):
        RunOptions(cpu_blocks=-1).checked()
    with pytest.raises(ValueError, match=r"--cpu_blocks 0 turns the lane off"):
        RunOptions(cpu_blocks=0, cpu_threads=2).checked()


def test_calibration_measures_once_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(lanes_mod, "measure_pcie", lambda device: calls.append(device) or 50.0)
    args = tiny_args(dim=128, n_heads=4, n_kv_heads=2)
    first = calibrate(args, torch.float32, torch.device("cpu"), threads=1, verbose=False)
    assert first.pcie_gbps == 50.0 and [t for t, _ in first.cpu_ms] == list(lanes_mod.TOKEN_COUNTS)
    assert all(ms > 0 for _, ms in first.cpu_ms)
    again = calibrate(args, torch.float32, torch.device("cpu"), threads=1, verbose=False)
    assert again == first and len(calls) == 1  # the second came from the cache
    assert len(json.loads((tmp_path / "lanes.json").read_text())) == 1
    calibrate(args, torch.bfloat16, torch.device("cpu"), threads=1, verbose=False)  # another dtype: measured
    assert len(calls) == 2
    (tmp_path / "lanes.json").write_text("not json")  # a broken cache is measured again, not an error
    calibrate(args, torch.float32, torch.device("cpu"), threads=1, verbose=False)
    assert len(calls) == 3


def test_the_paged_block_launch_is_measured_beside_cpu_steps() -> None:
    from llama_offload.offload.lanes import measure_gpu_block

    block = random_block(tiny_args(dim=128, n_heads=4, n_kv_heads=2), torch.float32)
    ms = measure_gpu_block(block, torch.device("cpu"), threads=1, repeats=2)
    assert 0 < ms < 1000
    assert block.attention.cache is None  # the measured block is left as it was: no cache set up on it


def test_a_quantized_block_is_measured_as_quantized() -> None:
    from llama_offload.model.quant import QuantLinear, QuantSpec

    block = random_block(tiny_args(dim=128), torch.float32, QuantSpec(8))
    assert isinstance(block.attention.wq, QuantLinear)
    assert [t for t, _ in measure_cpu_block(block, threads=1, token_counts=(1, 2), budget_s=0.01)] == [1, 2]


# --- quantized blocks on the CPU lane -----------------------------------------------------------------------


@pytest.mark.parametrize("bits,mins", [(8, False), (4, True), (4, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cpu_kernels_equal_dequantize_then_matmul(bits: int, mins: bool, dtype: torch.dtype) -> None:
    from llama_offload.model.quant import QuantLinear, quantize_int4, quantize_int8

    torch.manual_seed(0)
    q = quantize_int8(torch.randn(96, 256) * 0.02) if bits == 8 else quantize_int4(torch.randn(96, 256) * 0.02, 64)
    layer = QuantLinear(q["weight"], q["scales"], q.get("mins") if mins else None)
    x = torch.randn(2, 5, 256).to(dtype)
    with torch.inference_mode():  # as models run (the dequantization scratch is an inference tensor)
        want = layer(x)
        layer.cpu_kernel = "torch"
        assert layer.native_cpu()
        got = layer(x)
    assert got.shape == want.shape == (2, 5, 96) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the two round at different points
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cpu_kernel", ["dequantize", "torch", "gemv"])
def test_quantized_split_path_equals_the_quantized_model(bits: int, cpu_kernel: str) -> None:
    from llama_offload.model.quant import QuantSpec
    from llama_offload.checkpoint.quant_load import quantize_model

    if cpu_kernel == "gemv" and not gemv_available(verbose=False):
        pytest.skip("no C++ compiler here for the native kernels")
    args = tiny_args(dim=128, n_layers=4, max_seq_len=64)
    plain = quantize_model(tiny_model(args), QuantSpec(bits, 32 if bits == 4 else None))
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", reference.dtype)
    want_logits, want = run_steps(reference, PROMPTS, 6)
    # Decode steps on the CPU lane with the kernel under test; prefill and the batch of 3 streamed.
    for max_cpu_tokens in (1, 10**6):
        model = hybrid_model(args, plain, resident=1, on_cpu=[True, False, True], max_cpu_tokens=max_cpu_tokens,
                             cpu_kernel=cpu_kernel)
        got_logits, got = run_steps(model, PROMPTS, 6)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_split_path_with_the_native_16_bit_kernel_equals_plain() -> None:
    """A bf16 model whose CPU blocks multiply with the native kernel: fp32 accumulation, rounded once, as the
    plain model's matmuls; greedy tokens equal."""
    if not gemv_available(verbose=False):
        pytest.skip("no C++ compiler here for the native kernels")
    args = tiny_args(dim=128, n_layers=4, max_seq_len=64)
    plain = tiny_model(args).to(torch.bfloat16)
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", torch.bfloat16)
    want_logits, want = run_steps(reference, PROMPTS, 6)
    model = hybrid_model(args, plain, resident=0, on_cpu=[True, False, True, True], max_cpu_tokens=10**6,
                         cpu_kernel="gemv")
    assert sum(isinstance(m, CpuLinear) for m in model.modules()) == 3 * 7
    got_logits, got = run_steps(model, PROMPTS, 6)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * b.float().abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_quantized_split_path_with_int16_activations_equals_the_quantized_model(bits: int) -> None:
    """A fp16 quantized model whose CPU blocks multiply the codes against int16 activations (csrc/gemv_i16.h)
    and the same model computed plainly (weights dequantized to fp16): greedy tokens equal, logits within 1% of
    their range (the fp32-activation path lands at 0.3% here, the integer one at 0.3-0.4%)."""
    from llama_offload.model.quant import QuantSpec
    from llama_offload.checkpoint.quant_load import quantize_model

    if not gemv_available(verbose=False):
        pytest.skip("no C++ compiler here for the native kernels")
    args = tiny_args(dim=128, n_layers=4, max_seq_len=64)
    plain = quantize_model(tiny_model(args).to(torch.float16), QuantSpec(bits, 32 if bits == 4 else None))
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", torch.float16)
    want_logits, want = run_steps(reference, PROMPTS, 6)
    model = hybrid_model(args, plain, resident=0, on_cpu=[True, False, True, True], max_cpu_tokens=10**6,
                         cpu_kernel="gemv")
    got_logits, got = run_steps(model, PROMPTS, 6)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.01 * b.float().abs().max().item())


def test_calibration_picks_the_faster_quantized_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from llama_offload.model.quant import QuantSpec

    monkeypatch.setenv("LLAMA_OFFLOAD_CACHE", str(tmp_path))
    monkeypatch.setattr(lanes_mod, "measure_pcie", lambda device: 50.0)
    got = calibrate(tiny_args(dim=256, n_heads=4, n_kv_heads=2), torch.float32, torch.device("cpu"), threads=1,
                    spec=QuantSpec(8), verbose=False)
    kernels = dict(got.kernel_ms)
    assert set(kernels) == {"dequantize", "torch", "gemv"} and got.cpu_kernel == min(kernels, key=kernels.get)
    assert calibrate(tiny_args(dim=256, n_heads=4, n_kv_heads=2), torch.float32, torch.device("cpu"), threads=1,
                     spec=QuantSpec(8), verbose=False) == got  # the kernel comes back from the cache too


@pytest.mark.parametrize("max_cpu_tokens", [1, 3, 10**6])
def test_speculative_decoding_through_the_split_equals_plain_greedy(plain_and_args, max_cpu_tokens: int) -> None:
    """Verification passes of K + 1 positions per sequence count as K + 1 tokens: with a threshold below that they
    stream the CPU blocks (their GPU caches), above it they stay on the CPU lane; rollback reaches the host caches."""
    from llama_offload.generate.decode import BatchDecoder
    from llama_offload.generate.speculative import NgramDraft, SpeculativeDecoder

    plain, args = plain_and_args
    prompts = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]]
    reference = copy.deepcopy(plain)
    reference.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", reference.dtype)
    kw = dict(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, device=torch.device("cpu"), temperature=0)

    def run(decoder):
        seqs = decoder.join(prompts, 20, set())
        while decoder.active:
            decoder.step()
        return [s.tokens for s in seqs]

    want = run(BatchDecoder(reference, **kw))
    model = hybrid_model(args, plain, resident=1, on_cpu=[True, False, True, False, True], max_cpu_tokens=max_cpu_tokens)
    spec = SpeculativeDecoder(model, NgramDraft(), num_draft_tokens=4, **kw)
    assert run(spec) == want
    assert spec.tokens_per_pass > 1  # the repetitive prompts keep some drafts


# --- the copy schedule, against a pager that checks it ------------------------------------------------------


class CheckingPager:
    """Stands in for InferenceOffloadModel: records where each page's parameters point and what each slot holds,
    in program order (a GPU orders the same operations by streams and events)."""

    class Page:
        def __init__(self) -> None:
            self.host = "host"
            self.where = "host"

        def point_at(self, target) -> None:
            self.where = target

    def __init__(self, n_pages: int, n_slots: int = 2):
        self.pages = [self.Page() for _ in range(n_pages)]
        self.slots = list(range(n_slots))
        self.holds: dict[int, int] = {}  # slot -> the page last copied into it
        self.loads = 0

    def load_page(self, page: int, slot: int) -> None:
        self.holds[slot] = page
        self.pages[page].point_at(("slot", slot))
        self.loads += 1

    def wait_loaded(self, slot: int) -> None:
        self.waited = slot

    def drop_page(self, page: int, slot: int) -> None:
        self.pages[page].point_at("host")


class Checked(torch.nn.Module):
    """A block that checks, when it runs, that its weights are where the lane it runs on reads them."""

    def __init__(self, i: int, block: torch.nn.Module, pager: CheckingPager, host_packets: list):
        super().__init__()
        self.i, self.block, self.pager, self.host_packets = i, block, pager, host_packets

    def forward(self, packet: torch.Tensor) -> torch.Tensor:
        where = self.pager.pages[self.i].where
        if any(packet is p for p in self.host_packets) or where == "host":  # the CPU lane
            assert where == "host", f"page {self.i} runs on the CPU but points at {where}"
        else:
            slot = self.pager.waited
            assert where == ("slot", slot) and self.pager.holds[slot] == self.i, (self.i, where, self.pager.holds)
        return self.block(packet)


def test_the_copy_ring_loads_each_page_once_a_step_and_never_reads_a_stale_slot(plain_and_args,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_offload.offload import hybrid

    plain, args = plain_and_args
    on_cpu = [False, True, False, False, True]
    model = hybrid_model(args, plain, resident=1, on_cpu=on_cpu, max_cpu_tokens=1)
    rest = model.paged
    pager = CheckingPager(len(on_cpu))
    host_packets: list = []
    real_to_host = hybrid._to_host
    monkeypatch.setattr(hybrid, "_to_host", lambda src, dst: host_packets.append(real_to_host(src, dst)) or host_packets[-1])
    rest.pager = pager
    rest.units = torch.nn.ModuleList(Checked(i, u, pager, host_packets) for i, u in enumerate(rest.units))
    _, want = run_steps(hybrid_model(args, plain, resident=1, on_cpu=on_cpu, max_cpu_tokens=1), PROMPTS[:1], 6)
    # A prefill (every page streamed), decode steps (the 3 paged ones), then another prefill and decode again:
    # the pages queued across a change of schedule are put back and reloaded, never read from a stale slot.
    _, got = run_steps(model, PROMPTS[:1], 6)
    assert got == want
    # The prefill streams all 5 pages and queues 2 for the next step (2 initial loads, 3 as slots free up, 2 ahead).
    # That guess is wrong for decode, which streams the 3 paged pages only: the first decode step reloads its first
    # 2, then every decode step loads each of its 3 pages exactly once (the last ones queued for the step after).
    prefill, first_decode_reload = 2 + 3 + 2, 2
    assert pager.loads == prefill + first_decode_reload + 6 * 3
    # A second prompt changes the schedule back (decode -> prefill -> decode): the same count again, same tokens.
    before = pager.loads
    _, again = run_steps(model, PROMPTS[:1], 3)
    assert again[0] == want[0][: len(again[0])]
    assert pager.loads - before == prefill + first_decode_reload + 3 * 3


def test_an_all_resident_plan_expects_no_lane_time() -> None:
    """With every block resident the lanes carry nothing: no expected time (not 0 ms), and describe() says none."""
    args = tiny_args(**SEVEN_B)
    b = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256).block_bytes
    plan = plan_offload(args, torch.float16, max_batch_size=1, max_seq_len=256, gpu_memory_gb=100, cpu_blocks=None,
                        lanes=lanes(7.0, {1: 7.0}, b))
    assert plan.paged_layers == 0 and plan.cpu_blocks == 0
    assert plan.expected_decode_ms() is None
    assert "expected decode" not in plan.describe()


def test_copies_beside_the_cpu_lane_that_cannot_be_timed_are_planned_alone(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    def fails(*a, **k):
        raise RuntimeError("CUDA error: something\nmore")

    monkeypatch.setattr(lanes_mod, "measure_pcie_beside_cpu", fails)
    assert lanes_mod._pcie_beside_cpu(None, torch.device("cpu"), 1, 50.0) is None
    assert "could not be timed (CUDA error: something)" in capsys.readouterr().err
