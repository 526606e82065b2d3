"""Speculative decoding on tiny fp32 models on the CPU: greedy output equals plain greedy decoding for every draft
source (n-gram, the target itself, an unrelated model that is almost always rejected, the target quantized to int8),
batches of unequal prompts; rejected positions leave the caches as a run that never saw them; the sampling rule
draws from the target's distribution (chi-square)."""

from __future__ import annotations


import pytest
import torch

from llama_offload.generate.decode import BatchDecoder, Decoding
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_model
from llama_offload.generate.speculative import (
    ModelDraft, NgramDraft, SpeculativeDecoder, accept_greedy, accept_sampled, filtered_probs, kv_caches,
)
from tiny import tiny_args, tiny_model

K = 4
ARGS = tiny_args(n_layers=2, max_batch_size=3, max_seq_len=64)
NO_STOP = {-1}
# Unequal prompts; repeated n-grams so that prompt lookup has something to find.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [9, 10, 11, 12, 13, 14, 9, 10, 11, 12, 13, 14, 9, 10, 11, 12, 13]]


def target(seed: int = 0):
    model = tiny_model(ARGS, seed=seed)
    model.setup_caches(ARGS.max_batch_size, ARGS.max_seq_len, "cpu", torch.float32)
    return model


def draft_model(model):
    # The draft writes up to K positions past the target's last: its cache is that much longer.
    model.setup_caches(ARGS.max_batch_size, ARGS.max_seq_len + K + 1, "cpu", torch.float32)
    return model


def run(decoder, prompts=PROMPTS, max_gen_len=20):
    seqs = decoder.join(prompts, max_gen_len, NO_STOP)
    while decoder.active:
        decoder.step()
    return [s.tokens for s in seqs]


def plain_greedy(prompts=PROMPTS, max_gen_len=20):
    dec = BatchDecoder(target(), max_batch_size=ARGS.max_batch_size, max_seq_len=ARGS.max_seq_len,
                       device=torch.device("cpu"), temperature=0)
    return run(dec, prompts, max_gen_len), dec


def speculative(draft, prompts=PROMPTS, max_gen_len=20, model=None, **kw):
    dec = SpeculativeDecoder(model or target(), draft, num_draft_tokens=K, max_batch_size=ARGS.max_batch_size,
                             max_seq_len=ARGS.max_seq_len, device=torch.device("cpu"), **kw)
    return run(dec, prompts, max_gen_len), dec


DRAFTS = {
    "ngram": lambda: NgramDraft(),
    "target itself": lambda: ModelDraft(draft_model(tiny_model(ARGS, seed=0))),
    "unrelated model": lambda: ModelDraft(draft_model(tiny_model(ARGS, seed=7))),
    "target in int8": lambda: ModelDraft(draft_model(quantize_model(tiny_model(ARGS, seed=0), QuantSpec(8)))),
}


@pytest.mark.parametrize("name", list(DRAFTS))
def test_greedy_equals_plain_greedy(name: str) -> None:
    want, plain = plain_greedy()
    got, dec = speculative(DRAFTS[name](), temperature=0)
    assert got == want
    assert dec.produced == sum(len(t) for t in want) - len(want)  # every token after the prefill's first
    if name == "target itself":  # every draft kept: K + 1 tokens a pass, until the limits
        assert dec.tokens_per_pass > K
    print(f"{name}: {dec.tokens_per_pass:.2f} tokens per pass")


class WrongDraft(NgramDraft):
    """Drafts K tokens that are never the target's: each is the reference greedy token + 1."""

    def __init__(self, reference: list[list[int]]):
        super().__init__()
        self.reference = {tuple(p): r for p, r in zip(PROMPTS, reference)}

    def propose(self, seqs, k, decoder):
        from llama_offload.generate.speculative import Proposal

        out = []
        for s, ki in zip(seqs, k):
            ref = self.reference[tuple(s.prompt)][len(s.tokens) : len(s.tokens) + ki]
            out.append(Proposal([(t + 1) % ARGS.vocab_size for t in ref]))
        return out


