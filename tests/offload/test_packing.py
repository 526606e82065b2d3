import copy

import pytest
import torch
from torch import nn

from llama_offload.model.transformer import precompute_freqs_cis
from llama_offload.offload.offloaded import offload, split_evenly
from llama_offload.offload.packing import PackedBlock, PacketLayout, StepContext
from llama_offload.model.step import StepShape, attention_mask, make_step
from tiny import tiny_args, tiny_model


def _layout(bsz: int, seqlen: int, kv_len: int, dim: int, half: int, dtype: torch.dtype) -> PacketLayout:
    return PacketLayout(StepShape(bsz, seqlen, kv_len), dim, half, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bsz, seqlen, start_pos", [(1, 1, 0), (3, 7, 5), (2, 1, 3000), (1, 5, 70000)])
def test_packet_round_trip_is_bit_exact(dtype, bsz, seqlen, start_pos):
    g = torch.Generator().manual_seed(start_pos)
    # Values that lose bits in any narrower float: fp32 noise at large magnitude, plus inf/nan edge cases.
    h = (torch.randn(bsz, seqlen, 48, generator=g) * 1e4).to(dtype)
    h[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), 65504.0]).to(dtype)
    # Each row at its own positions, beyond fp16's (2048) and bf16's (256) exact integers.
    input_pos = torch.arange(seqlen)[None] + start_pos + 17 * torch.arange(bsz)[:, None]  # (bs, seqlen)
    table = precompute_freqs_cis(12, int(input_pos.max()) + 1, theta=1e6)
    freqs = table[input_pos]  # (bs, seqlen, 6)
    kv_len = int(input_pos.max()) + 1
    mask = attention_mask(input_pos, kv_len, dtype)
    layout = _layout(bsz, seqlen, kv_len, 48, 6, dtype)

    out = layout.unpack(layout.pack(h, freqs, input_pos, mask))

    assert out.h.dtype == dtype and out.h.shape == h.shape
    assert torch.equal(out.h.view(torch.uint8), h.view(torch.uint8))  # bit-exact, nan/inf included
    assert torch.equal(torch.view_as_real(out.freqs_cis), torch.view_as_real(freqs))
    assert torch.equal(out.input_pos, input_pos)
    assert torch.equal(out.mask, mask)
    assert all(o % 16 == 0 for o in layout.offsets)


def test_attention_mask_lets_each_row_see_its_own_positions():
    input_pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    mask = attention_mask(input_pos, 8, torch.float16)  # (2, 1, 3, 8)
    assert mask.shape == (2, 1, 3, 8) and mask.dtype == torch.float16
    seen = (mask == 0).int()
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert seen[0, 0].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert seen[1, 0, 0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_blocks_write_into_the_packet_they_are_given():
    args = tiny_args(n_layers=1)
    plain = tiny_model(args)
    plain.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", torch.float32)
    context = StepContext()
    block = PackedBlock(plain.layers[0], context)
    step = make_step(torch.zeros(2, 3, dtype=torch.long), [0, 4], max_positions=plain.max_positions)
    context.layout = _layout(2, 3, step.shape.kv_len, args.dim, args.head_dim // 2, torch.float32)
    h = torch.randn(2, 3, args.dim)
    packet = context.layout.pack(h, plain.freqs_cis[step.input_pos], step.input_pos,
                                 attention_mask(step.input_pos, step.shape.kv_len, torch.float32))
    assert block(packet) is packet  # no new packet per block
    assert not torch.equal(context.layout.unpack(packet).h, h)


def test_bad_packets_are_rejected():
    layout = _layout(1, 2, 64, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="Not this step's packet"):
        layout.unpack(torch.zeros(100))
    with pytest.raises(ValueError, match="Not this step's packet"):
        layout.unpack(torch.zeros(layout.nbytes + 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64"):
        _layout(1, 1, 64, 4, 2, torch.float64)
    pos = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="complex64"):
        layout.pack(torch.zeros(1, 2, 4), torch.zeros(1, 2, 2), pos, attention_mask(pos, 64, torch.float32))
    with pytest.raises(RuntimeError, match="No step is running"):
        StepContext().current()


def test_split_evenly():
    assert [len(g) for g in split_evenly(list(range(10)), 4)] == [3, 3, 2, 2]
    assert split_evenly([1, 2, 3], 3) == [[1], [2], [3]]
    with pytest.raises(ValueError, match="between 1 and the number of blocks"):
        split_evenly([1, 2], 3)


def _decode(model, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill, then greedy decode through the KV cache; returns the logits of every step."""
    logits = [model(prompt, 0)]
    pos = prompt.shape[1]
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)  # (bs, 1)
        logits.append(model(nxt, pos))
        pos += 1
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequential_equals_plain_transformer(dtype, capsys):
    args = tiny_args()
    plain = tiny_model(args, dtype=dtype)
    plain.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", dtype)
    packed = offload(copy.deepcopy(plain), max_batch_size=args.max_batch_size,
                     max_seq_len=args.max_seq_len, device="cpu")
    assert "unoffloaded on the CPU" in capsys.readouterr().err
    assert isinstance(packed.resident, nn.Sequential) and all(isinstance(b, PackedBlock) for b in packed.resident)
    assert packed.paged is None

    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = _decode(plain, prompt, steps=6)
    got = _decode(packed, prompt, steps=6)
    assert len(got) == 7
    for e, g in zip(expected, got):
        assert torch.equal(e, g)  # the same kernels on the same data: exactly equal


def test_packed_blocks_match_meta_math_at_large_start_pos():
    # Decoding far into a long context: positions beyond fp16's and bf16's exact integer range.
    args = tiny_args(max_seq_len=4200, max_batch_size=1, n_layers=2)
    plain = tiny_model(args)
    plain.setup_caches(1, args.max_seq_len, "cpu", torch.float32)
    h = torch.randn(1, 2, args.dim)
    step = make_step(torch.zeros(1, 2, dtype=torch.long), 4100, max_positions=plain.max_positions)
    freqs = plain.freqs_cis[step.input_pos]
    mask = attention_mask(step.input_pos, step.shape.kv_len, torch.float32)
    block = plain.layers[0]
    expected = block(h, step.shape, step.input_pos, freqs, mask)
    block.attention.cache.k.zero_(); block.attention.cache.v.zero_()
    context = StepContext()
    context.layout = PacketLayout(step.shape, args.dim, args.head_dim // 2, torch.float32)
    got = context.layout.unpack(PackedBlock(block, context)(context.layout.pack(h, freqs, step.input_pos, mask))).h
    assert torch.equal(expected, got)


def test_model_without_caches_says_what_to_do():
    args = tiny_args()
    with pytest.raises(RuntimeError, match="setup_caches"):
        tiny_model(args)(torch.zeros(1, 2, dtype=torch.long), 0)


def test_cache_overflow_is_a_clear_error():
    args = tiny_args(max_seq_len=8)
    model = tiny_model(args)
    model.setup_caches(1, 8, "cpu", torch.float32)
    assert model.max_positions == 64  # rounded up: attention spans stay aligned for fused kernels
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="reaches position 64"):
        model(torch.zeros(1, 1, dtype=torch.long), 64)
