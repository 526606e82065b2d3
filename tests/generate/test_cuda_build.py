"""Llama.build on a GPU carries out the run plan it made before loading (generate/run_plan.py): the planned placement
is the one the offloaded model runs, the plan fits the loaded weights (offload() checks it), and the paged model's
greedy tokens are the resident model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_offload.generate.generation import Llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["Hello world", "The capital of France is"]


def greedy(llama: Llama) -> list[list[int]]:
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, _ = llama.generate(prompts, max_gen_len=12, temperature=0.0)
    return tokens


@pytest.fixture(scope="module")
def resident_tokens(tiny_ckpt: Path) -> list[list[int]]:
    llama = Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", 64, 2, device="cuda", offload=False)
    assert llama.plan is not None and llama.plan.offload.resident_layers == llama.plan.args.n_layers
    return greedy(llama)


@pytest.mark.parametrize("flags", [dict(), dict(num_slices=1), dict(draft="int8", num_draft_tokens=3),
                                   dict(draft="ngram")], ids=["paged", "one slice", "int8 draft", "ngram draft"])
def test_build_carries_out_its_plan(tiny_ckpt: Path, resident_tokens: list[list[int]], flags: dict) -> None:
    llama = Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", 64, 2, device="cuda", **flags)
    planned = llama.plan.offload
    assert llama.model.plan is planned  # what info would print is what runs
    assert planned.paged_layers == llama.plan.args.n_layers and planned.resident_layers == 0
    assert planned.num_slices == flags.get("num_slices", llama.plan.args.n_layers)
    assert greedy(llama) == resident_tokens