def test_greedy_when_every_draft_is_rejected() -> None:
    want, _ = plain_greedy()
    got, dec = speculative(WrongDraft(want), temperature=0)
    assert got == want
    assert dec.tokens_per_pass == 1.0  # one token a pass: the target's own


def test_greedy_through_the_packed_blocks_equals_plain_greedy() -> None:
    packed = offload(tiny_model(ARGS, seed=0), max_batch_size=ARGS.max_batch_size, max_seq_len=ARGS.max_seq_len,
                     device="cpu")
    want, _ = plain_greedy()
    got, dec = speculative(NgramDraft(), model=packed, temperature=0)
    assert got == want and len(dec.caches) == ARGS.n_layers


def test_stop_tokens_and_limits_cut_where_plain_decoding_does() -> None:
    want, _ = plain_greedy(max_gen_len=9)
    stop = {want[1][3]}  # a token the second sequence produces: it must stop right there
    plain = BatchDecoder(target(), max_batch_size=3, max_seq_len=64, device=torch.device("cpu"), temperature=0)
    seqs = plain.join(PROMPTS, 9, stop)
    while plain.active:
        plain.step()
    spec = SpeculativeDecoder(target(), ModelDraft(draft_model(tiny_model(ARGS, seed=0))), num_draft_tokens=K,
                              max_batch_size=3, max_seq_len=64, device=torch.device("cpu"), temperature=0)
    got = spec.join(PROMPTS, 9, stop)
    while spec.active:
        spec.step()
    assert [s.tokens for s in got] == [s.tokens for s in seqs]
    assert len(got[1].tokens) == 3


def test_rollback_leaves_the_caches_of_a_run_that_never_saw_the_rejected_tokens() -> None:
    prompt = [PROMPTS[2]]
    want, plain = plain_greedy(prompt, 24)
    draft = ModelDraft(draft_model(tiny_model(ARGS, seed=7)))  # mostly rejected
    got, spec = speculative(draft, prompt, 24, temperature=0)
    assert got == want
    for a, b in zip(kv_caches(plain.model), kv_caches(spec.model)):
        for x, y in ((a.k, b.k), (a.v, b.v)):
            assert torch.allclose(x[0], y[0], atol=1e-5, rtol=1e-5)  # same keys and values where written
            assert torch.equal(x[0] == 0, y[0] == 0)  # and zeros (never written, or rolled back) at the same places
    # The draft's own cache holds only what it was fed and kept: nothing past the sequence's fed tokens.
    fed = len(prompt[0]) + len(got[0]) - 1
    for c in draft.caches:
        assert not c.k[0, fed:].any() and not c.v[0, fed:].any()


def test_rollback_with_an_n_gram_draft() -> None:
    want, plain = plain_greedy(PROMPTS[:1], 24)
    got, spec = speculative(NgramDraft(), PROMPTS[:1], 24, temperature=0)
    assert got == want
    for a, b in zip(kv_caches(plain.model), kv_caches(spec.model)):
        assert torch.allclose(a.k[0], b.k[0], atol=1e-5) and torch.equal(a.k[0] == 0, b.k[0] == 0)


def test_sampling_runs_and_keeps_its_limits() -> None:
    got, dec = speculative(ModelDraft(draft_model(tiny_model(ARGS, seed=0))), temperature=0.8, top_p=0.9, seed=3)
    assert [len(t) for t in got] == [20, 20, 20]
    assert all(0 <= t < ARGS.vocab_size for seq in got for t in seq)
    assert dec.tokens_per_pass > 1  # the same model drafts: most tokens are kept


# --- the acceptance rules ------------------------------------------------------------------------------------


def test_accept_greedy() -> None:
    assert accept_greedy([3, 4, 5, 6], [3, 4, 9]) == [3, 4, 5]
    assert accept_greedy([3, 4, 5, 6], [3, 4, 5]) == [3, 4, 5, 6]
    assert accept_greedy([7], []) == [7]
    assert accept_greedy([1, 2], [0]) == [1]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Critical value of chi-square with 5 degrees of freedom (vocabulary of 6) at p = 0.001.
