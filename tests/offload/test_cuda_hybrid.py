"""The CPU lane on a real GPU, 7B-shaped fp16 model: the hybrid (some blocks computed by the host's cores, the
others paged or resident) against the unoffloaded model, prefill + 16 decode steps: max logit difference and
greedy agreement. CI has no GPU: run on the GPU machine with ``python -m pytest -m cuda -s tests/test_cuda_hybrid.py``.
Timings are printed, never asserted."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch

from llama_offload.kernels.cpu import gemv_available
from llama_offload.offload.lanes import calibrate, cpu_threads_for
from llama_offload.offload.offloaded import offload
from test_cuda_offload import cpu_model_from, free_gpu, greedy, max_abs_diff, run_steps

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 16


@pytest.fixture(scope="module")
def reference(seven_b):
    """The unoffloaded model's greedy run of 16 steps, and the lanes this machine measures."""
    args = seven_b["args"]
    model = cpu_model_from(seven_b["state_dict"], args).cuda()
    model.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.float16)
    prompt = torch.cat([seven_b["prompt"], seven_b["prompt"].flip(1)])  # (2, 16): two rows
    tokens, logits = greedy(model, prompt, STEPS)
    del model
    free_gpu()
    threads = cpu_threads_for(None)
    lanes = calibrate(args, torch.float16, torch.device("cuda"), threads=threads, use_cache=False)
    print(f"\ncalibration: PCIe {lanes.pcie_gbps:.1f} GB/s, CPU block ms by tokens {lanes.cpu_ms} on {threads} threads, "
          f"kernel {lanes.cpu_kernel} of {lanes.kernel_ms}")
    return dict(prompt=prompt, tokens=tokens, logits=logits, lanes=lanes)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) how far each row's greedy choice leads the runner-up."""
    top2 = logits.float().topk(2, dim=-1).values  # (rows, 2)
    return top2[:, 0] - top2[:, 1]


def agreement(ref_logits: list, logits: list, want: torch.Tensor, diff: float, rows: int):
    """Where the hybrid's greedy choices may differ from the reference's. A flip is within the logits' tolerance
    where the reference's top two are closer than twice the largest difference: random weights make such
    near-ties common. Everywhere else, given the same tokens before, the hybrid must pick the reference's token;
    and run free, it must repeat the reference's tokens up to the first near-tie (it cannot diverge before one).
    Returns (wrong picks (rows, STEPS), the near-tie steps, the first near-tie)."""
    ref_logits = [lg[:rows] for lg in ref_logits[:STEPS]]
    decided = torch.stack([margin(lg) > 2 * diff for lg in ref_logits], 1)  # (rows, STEPS)
    picked = torch.stack([lg.argmax(-1) for lg in logits[:STEPS]], 1)  # (rows, STEPS) given the reference's tokens
    wrong = (picked != want.cpu()) & decided
    near = [i for i in range(STEPS) if not decided[:, i].all()]
    return wrong, near, near[0] if near else STEPS


@pytest.mark.parametrize("how", ["nothing resident, 16 CPU", "8 GiB, auto split", "large steps on the GPU caches",
                                 "16 CPU, native kernel", "16 CPU, torch's kernel", "16 CPU, no CUDA graphs"])
def test_hybrid_equals_unoffloaded_on_7b(seven_b, reference, how: str) -> None:
    args = seven_b["args"]
    kw = {"nothing resident, 16 CPU": dict(cpu_blocks=16, lanes=reference["lanes"]),
          "8 GiB, auto split": dict(gpu_memory_gb=8, cpu_blocks=None, lanes=reference["lanes"]),
          # no lanes: steps of more than one token (the prefill, and the two rows) stream the CPU blocks
          "large steps on the GPU caches": dict(cpu_blocks=12),
          # each CPU kernel whatever calibration chose (offload/lanes.py)
          "16 CPU, native kernel": dict(cpu_blocks=16, lanes=replace(reference["lanes"], cpu_kernel="gemv")),
          "16 CPU, torch's kernel": dict(cpu_blocks=16, lanes=replace(reference["lanes"], cpu_kernel="torch")),
          # the paged blocks launched eagerly instead of replayed (block_graphs.py)
          "16 CPU, no CUDA graphs": dict(cpu_blocks=16, lanes=reference["lanes"], cuda_graphs=False)}[how]
    model = offload(cpu_model_from(seven_b["state_dict"], args), max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, **kw)
    plan = model.plan
    assert plan.cpu_blocks > 0, plan
    if "kernel" in how:
        assert gemv_available() or "native" not in how, "the native kernels did not build on this machine"
    for rows in (1, 2):  # one row decodes on the CPU lane; two rows too, unless max_cpu_tokens < 2 (then on the GPU)
        prompt, want = reference["prompt"][:rows], reference["tokens"][:rows].cuda()
        logits = run_steps(model, prompt, want)
        diff = max_abs_diff([lg[:rows] for lg in reference["logits"]], logits)
        got, _ = greedy(model, prompt, STEPS)
        agree = int((got == want.cpu()).all(0).sum())
        wrong, near, first_tie = agreement(reference["logits"], logits, want, diff, rows)
        torch.cuda.synchronize()
        start = time.perf_counter()
        greedy(model, prompt[:, :1], 8)
        ms = (time.perf_counter() - start) / 9 * 1e3
        print(f"7B fp16 hybrid ({how}: {plan.resident_layers} resident, {plan.paged_layers} paged, {plan.cpu_blocks} "
              f"CPU, CPU steps up to {plan.max_cpu_tokens} tokens), {rows} row(s): max |hybrid - unoffloaded| = "
              f"{diff:.4g}, greedy agreement {agree}/{STEPS} (near-ties of the reference at steps {near or 'none'}), "
              f"~{ms:.1f} ms/step (expected {plan.expected_decode_ms() or float('nan'):.1f} at batch 1)")
        assert diff < 0.05, diff  # fp16 logits of magnitude ~1: CPU and GPU kernels round differently
        assert not wrong.any(), f"the hybrid's choice differs where the reference's is decided: {wrong.nonzero().tolist()}"
        assert torch.equal(got[:, :first_tie], want.cpu()[:, :first_tie]), (got, want)
    del model
    free_gpu()


