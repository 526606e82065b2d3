"""Quantized models on a real GPU: paged equals resident bit for bit, repeatably, within the plan's memory.
CI has no GPU: these run on the GPU machine with ``python -m pytest -m cuda -s tests/test_cuda_quant.py``."""

from __future__ import annotations

import copy

import pytest
import torch

from llama_offload.model import quant
from llama_offload.kernels import quant_triton
from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import Transformer
from llama_offload.offload.offloaded import InferenceOffloadModel, offload
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_model
from test_cuda_offload import DECODE_STEPS, free_gpu, greedy, max_abs_diff, run_steps
from tiny import tiny_args, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, embeddings=True)]


def random_codes(rows: int, cols: int, int4: bool, mins: bool, scale_dtype: torch.dtype, g: int):
    gen = torch.Generator().manual_seed(rows + cols + g)
    weight = (torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.int32).to(torch.uint8) if int4
              else torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int32).to(torch.int8))
    scales = (torch.rand(rows, cols // g, generator=gen) * 0.01).to(scale_dtype)
    m = (torch.randn(rows, cols // g, generator=gen) * 0.05).to(scale_dtype) if mins else None
    return weight, scales, m


@pytest.mark.skipif(not quant_triton.available(), reason="Triton is not installed")
@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("mins", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_dequantization_equals_pytorch(int4, mins, scale_dtype, out_dtype):
    weight, scales, m = random_codes(96, 512, int4, mins, scale_dtype, 32)
    weight, scales = weight.cuda(), scales.cuda()
    m = None if m is None else m.cuda()
    expected = quant.dequantize(weight, scales, m, out_dtype)  # the PyTorch path (no out=)
    got = quant_triton.dequantize(weight, scales, m, torch.empty(96, 512, dtype=out_dtype, device="cuda"))
    assert torch.equal(got.view(torch.int16 if out_dtype.itemsize == 2 else torch.int32),
                       expected.view(torch.int16 if out_dtype.itemsize == 2 else torch.int32))  # bits, zeros' signs too


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name + ("+emb" if s.embeddings else ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_quantized_offloaded_equals_unoffloaded(spec, dtype):
    args = tiny_args(n_layers=4, multiple_of=64)
    cpu_model = quantize_model(tiny_model(args, dtype=dtype), spec)
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", dtype)
    prompt = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)
    for how in (dict(num_slices=4), dict(num_slices=2), dict(gpu_memory_gb=None), dict(resident=True)):
        how = {k: v for k, v in how.items() if v is not None}
        model = offload(copy.deepcopy(cpu_model), max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                        **how)
        got = run_steps(model, prompt, tokens.cuda())
        assert max_abs_diff(expected, got) == 0.0, how
        assert torch.equal(torch.stack([g.argmax(-1) for g in got[:-1]], 1), tokens)


def test_tiny_quantized_budget_mixes_resident_and_paged_blocks():
    args = tiny_args(n_layers=4, multiple_of=64)
    cpu_model = quantize_model(tiny_model(args, dtype=torch.float16), QuantSpec(4, 32))
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.float16)
    prompt = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)
    everything_paged = offload(copy.deepcopy(cpu_model), max_batch_size=args.max_batch_size,
                               max_seq_len=args.max_seq_len).plan
    budget = (everything_paged.gpu_bytes + everything_paged.block_bytes) / 2**30  # room for one resident block
    model = offload(cpu_model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, gpu_memory_gb=budget)
    assert (model.plan.resident_layers, model.plan.paged_layers) == (1, 3)
    assert max_abs_diff(expected, run_steps(model, prompt, tokens.cuda())) == 0.0


def seven_b_args() -> ModelArgs:
    return ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256,
                     max_batch_size=2, max_seq_len=64)


def quantized_7b(spec: QuantSpec) -> Transformer:
    """A 7B-shaped bf16 model, N(0, 0.02) weights drawn on the GPU one matrix at a time, quantized there."""
    args = seven_b_args()
    with torch.device("meta"):
        model = Transformer(args).bfloat16()
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, p in list(model.named_parameters()):
        if not name.startswith("layers.") or "norm" in name:  # what stays 16-bit: embedding, head, norms
            value = torch.ones(p.shape) if "norm" in name else torch.empty(p.shape, device="cuda").normal_(0, 0.02, generator=g).cpu()
            module, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(module, attr, torch.nn.Parameter(value.bfloat16(), requires_grad=False))
    draw = lambda name, shape: torch.empty(shape, device="cuda").normal_(0, 0.02, generator=g).bfloat16()
    return quantize_model(model, spec, weight_of=draw).eval()


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 64)], ids=lambda s: s.name)
def test_7b_quantized_offloaded_equals_unoffloaded_and_is_repeatable(spec):
    args = seven_b_args()
    cpu_model = quantized_7b(spec)
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.bfloat16)
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)
    del ref
    free_gpu()

    for how in (dict(num_slices=args.n_layers), dict(gpu_memory_gb=4)):
        free_gpu()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model = offload(copy.deepcopy(cpu_model) if "gpu_memory_gb" not in how else cpu_model,
                        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, **how)
        assert isinstance(model.paged, InferenceOffloadModel)
        runs = [run_steps(model, prompt, tokens.cuda()) for _ in range(20 if "num_slices" in how else 2)]
        peak = torch.cuda.max_memory_allocated() - base
        diff = max_abs_diff(expected, runs[0])
        drift = max(max_abs_diff(runs[0], r) for r in runs[1:])
        plan = model.plan
        print(f"\n7B-shaped {spec.name} bf16, {how}: {plan.resident_layers} resident / {plan.paged_layers} paged, "
              f"block {plan.block_bytes / 2**20:.1f} MiB; max |offloaded - unoffloaded| = {diff}, drift over "
              f"{len(runs)} runs = {drift}; peak GPU {peak / 2**30:.3f} GiB, plan {plan.gpu_bytes / 2**30:.3f} GiB")
        assert diff == 0.0 and drift == 0.0
        assert torch.equal(torch.stack([g.argmax(-1) for g in runs[0][:-1]], 1), tokens)
        assert peak <= plan.gpu_bytes * 1.02 + 2**20
        if "gpu_memory_gb" in how:
            assert peak <= how["gpu_memory_gb"] * 2**30
        del model, runs
        free_gpu()