CHI2_5_DOF_P001 = 20.52


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_draws_from_the_target(k: int) -> None:
    """First token of the output over many trials: distributed as the target's p_0, whatever the draft q."""
    g = torch.Generator().manual_seed(0)
    vocab, trials = 6, 20000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, dim=-1)  # (k + 1, vocab)
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, dim=-1)  # (k, vocab)
    firsts, seconds = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        drafted = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        out = accept_sampled(p, q, drafted, g)
        firsts[out[0]] += 1
        if len(out) > 1:  # the first drafted token was kept: the second is the target's p_1 (context-free here)
            seconds[out[1]] += 1
    assert chi_square(firsts, p[0]) < CHI2_5_DOF_P001, firsts / trials
    assert chi_square(seconds, p[1]) < CHI2_5_DOF_P001, seconds / seconds.sum()


def test_a_point_mass_draft_is_the_n_gram_case() -> None:
    g = torch.Generator().manual_seed(1)
    vocab, trials = 6, 20000
    p = torch.softmax(torch.randn(2, vocab, generator=g), dim=-1)
    q = torch.zeros(1, vocab)
    q[0, 2] = 1.0  # the drafted token is always 2
    counts = torch.zeros(vocab)
    for _ in range(trials):
        counts[accept_sampled(p, q, [2], g)[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_5_DOF_P001


def test_filtered_probs_is_what_top_p_sampling_draws_from() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    f = filtered_probs(logits, 1.0, 0.8)
    probs = torch.softmax(logits, -1)[0]
    # the nucleus: the fewest top tokens whose mass reaches 0.8
    keep = (probs.sort(descending=True).values.cumsum(0) - probs.sort(descending=True).values) <= 0.8
    assert int((f > 0).sum()) == int(keep.sum())
    assert torch.allclose(f.sum(), torch.tensor(1.0))
    assert torch.equal(filtered_probs(logits, 1.0, 1.0), torch.softmax(logits, -1))


def test_ngram_lookup() -> None:
    d = NgramDraft(max_n=3)
    assert d.lookup([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]  # the latest earlier "1 2 3" is followed by 4 1
    assert d.lookup([1, 2, 3, 4, 9, 3], 3) == [4, 9, 3]  # falls back to the 1-gram "3"
    assert d.lookup([1, 2, 3], 4) == []
    assert d.lookup([5, 5], 0) == []
    with pytest.raises(ValueError, match="min_n"):
        NgramDraft(max_n=1, min_n=2)


def test_num_draft_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpeculativeDecoder(target(), NgramDraft(), num_draft_tokens=0, max_batch_size=3, max_seq_len=64,
                           device=torch.device("cpu"))


def test_the_indexed_ngram_lookup_equals_the_scan() -> None:
    import random

    rng = random.Random(0)
    d = NgramDraft(max_n=3)
    for trial in range(20):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        d.join([Decoding(0, [], 0, frozenset())])  # a fresh index for row 0
        for end in range(1, len(tokens) + 1):  # the sequence grows token by token, as it does while decoding
            assert d._indexed_lookup(0, tokens[:end], 4) == d.lookup(tokens[:end], 4), (trial, end)


def test_a_long_prompt_joins_while_another_sequence_drafts() -> None:
    """The draft catches a long prompt up in chunks beside a running sequence's few tokens, near the end of the
    cache: each sequence still gets what plain greedy decoding gives it alone."""
    long_prompt = (PROMPTS[2] * 3)[:40]
    alone = [plain_greedy([p], 20)[0][0] for p in (PROMPTS[0], long_prompt)]
    spec = SpeculativeDecoder(target(), ModelDraft(draft_model(tiny_model(ARGS, seed=0)), prefill_chunk=3),
                              num_draft_tokens=K, max_batch_size=3, max_seq_len=64, device=torch.device("cpu"),
                              temperature=0, prefill_chunk=3)
    (a,) = spec.join([PROMPTS[0]], 20, NO_STOP)
    spec.step()
    spec.step()
    (b,) = spec.join([long_prompt], 20, NO_STOP)
    while spec.active:
        spec.step()
    assert [a.tokens, b.tokens] == alone
