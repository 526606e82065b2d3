"""Llama 3 shapes and Llama 3.1's scaled RoPE, against Meta's loop-based reference."""

import copy
import math

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.transformer import apply_scaling, precompute_freqs_cis
from llama_offload.offload.offloaded import offload
from tiny import tiny_args, tiny_model


def meta_apply_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """Meta's llama3 reference, element by element, as published (scale 8, low 1, high 4, context 8192)."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype, device=freqs.device)


@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 500000.0), (16, 10000.0)])
def test_scaling_equals_meta_reference(head_dim, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    expected = meta_apply_scaling(freqs)
    got = apply_scaling(freqs)
    assert torch.equal(got, expected)
    # All three bands are exercised at Llama 3's shape: kept, divided by 8, and blended.
    if head_dim == 128:
        assert (got == freqs).any() and (got == freqs / 8).any() and ((got != freqs) & (got != freqs / 8)).any()


def test_scaled_table_differs_only_where_it_should():
    plain = precompute_freqs_cis(128, 16, 500000.0)
    scaled = precompute_freqs_cis(128, 16, 500000.0, use_scaled=True)
    assert torch.equal(plain[:, 0], scaled[:, 0])  # the fastest frequency is kept
    assert not torch.equal(plain[:, -1], scaled[:, -1])  # the slowest is divided


@pytest.mark.parametrize(
    "params, hidden",
    [
        (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
              multiple_of=1024, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True), 14336),  # 3.1 8B
        (dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
              multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True), 8192),  # 3.2 1B
        (dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
              multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True), 8192),  # 3.2 3B
    ],
)
def test_llama3_params_json(params, hidden):
    args = ModelArgs.from_dict(params, source="params.json")
    assert args.ffn_hidden_dim == hidden and args.use_scaled_rope and args.kv_heads == 8


def test_use_scaled_rope_must_be_boolean():
    with pytest.raises(ValueError, match="use_scaled_rope"):
        ModelArgs.from_dict({"dim": 64, "n_heads": 4, "use_scaled_rope": "yes"})


def test_llama3_shaped_tiny_model_packed_equals_plain(capsys):
    # Llama 3 in miniature: grouped-query attention, theta 5e5, scaled RoPE, ffn_dim_multiplier.
    args = tiny_args(rope_theta=500000.0, use_scaled_rope=True, ffn_dim_multiplier=1.3, max_seq_len=64)
    plain = tiny_model(args)
    plain.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", torch.float32)
    packed = offload(copy.deepcopy(plain), max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                     device="cpu")
    unscaled = copy.deepcopy(plain)
    unscaled.params = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
    unscaled.setup_caches(args.max_batch_size, args.max_seq_len, "cpu", torch.float32)

    prompt = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = [plain(prompt, 0)]
    got = [packed(prompt, 0)]
    nxt = expected[0][:, -1:].argmax(-1)
    for pos in range(12, 18):
        expected.append(plain(nxt, pos))
        got.append(packed(nxt, pos))
        nxt = expected[-1].argmax(-1)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert not torch.equal(unscaled(prompt, 0), expected[0])  # the scaling is really applied
