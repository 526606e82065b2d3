"""Steps with per-sequence positions on the CPU: batches of unequal prompts, sequences joining a running batch,
chunked prefill, last-position logits, explicit vs fused attention, and the CPU's default dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.generate.decode import BatchDecoder
from llama_offload.generate.generation import Llama
from llama_offload.offload.offloaded import offload
from llama_offload.model.step import attended_len, make_step
from tiny import tiny_args, tiny_model

MAX_SEQ = 96


@pytest.fixture(scope="module")
def plain():
    args = tiny_args(max_seq_len=MAX_SEQ, n_layers=2)
    model = tiny_model(args, seed=11)
    return args, model


def fresh(plain, max_batch_size: int = 4):
    """A packed model on the CPU with its own caches."""
    args, model = plain
    return offload(copy.deepcopy(model), max_batch_size=max_batch_size, max_seq_len=MAX_SEQ, device="cpu")


class Counting:
    """Wraps a step model and counts its passes: each pass streams every paged block once."""

    def __init__(self, model):
        self.model, self.passes = model, []

    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    def step(self, step):
        self.passes.append((step.shape.bsz, step.shape.seqlen))
        return self.model.step(step)


def decode_alone(plain, prompt: list[int], max_gen_len: int, **kw) -> list[int]:
    decoder = BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"),
                           temperature=0, **kw)
    (seq,) = decoder.join([prompt], max_gen_len, {-1})
    while decoder.active:
        decoder.step()
    return seq.tokens


def prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (length,), generator=g).tolist() for length in lengths[:n]]


def test_unequal_prompts_decode_without_padding_steps(plain):
    ps = prompts(3, [3, 17, 9])
    counted = Counting(fresh(plain))
    decoder = BatchDecoder(counted, max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"), temperature=0)
    seqs = decoder.join(ps, 6, {-1})
    while decoder.active:
        decoder.step()
    # One prefill pass for all three prompts, then one pass per new token after the first: the longer prompt's
    # remaining tokens are never fed one step at a time.
    assert counted.passes == [(3, 17)] + [(3, 1)] * 5
    for p, seq in zip(ps, seqs):
        assert seq.tokens == decode_alone(plain, p, 6)


def test_a_sequence_joining_mid_batch_equals_running_it_alone(plain):
    first, late = prompts(2, [5, 12], seed=1)
    decoder = BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"),
                           temperature=0)
    (a,) = decoder.join([first], 10, {-1})
    for _ in range(3):
        decoder.step()
    (b,) = decoder.join([late], 8, {-1})  # at a step boundary, while `a` is mid-answer
    assert b.row == 1 and a.position != b.position
    while decoder.active:
        decoder.step()
    assert a.tokens == decode_alone(plain, first, 10)
    assert b.tokens == decode_alone(plain, late, 8)


def test_a_finished_sequence_frees_its_row_for_the_next(plain):
    p1, p2, p3 = prompts(3, [4, 6, 8], seed=2)
    decoder = BatchDecoder(fresh(plain, max_batch_size=2), max_batch_size=2, max_seq_len=MAX_SEQ,
                           device=torch.device("cpu"), temperature=0)
    short, long_ = decoder.join([p1, p2], 12, {-1})
    short.limit = 2  # ends after two tokens
    with pytest.raises(ValueError, match="0 of 2 rows are free"):
        decoder.join([p3], 4, {-1})
    decoder.step()
    assert short.done and decoder.free_rows() == [0]
    (third,) = decoder.join([p3], 5, {-1})
    assert third.row == 0
    while decoder.active:
        decoder.step()
    assert third.tokens == decode_alone(plain, p3, 5)
    assert long_.tokens == decode_alone(plain, p2, 12)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot_prefill(plain, chunk):
    ps = prompts(3, [23, 7, 40], seed=3)
    one_shot = BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"),
                            temperature=0, logprobs=True, echo_logprobs=True)
    chunked = BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"),
                           temperature=0, logprobs=True, echo_logprobs=True, prefill_chunk=chunk)
    for decoder in (one_shot, chunked):
        decoder.join(ps, 8, {-1})
        while decoder.active:
            decoder.step()
    for a, b in zip(one_shot.rows[:3], chunked.rows[:3]):
        assert a.tokens == b.tokens  # greedy tokens equal
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert len(b.prompt_logprobs) == len(b.prompt) - 1
        torch.testing.assert_close(torch.tensor(a.prompt_logprobs), torch.tensor(b.prompt_logprobs), atol=1e-5, rtol=0)


def test_last_position_logits_equal_that_row_of_the_full_logits(plain):
    args, _ = plain
    full_model, last_model = fresh(plain), fresh(plain)
    tokens = torch.randint(0, args.vocab_size, (3, 11), generator=torch.Generator().manual_seed(4))
    last = [10, 4, 0]
    full = full_model.step(make_step(tokens, 0, max_positions=full_model.max_positions))  # (3, 11, vocab)
    got = last_model.step(make_step(tokens, 0, max_positions=last_model.max_positions, last=last))  # (3, vocab)
    assert got.shape == (3, args.vocab_size)
    want = full[torch.arange(3), torch.tensor(last)]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_rows_at_their_own_positions_equal_each_row_alone(plain):
    # Two sequences at different positions in one decode step, each equal to running it by itself.
    args, _ = plain
    batch = fresh(plain)
    ps = prompts(2, [5, 13], seed=5)
    alone = []
    for p in ps:
        m = fresh(plain)
        m.step(make_step(torch.tensor([p]), 0, max_positions=m.max_positions))
        alone.append(m.step(make_step(torch.tensor([[7]]), len(p), max_positions=m.max_positions))[0, -1])
    padded = torch.tensor([p + [0] * (13 - len(p)) for p in ps])
    batch.step(make_step(padded, 0, max_positions=batch.max_positions))
    got = batch.step(make_step(torch.tensor([[7], [7]]), [5, 13], max_positions=batch.max_positions))[:, -1]
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, atol=1e-5, rtol=0)


def test_fused_attention_matches_meta_explicit_math(plain):
    args, model = plain
    explicit = copy.deepcopy(model)
    for layer in explicit.layers:
        layer.attention.explicit = True
    fused = copy.deepcopy(model)
    for m in (explicit, fused):
        m.setup_caches(2, MAX_SEQ, "cpu", torch.float32)
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(fused(tokens, 0), explicit(tokens, 0), atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[3], [9]])
    torch.testing.assert_close(fused(nxt, 20), explicit(nxt, 20), atol=1e-5, rtol=1e-5)


def test_attended_span_is_bucketed_and_capped():
    assert attended_len(0, 4096) == 256
    assert attended_len(255, 4096) == 256
    assert attended_len(256, 4096) == 512
    assert attended_len(300, 320) == 320


def test_bad_steps_are_refused(plain):
    model = fresh(plain)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="3 start positions were given for a batch of 2"):
        make_step(tokens, [1, 2, 3], max_positions=model.max_positions)
    with pytest.raises(ValueError, match=">= 0"):
        make_step(tokens, [1, -2], max_positions=model.max_positions)
    with pytest.raises(ValueError, match="KV cache holds"):
        make_step(tokens, [1, model.max_positions], max_positions=model.max_positions)


def test_cpu_computes_in_float32_unless_dtype_says_otherwise(tmp_path, sp_tokenizer_path):
    args = tiny_args(vocab_size=512, n_layers=1)
    save_checkpoint(random_state_dict(args, seed=0, dtype=torch.bfloat16), args, tmp_path / "m")
    default = Llama.build(tmp_path / "m", sp_tokenizer_path, 32, 1, device="cpu")
    assert default.model.tok_embeddings.weight.dtype == torch.float32
    assert default.options.dtype is None and default.options.max_seq_len == 32
    kept = Llama.build(tmp_path / "m", sp_tokenizer_path, 32, 1, device="cpu", dtype="bf16")
    assert kept.model.tok_embeddings.weight.dtype == torch.bfloat16
    on_disk = torch.load(tmp_path / "m" / "consolidated.00.pth", mmap=True, weights_only=True)
    assert on_disk["tok_embeddings.weight"].dtype == torch.bfloat16  # the checkpoint stays as it was


def test_fused_projections_need_one_storage(monkeypatch):
    """Weights that merely sit next to each other in memory are not fused (a view must stay inside its storage);
    weights made adjacent are, and the fused view is exactly them."""
    from llama_offload.model import fused

    args = tiny_args(n_layers=1)
    a = tiny_model(args).requires_grad_(False).layers[0].attention  # frozen, as load_model leaves a model
    group = a.groups()[0]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the GPU-only rule, tried on the CPU
    big = torch.zeros(3 * args.dim * args.dim)
    for i, m in enumerate(group):  # back to back, but each its own storage
        m.weight.data = big[i * args.dim * args.dim:][: m.weight.numel()].clone().view_as(m.weight)
    assert fused.adjacent_weight(group) is None
    before = [m.weight.detach().clone() for m in group]
    fused.make_adjacent(group)
    view = fused.adjacent_weight(group)
    assert view is not None and torch.equal(view, torch.cat(before))
    assert all(torch.equal(m.weight, b) for m, b in zip(group, before))
    group[0].weight.requires_grad_(True)  # a weight that trains: the view would be outside autograd
    assert fused.adjacent_weight(group) is None


def test_each_sequence_samples_with_its_own_settings(plain) -> None:
    """A server's requests share a pass but not their sampling: a greedy one and two seeded ones decoded together
    give what each gives alone."""
    from llama_offload.generate.decode import Sampling

    ps = prompts(3, [5, 9, 3], seed=4)
    own = [Sampling(0.0), Sampling(0.9, 0.95, seed=7), Sampling(1.3, 1.0, seed=8)]

    def run(indices: list[int]) -> list[list[int]]:
        decoder = BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu"),
                               temperature=0.6, top_p=0.9, seed=123)
        seqs = decoder.join([ps[i] for i in indices], 12, {-1}, sampling=[own[i] for i in indices])
        while decoder.active:
            decoder.step()
        return [s.tokens for s in seqs]

    together = run([0, 1, 2])
    assert together == [run([i])[0] for i in range(3)]
    assert together[0] == decode_alone(plain, ps[0], 12)  # temperature 0: greedy, whatever the decoder's own
    assert together[1] != together[2]
    with pytest.raises(ValueError, match="one per prompt"):
        BatchDecoder(fresh(plain), max_batch_size=4, max_seq_len=MAX_SEQ, device=torch.device("cpu")).join(
            ps[:2], 4, {-1}, sampling=[own[0]])
