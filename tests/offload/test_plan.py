import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import TransformerBlock
from llama_offload.offload.plan import GiB, block_bytes, plan_offload

SEVEN_B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256)


@pytest.mark.parametrize("args", [SEVEN_B, ModelArgs(dim=8192, n_layers=2, n_heads=64, n_kv_heads=8,
                                                     vocab_size=32000, ffn_dim_multiplier=1.3, multiple_of=4096)])
def test_block_bytes_counts_every_parameter(args):
    with torch.device("meta"):
        block = TransformerBlock(0, args).half()
    assert block_bytes(args, torch.float16) == sum(p.numel() * 2 for p in block.parameters())


def plan(gb=None, **kw):
    return plan_offload(SEVEN_B, torch.float16, max_batch_size=1, max_seq_len=512, gpu_memory_gb=gb, **kw)


def test_without_a_budget_everything_is_paged():
    p = plan()
    assert (p.resident_layers, p.paged_layers, p.num_slices) == (0, 32, 32)
    assert p.slot_bytes == 2 * p.block_bytes
    assert plan(num_slices=8).slot_bytes == 2 * 4 * p.block_bytes


def test_budget_fills_resident_blocks_and_stays_within_it():
    previous = -1
    for gb in [2, 4, 8, 12, 14]:
        p = plan(gb)
        assert p.gpu_bytes <= gb * GiB
        assert p.resident_layers + p.paged_layers == 32
        assert p.resident_layers > previous  # more budget, more resident blocks
        assert p.streamed_bytes == p.paged_layers * p.block_bytes
        previous = p.resident_layers
    assert plan(40).paged_layers == 0 and plan(40).slot_bytes == 0


def test_too_small_a_budget_names_the_minimum():
    minimum = plan().gpu_bytes / GiB
    with pytest.raises(ValueError, match=f"at least {minimum:.2f} GiB"):
        plan(minimum * 0.9)
    assert plan(minimum + 0.01).resident_layers == 0


def test_budget_and_slices_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        plan(8, num_slices=4)
    with pytest.raises(ValueError, match="between 1 and the number of blocks"):
        plan(num_slices=33)


def test_describe_lists_every_part():
    text = plan(8).describe()
    for word in ["embedding", "KV cache", "resident blocks", "slot buffers", "expected GPU memory", "streamed"]:
        assert word in text
