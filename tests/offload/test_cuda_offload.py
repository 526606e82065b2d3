"""Offloaded vs unoffloaded on a real GPU. CI has no GPU: these run on the GPU machine with
``python -m pytest -m cuda -s tests/test_cuda_offload.py``; the figures are printed with -s."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import Transformer
from llama_offload.offload.offloaded import InferenceOffloadModel, offload
from tiny import tiny_args, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DECODE_STEPS = 8


def run_steps(model, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill `prompt`, then feed `tokens` one step at a time; the logits of every step, on the CPU.

    Feeding the reference's tokens to both models compares every step even where they would diverge."""
    logits = [model(prompt, 0)[:, -1].cpu()]
    pos = prompt.shape[1]
    for t in tokens.unbind(1):
        logits.append(model(t[:, None], pos)[:, -1].cpu())
        pos += 1
    return logits


def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = [model(prompt, 0)[:, -1]]
    tokens, pos = [], prompt.shape[1]
    for _ in range(steps):
        tokens.append(logits[-1].argmax(-1))  # (bs,)
        logits.append(model(tokens[-1][:, None], pos)[:, -1])
        pos += 1
    return torch.stack(tokens, 1).cpu(), [lg.cpu() for lg in logits]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_slices", [1, 2, 3])
def test_tiny_offloaded_equals_unoffloaded(dtype, num_slices):
    args = tiny_args()
    cpu_model = tiny_model(args, dtype=dtype)
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", dtype)
    prompt = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)

    model = offload(cpu_model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, num_slices=num_slices)
    paged = model.paged
    assert isinstance(paged, InferenceOffloadModel) and len(paged.model_slices) == num_slices
    got = run_steps(model, prompt, tokens.cuda())
    assert max_abs_diff(expected, got) == 0.0
    assert torch.equal(torch.stack([g.argmax(-1) for g in got[:-1]], 1), tokens)


def seven_b_args() -> ModelArgs:
    return ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256,
                     max_batch_size=2, max_seq_len=64)


def make_seven_b() -> dict:
    """A 7B-shaped fp16 model with N(0, 0.02) weights: its CPU state dict and the reference run on the GPU (the
    ``seven_b`` fixture of tests/conftest.py, shared with the other CUDA tests)."""
    args = seven_b_args()
    with torch.device("meta"):
        ref = Transformer(args).half()
    ref = ref.to_empty(device="cuda").eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    state_dict = {k: v.cpu() for k, v in ref.state_dict().items()}
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.float16)
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, logits = greedy(ref, prompt, DECODE_STEPS)
    model_bytes = sum(v.numel() * v.element_size() for v in state_dict.values())
    del ref
    free_gpu()
    return dict(args=args, state_dict=state_dict, prompt=prompt, tokens=tokens, logits=logits, model_bytes=model_bytes)


def cpu_model_from(state_dict: dict, args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=True)
    return model.eval()


def test_7b_offloaded_equals_unoffloaded_and_is_repeatable(seven_b):
    args, prompt, tokens = seven_b["args"], seven_b["prompt"], seven_b["tokens"].cuda()
    free_gpu()
    base = torch.cuda.memory_allocated()  # the prompt
    torch.cuda.reset_peak_memory_stats()
    model = offload(cpu_model_from(seven_b["state_dict"], args), max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, num_slices=args.n_layers)

    runs = [run_steps(model, prompt, tokens) for _ in range(20)]
    peak = torch.cuda.max_memory_allocated() - base
    diff = max_abs_diff(seven_b["logits"], runs[0])
    drift = max(max_abs_diff(runs[0], r) for r in runs[1:])
    print(f"\n7B-shaped fp16, 32 slices of 1 block: prefill + {DECODE_STEPS} decode steps, "
          f"max |offloaded - unoffloaded| = {diff}, max drift over 20 runs = {drift}, "
          f"peak GPU memory {peak / 2**30:.2f} GiB for a {seven_b['model_bytes'] / 2**30:.2f} GiB model")
    assert diff == 0.0
    assert drift == 0.0
    assert torch.equal(torch.stack([g.argmax(-1) for g in runs[0][:-1]], 1), seven_b["tokens"])
    # Resident: embedding + output (0.49 GiB) + caches; paged: two one-block slots (0.75 GiB).
    assert peak < 0.15 * seven_b["model_bytes"]
    del model
    free_gpu()