def test_int4_hybrid_equals_the_unoffloaded_int4_model_on_7b(seven_b, reference) -> None:
    """The 7B shape in int4 g64: 13 CPU blocks multiplying the codes against int16 activations on the host
    (csrc/gemv_i16.h), the rest paged, against the same int4 model unoffloaded on the GPU."""
    from llama_offload.model.quant import QuantSpec
    from llama_offload.checkpoint.quant_load import quantize_model

    args, spec = seven_b["args"], QuantSpec(4, 64)
    quantized = quantize_model(cpu_model_from(seven_b["state_dict"], args), spec, device="cuda")
    ref = copy.deepcopy(quantized).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.float16)
    prompt = torch.cat([seven_b["prompt"], seven_b["prompt"].flip(1)])  # (2, 16)
    want_all, ref_logits = greedy(ref, prompt, STEPS)
    del ref
    free_gpu()
    # The fp16 calibration's lanes with the native kernel: the split is explicit, the kernel is the one under test.
    lanes = replace(reference["lanes"], cpu_kernel="gemv")
    model = offload(quantized, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, cpu_blocks=13,
                    lanes=lanes)
    assert model.plan.cpu_blocks == 13, model.plan
    assert gemv_available(), "the native kernels did not build on this machine"
    for rows in (1, 2):  # decode of one row, then two, on the CPU lane where max_cpu_tokens allows
        want = want_all[:rows].cuda()
        logits = run_steps(model, prompt[:rows], want)
        diff = max_abs_diff([lg[:rows] for lg in ref_logits], logits)
        got, _ = greedy(model, prompt[:rows], STEPS)
        wrong, near, first_tie = agreement(ref_logits, logits, want, diff, rows)
        print(f"7B int4 g64 hybrid (13 CPU, {model.plan.paged_layers} paged), {rows} row(s): max |hybrid - "
              f"unoffloaded| = {diff:.4g}, greedy agreement {int((got == want.cpu()).all(0).sum())}/{STEPS} "
              f"(near-ties of the reference at steps {near or 'none'})")
        assert diff < 0.05, diff
        assert not wrong.any(), f"the hybrid's choice differs where the reference's is decided: {wrong.nonzero().tolist()}"
        assert torch.equal(got[:, :first_tie], want.cpu()[:, :first_tie]), (got, want)
    del model
    free_gpu()


def test_graphed_paged_blocks_equal_eager_bit_for_bit() -> None:
    """The paged blocks replayed as CUDA graphs run the kernels the eager launches run: the same logits to the
    bit, over steps that cross a KV_BUCKET (new graphs) with 1 and 2 rows (other packets)."""
    from llama_offload.model.step import KV_BUCKET
    from tiny import tiny_args, tiny_model

    args = tiny_args(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=2 * KV_BUCKET,
                     max_batch_size=2)
    torch.manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (2, KV_BUCKET - 4)).cuda()
    runs = {}
    for graphs in (False, True):
        model = offload(tiny_model(args, dtype=torch.float16), max_batch_size=2, max_seq_len=args.max_seq_len,
                        cpu_blocks=2, cuda_graphs=graphs)
        assert model.plan.paged_layers > 0 and model.plan.cpu_blocks == 2
        runs[graphs] = [greedy(model, prompt[:rows], 10) for rows in (1, 2)]
        if graphs:
            assert len(model.paged.graphs.captured) > 0, "no paged block was replayed as a graph"
        del model
        free_gpu()
    for (tok_a, lg_a), (tok_b, lg_b) in zip(runs[False], runs[True]):
        assert torch.equal(tok_a, tok_b)
        assert all(torch.equal(a, b) for a, b in zip(lg_a, lg_b))


def test_copies_beside_the_cpu_lane_are_measured() -> None:
    """Calibration's copy bandwidth while the cores compute a block: a rate no faster than the copies alone
    (within timing noise), printed for the notes."""
    from llama_offload.model.args import ModelArgs
    from llama_offload.model.cpu_linear import set_cpu_kernel
    from llama_offload.offload.lanes import measure_pcie, measure_pcie_beside_cpu, random_block

    args = ModelArgs(dim=4096, n_layers=1, n_heads=32, vocab_size=32000, multiple_of=256)
    block = random_block(args, torch.float16)
    set_cpu_kernel(block, "gemv" if gemv_available() else "torch")
    device = torch.device("cuda")
    alone = measure_pcie(device)
    beside = measure_pcie_beside_cpu(block, device, cpu_threads_for(None), alone)
    print(f"\npinned H2D {alone:.1f} GB/s alone, {beside:.1f} GB/s while the CPU lane computes a 7B fp16 block")
    assert 0 < beside < 1.2 * alone
    assert block.attention.cache is None
