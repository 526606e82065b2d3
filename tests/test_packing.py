import copy

import pytest
import torch
from torch import nn

from llama_offload.model import causal_mask, precompute_freqs_cis
from llama_offload.offload import offload, split_evenly
from llama_offload.packing import PackedBlock, pack, unpack, with_hidden
from tiny import tiny_args, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bsz, seqlen, start_pos", [(1, 1, 0), (3, 7, 5), (2, 1, 3000), (1, 5, 70000)])
def test_packet_round_trip_is_bit_exact(dtype, bsz, seqlen, start_pos):
    g = torch.Generator().manual_seed(start_pos)
    # Values that lose bits in any narrower float: fp32 noise at large magnitude, plus inf/nan edge cases.
    h = (torch.randn(bsz, seqlen, 48, generator=g) * 1e4).to(dtype)
    h[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), 65504.0]).to(dtype)
    freqs = precompute_freqs_cis(12, start_pos + seqlen, theta=1e6)[start_pos:]  # (seqlen, 6)

    out = unpack(pack(h, freqs, start_pos))

    assert out.h.dtype == dtype and out.h.shape == h.shape
    assert torch.equal(out.h.view(torch.uint8), h.view(torch.uint8))  # bit-exact, nan/inf included
    assert torch.equal(torch.view_as_real(out.freqs_cis), torch.view_as_real(freqs))
    assert out.start_pos == start_pos
    expected_mask = causal_mask(seqlen, start_pos, torch.device("cpu"), dtype)
    if expected_mask is None:
        assert out.mask is None
    else:
        assert torch.equal(out.mask, expected_mask)


def test_with_hidden_replaces_only_the_hidden_state():
    freqs = precompute_freqs_cis(8, 10)[3:6]
    packet = pack(torch.randn(2, 3, 16, dtype=torch.float16), freqs, 3)
    new_h = torch.randn(2, 3, 16, dtype=torch.float16)
    out = unpack(with_hidden(packet, new_h))
    assert torch.equal(out.h, new_h) and out.start_pos == 3
    assert torch.equal(out.freqs_cis, freqs)


def test_bad_packets_are_rejected():
    with pytest.raises(ValueError, match="Not a packet"):
        unpack(torch.zeros(100))
    with pytest.raises(ValueError, match="magic"):
        unpack(torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64"):
        pack(torch.zeros(1, 1, 4, dtype=torch.float64), precompute_freqs_cis(4, 1), 0)
    with pytest.raises(ValueError, match="complex64"):
        pack(torch.zeros(1, 2, 4), precompute_freqs_cis(4, 1), 0)


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
    assert isinstance(packed.blocks, nn.Sequential) and all(isinstance(b, PackedBlock) for b in packed.blocks)

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
    freqs = plain.freqs_cis[4100:4102]
    mask = causal_mask(2, 4100, h.device, h.dtype)
    block = plain.layers[0]
    expected = block(h, 4100, freqs, mask)
    block.attention.cache.k.zero_(); block.attention.cache.v.zero_()
    got = unpack(PackedBlock(block)(pack(h, freqs, 4100))).h
    assert torch.equal(expected, got)


def test_model_without_caches_says_what_to_do():
    args = tiny_args()
    with pytest.raises(RuntimeError, match="setup_caches"):
        tiny_model(args)(torch.zeros(1, 2, dtype=torch.long), 0)


def test_cache_overflow_is_a_clear_error():
    args = tiny_args(max_seq_len=8)
    model = tiny_model(args)
    model.setup_caches(1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long), 0)
