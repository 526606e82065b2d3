"""pager.FlatPages on the CPU (its pinned buffer made as plain memory): a page's tensors point at a slot's copy and
back, through views made once per buffer. The paging itself needs a GPU (tests/test_cuda_offload.py)."""

from __future__ import annotations

import pytest
import torch

from llama_offload.offload import pager
from llama_offload.model.args import ModelArgs
from llama_offload.offload.lanes import random_block
from llama_offload.model.quant import QuantSpec


@pytest.mark.parametrize("spec", [None, QuantSpec(4, 16)])
def test_a_page_points_at_a_slot_and_home_through_views_made_once(monkeypatch: pytest.MonkeyPatch, spec) -> None:
    monkeypatch.setattr(pager, "pinned_host_buffer", lambda n: torch.empty(n, dtype=torch.uint8))
    block = random_block(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=16), torch.float16, spec)
    want = {k: v.clone() for k, v in block.state_dict().items()}
    pages = pager.FlatPages(block)
    slots = [torch.empty(pages.nbytes + 512, dtype=torch.uint8) for _ in range(2)]
    for slot in slots:
        slot[: pages.nbytes].copy_(pages.host)  # what load_page's copy does
    for _ in range(2):
        for slot in slots:
            pages.point_at(slot[: pages.nbytes])
            got = block.state_dict()
            assert all(got[k].data_ptr() - slot.data_ptr() in range(pages.nbytes) for k in want)
            assert all(torch.equal(got[k], v) for k, v in want.items())
            pages.point_at(pages.host)
            assert all(torch.equal(block.state_dict()[k], v) for k, v in want.items())
    first = pages._views(slots[0][: pages.nbytes])
    assert all(a is b for a, b in zip(first, pages._views(slots[0][: pages.nbytes])))  # made once per buffer
    assert len(pages._viewed) == 3  # the host page and the two slots