def test_quantizing_on_the_gpu_gives_the_cpu_codes(monkeypatch):
    """--quantize on a GPU run quantizes there (seconds instead of minutes): the codes, scales and mins must be the
    CPU's, bit for bit, including rows of zeros, scales that overflow fp16, and chunked rows."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(512, 4096, generator=gen) * 0.02, torch.randn(96, 11008, generator=gen).half().float() * 0.05]
    mats[0][3] = 0.0
    mats[0][7] *= 1e7  # int8 scale beyond fp16's range: fp32 scales for that chunk
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK_ELEMENTS", 64 * 4096)  # several chunks per matrix
    for w in mats:
        for bits, g in ((8, None), (4, 32), (4, 64), (4, 128)):
            cpu = quant.quantize_matrix(w, bits, g)
            gpu = quant.quantize_matrix(w, bits, g, device="cuda")
            assert cpu.keys() == gpu.keys()
            for k in cpu:
                assert gpu[k].device.type == "cpu" and gpu[k].dtype == cpu[k].dtype, (bits, g, k)
                assert torch.equal(cpu[k], gpu[k]), (bits, g, k)


def test_quantize_at_load_on_the_gpu_equals_the_cpu(tmp_path):
    from llama_offload.checkpoint.load import load_model, random_state_dict, save_checkpoint

    args = tiny_args(n_layers=2, multiple_of=64)
    save_checkpoint(random_state_dict(args, seed=1), args, tmp_path / "m")
    spec = QuantSpec(4, 32, embeddings=True)
    on = {d: load_model(tmp_path / "m", max_seq_len=32, max_batch_size=1, show_progress=False, quantize=spec,
                        quantize_device=d).state_dict() for d in (None, "cuda")}
    assert on[None].keys() == on["cuda"].keys()
    for k, v in on[None].items():
        assert on["cuda"][k].device.type == "cpu" and torch.equal(v, on["cuda"][k]), k
