"""Top-p sampling over the most likely candidates draws what Meta's full sort draws: the same tokens from the same
generator, which is left in the same state, whether the nucleus fits among the candidates or not."""

from __future__ import annotations

import pytest
import torch

from llama_offload.generate.decode import TOP_P_CANDIDATES, sample_top_p


def meta_sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    # Meta's llama/generation.py, as published.
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat (the full sort), middling and peaked (the candidates)
def test_the_same_tokens_and_generator_state_as_metas_sort(scale: float) -> None:
    vocab, took_candidates = 8 * TOP_P_CANDIDATES, 0
    for seed in range(40):
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * scale
        probs = torch.softmax(logits, dim=-1)
        ours, meta = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample_top_p(probs.clone(), 0.9, ours), meta_sample_top_p(probs.clone(), 0.9, meta))
        assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=meta))
        took_candidates += bool((probs.topk(TOP_P_CANDIDATES).values.sum(-1) > 0.9).all())
    # The flat and the peaked cases exercise the path each is there for.
    if scale == 0.5:
        assert took_candidates == 0
    if scale == 8.0:
        assert took_candidates == 40


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_same_tokens_and_generator_state_on_the_gpu() -> None:
    # torch.multinomial draws the same way on a GPU (one Exp(1) variate per entry); its generator is Philox.
    vocab = 32 * TOP_P_CANDIDATES
    for seed in range(20):
        probs = torch.softmax(torch.randn(4, vocab, device="cuda") * 8, dim=-1)
        ours = torch.Generator(device="cuda").manual_seed(seed)
        meta = torch.Generator(device="cuda").manual_seed(seed)
        assert torch.equal(sample_top_p(probs.clone(), 0.9, ours), meta_sample_top_p(probs.clone(), 0.9, meta))
        assert torch.equal(torch.rand(4, generator=ours, device="cuda"), torch.rand(4, generator=meta, device="cuda"))