def test_7b_stock_offload_model_is_wrong(seven_b):
    """Stock FairScale OffloadModel never makes compute wait for its copies: the reason for our subclass."""
    args, prompt, tokens = seven_b["args"], seven_b["prompt"], seven_b["tokens"].cuda()
    model = offload(cpu_model_from(seven_b["state_dict"], args), max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, num_slices=args.n_layers, stock=True)
    diffs = [max_abs_diff(seven_b["logits"], run_steps(model, prompt, tokens)) for _ in range(2)]
    print(f"\nstock OffloadModel, 7B-shaped: max |stock - unoffloaded| per run = {diffs}")
    assert max(diffs) > 0.0
    del model
    free_gpu()


def test_tiny_budget_mixes_resident_and_paged_blocks():
    args = tiny_args(n_layers=4)
    cpu_model = tiny_model(args, dtype=torch.float16)
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.float16)
    prompt = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)

    from llama_offload.offload.plan import GiB, plan_offload

    everything_paged = plan_offload(args, torch.float16, max_batch_size=args.max_batch_size,
                                    max_seq_len=args.max_seq_len)
    budget = (everything_paged.gpu_bytes + everything_paged.block_bytes) / GiB  # room for one resident block
    model = offload(cpu_model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, gpu_memory_gb=budget)
    assert (model.plan.resident_layers, model.plan.paged_layers) == (1, 3)
    assert isinstance(model.paged, InferenceOffloadModel)
    got = run_steps(model, prompt, tokens.cuda())
    assert max_abs_diff(expected, got) == 0.0


@pytest.mark.parametrize("gpu_memory_gb", [4, 8, 40])
def test_7b_budget_is_exact_and_kept(seven_b, gpu_memory_gb):
    args, prompt, tokens = seven_b["args"], seven_b["prompt"], seven_b["tokens"].cuda()
    free_gpu()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = offload(cpu_model_from(seven_b["state_dict"], args), max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, gpu_memory_gb=gpu_memory_gb)
    got = run_steps(model, prompt, tokens)
    peak = torch.cuda.max_memory_allocated() - base
    diff = max_abs_diff(seven_b["logits"], got)
    print(f"\n7B-shaped fp16 at gpu_memory_gb={gpu_memory_gb}: {model.plan.resident_layers} resident, "
          f"{model.plan.paged_layers} paged; max |offloaded - unoffloaded| = {diff}; "
          f"peak {peak / 2**30:.2f} GiB, plan {model.plan.gpu_bytes / 2**30:.2f} GiB")
    assert diff == 0.0
    assert peak <= gpu_memory_gb * 2**30
    assert model.graphs is not None and model.graphs.captured  # decode steps ran as CUDA graphs
    del model
    free_gpu()


def test_pinned_host_buffer_is_pinned_while_any_view_lives():
    from llama_offload.offload.offloaded import pinned_host_buffer

    buf = pinned_host_buffer(64 * 2**20)
    assert buf.is_pinned()
    view = buf[2**20 :]
    del buf
    gc.collect()
    assert view.is_pinned()  # the registration lasts as long as the memory does
    view.fill_(7)
    assert torch.equal(view[:16].cuda().cpu(), torch.full((16,), 7, dtype=torch.uint8))


def test_tiny_llama3_shaped_offloaded_equals_unoffloaded():
    args = tiny_args(rope_theta=500000.0, use_scaled_rope=True, ffn_dim_multiplier=1.3)
    cpu_model = tiny_model(args, dtype=torch.bfloat16)
    ref = copy.deepcopy(cpu_model).cuda()
    ref.setup_caches(args.max_batch_size, args.max_seq_len, "cuda", torch.bfloat16)
    prompt = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    tokens, expected = greedy(ref, prompt, DECODE_STEPS)
    model = offload(cpu_model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, num_slices=2)
    assert max_abs_diff(expected, run_steps(model, prompt, tokens.cuda())) == 0.0
