"""Speculative decoding on a real GPU, through the paged 7B-shaped model: greedy output equals plain greedy decoding
of the same offloaded model with the n-gram draft and with the int4 self-draft (resident), and the figures the issue
asks for (tokens per pass, ms per pass for K = 1, 4, 8, 16) are printed. CI has no GPU: run on the GPU machine with
``python -m pytest -m cuda -s tests/test_cuda_speculative.py``. Timings are printed, never asserted."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from llama_offload.generate.decode import BatchDecoder
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_model
from llama_offload.generate.speculative import ModelDraft, NgramDraft, SpeculativeDecoder
from test_cuda_offload import cpu_model_from, free_gpu

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MAX_SEQ, GEN = 64, 32
CUDA = torch.device("cuda")


def paged(seven_b):
    args = seven_b["args"]
    return offload(cpu_model_from(seven_b["state_dict"], args), max_batch_size=args.max_batch_size,
                   max_seq_len=MAX_SEQ)


def int4_draft(seven_b, k: int) -> ModelDraft:
    args = dataclasses.replace(seven_b["args"], max_seq_len=MAX_SEQ + k + 1)
    model = quantize_model(cpu_model_from(seven_b["state_dict"], seven_b["args"]), QuantSpec(4, 64), device="cuda")
    return ModelDraft(offload(model, max_batch_size=args.max_batch_size, max_seq_len=MAX_SEQ + k + 1, resident=True))


def decode(decoder, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
    seqs = decoder.join(prompts, GEN, {-1})
    torch.cuda.synchronize()
    start = time.perf_counter()
    while decoder.active:
        decoder.step()
    torch.cuda.synchronize()
    return [s.tokens for s in seqs], time.perf_counter() - start


def prompts(seven_b) -> list[list[int]]:
    first = seven_b["prompt"][0].tolist()
    return [first, first[:9] + first[:5]]  # unequal lengths; the second repeats itself (n-grams to find)


def test_offloaded_speculative_greedy_equals_offloaded_plain_greedy(seven_b):
    model = paged(seven_b)
    kw = dict(max_batch_size=2, max_seq_len=MAX_SEQ, device=CUDA, temperature=0)
    want, plain_s = decode(BatchDecoder(model, **kw), prompts(seven_b))
    print(f"\nplain greedy, 7B-shaped fp16 all paged: {GEN - 1} passes in {plain_s:.2f} s "
          f"({1e3 * plain_s / (GEN - 1):.1f} ms/pass)")
    for name, make in (("ngram", lambda k: NgramDraft()), ("int4 self-draft", lambda k: int4_draft(seven_b, k))):
        for k in (1, 4, 8, 16):
            draft = make(k)
            spec = SpeculativeDecoder(model, draft, num_draft_tokens=k, **kw)
            assert len(spec.caches) == seven_b["args"].n_layers  # paged blocks' caches found too (for rollback)
            got, seconds = decode(spec, prompts(seven_b))
            print(f"{name}, K={k}: {spec.tokens_per_pass:.2f} tokens per pass, {spec.passes} passes, "
                  f"{1e3 * seconds / max(spec.passes, 1):.1f} ms/pass (draft included), {seconds:.2f} s "
                  f"against {plain_s:.2f} s plain")
            assert got == want, (name, k)
            del draft, spec
            free_gpu()
    del model
    free_gpu()
