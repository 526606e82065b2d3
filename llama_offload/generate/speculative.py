"""Speculative decoding: several drafted tokens checked in one pass of the (paged) target model.

A paged decode step costs the time to stream the weights once, whatever the number of positions it scores. So a
draft proposes up to K tokens per sequence, one target pass scores them all (``Step`` of K + 1 positions per row,
each row at its own position), and each sequence keeps the longest prefix the target agrees with, plus one token
of the target's own: 1 to K + 1 tokens per pass instead of 1.

Drafts (``Draft``): ``NgramDraft`` copies what followed the latest earlier occurrence of the last tokens (prompt
lookup: no model); ``ModelDraft`` runs a small model with KV caches of its own (a separate checkpoint, or the
target itself quantized to int4/int8 and kept resident).

Acceptance, per drafted token x_j with target distribution p_j and draft distribution q_j (both after temperature
and top_p, so the nucleus is the same rule on both sides):
- greedy: keep x_j while it is the target's argmax; the first disagreement is replaced by the argmax. The output
  is token for token plain greedy decoding of the target.
- sampling: keep x_j with probability min(1, p_j(x_j) / q_j(x_j)); on the first rejection sample from the
  normalised max(0, p_j - q_j); if every token is kept, sample one more from p_K. The output is distributed
  exactly as the target's (Leviathan et al. 2023, Chen et al. 2023). An n-gram draft is a point mass (q = 1 at x_j).

Rejected positions are rolled back: their keys and values are zeroed in both models' caches, so the caches hold
what a run that never saw them holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

from llama_offload.generate.decode import BatchDecoder, Decoding, Sampling, StepModel
from llama_offload.model.step import make_step, to_device
from llama_offload.model.transformer import KVCache

# Measured (BENCHMARKS.md, bench_speculative.py): best or near-best tokens/s for every draft on the default model,
# and for the int4 self-draft projected onto a paged 7B.
DEFAULT_DRAFT_TOKENS = 8


@dataclass
class Proposal:
    tokens: list[int]  # drafted continuation, possibly empty
    probs: Optional[torch.Tensor] = None  # (len(tokens), vocab) the draft's distributions; None: point masses


class Draft(Protocol):
    def join(self, seqs: Sequence[Decoding]) -> None: ...

    def propose(self, seqs: Sequence[Decoding], k: Sequence[int], decoder: "SpeculativeDecoder") -> list[Proposal]: ...

    def accepted(self, seq: Decoding, kept: int) -> None: ...


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to the top-p nucleus, renormalised
    (the tokens ``decode.sample_top_p`` can return, with the probabilities it gives them). (..., vocab)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # tokens after the nucleus is already complete
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafted: Sequence[int],
                   generator: Optional[torch.Generator]) -> list[int]:
    """The speculative sampling rule for one sequence. ``p``: (k + 1, vocab) target distributions at the k drafted
    positions and the one after; ``q``: (k, vocab) the draft's. Returns the tokens kept plus the one sampled."""
    k = len(drafted)
    if k:
        x = torch.tensor(drafted, device=p.device)
        ratio = p[:k].gather(-1, x[:, None])[:, 0] / q.gather(-1, x[:, None])[:, 0]  # (k,)
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u >= ratio).tolist()  # u < min(1, p/q): kept
        for j, r in enumerate(rejected):
            if r:
                residual = (p[j] - q[j]).clamp_min(0.0)
                total = residual.sum()
                # p == q on this token's support leaves nothing: then p itself is the residual's limit.
                residual = residual / total if total > 0 else p[j]
                token = int(torch.multinomial(residual, 1, generator=generator))
                return list(drafted[:j]) + [token]
    return list(drafted) + [int(torch.multinomial(p[k], 1, generator=generator))]


def accept_greedy(target_argmax: Sequence[int], drafted: Sequence[int]) -> list[int]:
    """Greedy: the drafted tokens up to the first that is not the target's argmax, then the target's argmax there."""
    kept = 0
    while kept < len(drafted) and drafted[kept] == target_argmax[kept]:
        kept += 1
    return list(drafted[:kept]) + [target_argmax[kept]]


def kv_caches(model: torch.nn.Module) -> list:
    """Every block's KV cache in a model (plain or offloaded): KVCache objects hang off the attention modules."""
    found = []
    for m in model.modules():
        cache = getattr(m, "cache", None)
        if isinstance(cache, KVCache) and all(cache is not c for c in found):
            found.append(cache)
    return found


def zero_positions(caches: list, spans: Sequence[tuple[int, int, int]]) -> None:
    """Zero keys and values at positions [start, end) of row ``row`` for each (row, start, end): one indexed fill
    per cache tensor, whatever the number of rows."""
    spans = [(r, a, b) for r, a, b in spans if b > a]
    if not caches or not spans:
        return
    positions = caches[0].k.shape[1]
    flat = [r * positions + p for r, a, b in spans for p in range(a, min(b, positions))]
    if not flat:
        return
    index = {}  # one per device: the CPU lane's blocks keep their caches in host memory too (kv_mirror.py)
    for part in (part for cache in caches for part in cache.parts()):
        device = part.k.device
        if device not in index:
            index[device] = to_device(flat, device)
        for t in (part.k, part.v):
            t.view(-1, *t.shape[2:]).index_fill_(0, index[device], 0)


def _tokens_from(seq: Decoding, start: int) -> list[int]:
    """The sequence's tokens (prompt, then output) from index ``start`` on, without copying the rest."""
    n = len(seq.prompt)
    return seq.tokens[start - n :] if start >= n else seq.prompt[start:] + seq.tokens


class NgramDraft:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n from ``max_n`` down to ``min_n``), searched in its prompt and output.

    Each sequence keeps an index from every n-gram seen to where it last started, extended by the tokens added
    since the previous pass: a lookup costs the same at 100 or 100,000 tokens of context."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, found min_n={min_n}, max_n={max_n}.")
        self.max_n, self.min_n = max_n, min_n
        self.index: dict[int, tuple[dict[int, dict[tuple[int, ...], int]], list[int]]] = {}
        self.seen: dict[int, list[int]] = {}  # row -> its sequence's tokens so far, extended each pass

    def join(self, seqs: Sequence[Decoding]) -> None:
        for s in seqs:
            self.index[s.row] = self._empty_index()
            self.seen[s.row] = list(s.prompt)

    def _empty_index(self) -> tuple[dict[int, dict[tuple[int, ...], int]], list[int]]:
        # per n: n-gram -> where it last started; and per n, the first start not indexed yet
        return {n: {} for n in range(self.min_n, self.max_n + 1)}, [0] * (self.max_n + 1)

    def accepted(self, seq: Decoding, kept: int) -> None:
        pass

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """The draft for ``tokens`` from scratch (no index): what ``propose`` gives, for one sequence."""
        if k <= 0:
            return []
        n_tokens = len(tokens)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            pattern = list(tokens[n_tokens - n :])
            for start in range(n_tokens - n - 1, -1, -1):  # latest first; not the suffix itself
                if list(tokens[start : start + n]) == pattern:
                    return list(tokens[start + n : start + n + k])
        return []

    def _indexed_lookup(self, row: int, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        grams, done = self.index.setdefault(row, self._empty_index())
        n_tokens = len(tokens)
        for n in grams:  # index every n-gram that has a token after it: the suffix itself never is
            for start in range(done[n], n_tokens - n):
                grams[n][tuple(tokens[start : start + n])] = start
            done[n] = max(done[n], n_tokens - n)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            start = grams[n].get(tuple(tokens[n_tokens - n :]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []

    def propose(self, seqs: Sequence[Decoding], k: Sequence[int], decoder: "SpeculativeDecoder") -> list[Proposal]:
        out = []
        for s, ki in zip(seqs, k):
            seen = self.seen.setdefault(s.row, list(s.prompt))
            seen += s.tokens[len(seen) - len(s.prompt) :]  # only what the last pass added
            out.append(Proposal(self._indexed_lookup(s.row, seen, ki)))
        return out


class ModelDraft:
    """A draft model with KV caches of its own (rows shared with the target's). ``cached[row]``: how many leading
    tokens of that row's sequence the draft's cache holds; the rest are fed (caught up) before it drafts."""

    def __init__(self, model: StepModel, *, prefill_chunk: int = 2048):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.caches = kv_caches(model)  # type: ignore[arg-type]
        self.cached: dict[int, int] = {}
        self.fed: dict[int, int] = {}  # row -> drafted tokens the draft fed itself this pass (all but its last)
        self.written: dict[int, int] = {}  # row -> one past the highest position the draft wrote

    def join(self, seqs: Sequence[Decoding]) -> None:
        for s in seqs:
            zero_positions(self.caches, [(s.row, 0, self.written.get(s.row, 0))])  # what an earlier sequence left
            self.cached[s.row] = 0
            self.written[s.row] = 0

    def _feed(self, seqs: Sequence[Decoding], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """Draft steps over rows ``seqs`` only, each fed its own tokens from its own start position; logits
        (len(seqs), vocab) at each row's last fed token. One step per run of consecutive rows (``row0``), so rows
        outside ``seqs``, whose caches hold running sequences, are never written. Within a run rows are padded to
        the longest (harmless: a pad writes past the row's end, where nothing is attended before it is
        overwritten)."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].row)
        runs: list[list[int]] = []
        for i in order:
            if runs and seqs[runs[-1][-1]].row + 1 == seqs[i].row:
                runs[-1].append(i)
            else:
                runs.append([i])
        out: list[Optional[torch.Tensor]] = [None] * len(seqs)
        for run in runs:
            width = max(len(chunks[i]) for i in run)
            feed = [list(chunks[i]) + [0] * (width - len(chunks[i])) for i in run]
            for i in run:
                self.written[seqs[i].row] = max(self.written.get(seqs[i].row, 0), starts[i] + width)
            logits = self.model.step(make_step(to_device(feed, self.device), [starts[i] for i in run],
                                               max_positions=self.model.max_positions, row0=seqs[run[0]].row,
                                               last=[len(chunks[i]) - 1 for i in run]))  # (len(run), vocab)
            for j, i in enumerate(run):
                out[i] = logits[j]
        return torch.stack(out)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.caches[0].k.device

    def propose(self, seqs: Sequence[Decoding], k: Sequence[int], decoder: "SpeculativeDecoder") -> list[Proposal]:
        drafting = [(s, ki) for s, ki in zip(seqs, k) if ki > 0]
        out = {s.row: Proposal([]) for s in seqs}
        if not drafting:
            return [out[s.row] for s in seqs]
        # Catch up: every known token not yet in the draft's cache; the last one's logits draft x1. Running
        # sequences have a few (the tokens kept last pass) and go together: padded to the longest, they stay within
        # the K + 1 extra positions of the draft's cache. A prompt goes alone, in chunks, so no row is padded far
        # past its own length.
        todo = {s.row: _tokens_from(s, self.cached[s.row]) for s, _ in drafting}
        short = max(ki for _, ki in drafting) + 1
        groups = [[s] for s, _ in drafting if len(todo[s.row]) > short]
        groups.append([s for s, _ in drafting if 0 < len(todo[s.row]) <= short])
        logits: dict[int, torch.Tensor] = {}
        for group in groups:
            while live := [s for s in group if todo[s.row]]:
                chunks = [todo[s.row][: self.prefill_chunk] for s in live]
                got = self._feed(live, chunks, [self.cached[s.row] for s in live])
                for i, (s, c) in enumerate(zip(live, chunks)):
                    self.cached[s.row] += len(c)
                    todo[s.row] = todo[s.row][len(c) :]
                    logits[s.row] = got[i]
        for s, ki in zip(seqs, k):
            self.fed[s.row] = max(ki - 1, 0)
        drafted: dict[int, list[int]] = {s.row: [] for s, _ in drafting}
        probs: dict[int, list[torch.Tensor]] = {s.row: [] for s, _ in drafting}
        for j in range(max(ki for _, ki in drafting)):
            live = [s for s, ki in drafting if j < ki]
            step_logits = torch.stack([logits[s.row] for s in live])  # (len(live), vocab)
            if any(s.sampling is not None for s in live):  # requests with their own sampling: row by row
                tokens = []
                for i, s in enumerate(live):
                    temperature, top_p, _ = decoder.sampling_of(s)
                    if temperature > 0:
                        qi = filtered_probs(step_logits[i : i + 1], temperature, top_p)[0]  # (vocab,)
                        tokens.append(int(torch.multinomial(qi, 1, generator=decoder.draft_generator)))
                        probs[s.row].append(qi)
                    else:
                        tokens.append(int(step_logits[i].argmax()))
            elif decoder.temperature > 0:
                q = filtered_probs(step_logits, decoder.temperature, decoder.top_p)
                tokens = torch.multinomial(q, 1, generator=decoder.draft_generator)[:, 0].tolist()
                for s, qi in zip(live, q):
                    probs[s.row].append(qi)
            else:
                tokens = step_logits.argmax(-1).tolist()
            for s, t in zip(live, tokens):
                drafted[s.row].append(t)
            more = [s for s, ki in drafting if j + 1 < ki]
            if more:  # the draft's next position: its own token fed back
                got = self._feed(more, [[drafted[s.row][-1]] for s in more],
                                 [len(s.prompt) + len(s.tokens) + j for s in more])
                for i, s in enumerate(more):
                    logits[s.row] = got[i]
        for s, _ in drafting:
            p = torch.stack(probs[s.row]) if probs[s.row] else None
            out[s.row] = Proposal(drafted[s.row], p)
        return [out[s.row] for s in seqs]

    def accepted(self, seq: Decoding, kept: int) -> None:
        """``kept`` drafted tokens were kept: those the draft fed itself (all but its last) stay cached; positions
        past them are zeroed, as if the draft had never seen the rejected ones."""
        known = len(seq.prompt) + len(seq.tokens)  # after this pass's tokens were appended
        self.cached[seq.row] = min(self.cached[seq.row] + min(kept, self.fed.get(seq.row, 0)), known)
        self.fed[seq.row] = 0
        written = self.written.get(seq.row, 0)
        zero_positions(self.caches, [(seq.row, self.cached[seq.row], written)])
        self.written[seq.row] = self.cached[seq.row]


class SpeculativeDecoder(BatchDecoder):
    """``BatchDecoder`` whose decode pass verifies up to ``num_draft_tokens`` drafted tokens per sequence.
    ``passes`` counts target decode passes; ``produced`` the tokens they gave and ``scored`` the sequences they
    scored, so ``tokens_per_pass`` is per sequence: mean drafts kept + 1."""

    def __init__(self, model: StepModel, draft: Draft, *, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, **kw):
        super().__init__(model, **kw)
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be at least 1, found {num_draft_tokens}.")
        self.draft = draft
        self.num_draft_tokens = num_draft_tokens
        self.draft_generator = torch.Generator(self.device).manual_seed(self.generator.initial_seed() + 1)
        self.caches = kv_caches(model)  # type: ignore[arg-type]
        self.passes = 0
        self.scored = 0
        self.produced = 0

    @property
    def tokens_per_pass(self) -> float:
        return self.produced / self.scored if self.scored else 0.0

    def join(self, prompts: Sequence[Sequence[int]], max_gen_len: int, stop_ids: set[int],
             sampling: Optional[Sequence[Optional[Sampling]]] = None) -> list[Decoding]:
        joined = super().join(prompts, max_gen_len, stop_ids, sampling)
        self.draft.join(joined)
        return joined

    def step(self) -> list[tuple[Decoding, int]]:
        active = self.active
        if not active:
            return []
        positions = self.model.max_positions
        # Drafted tokens per sequence: at most K, never past its own limit (one token always comes from the
        # target), and the pass's width must fit every row's cache.
        room = min(positions - s.position for s in active)
        k = [max(0, min(self.num_draft_tokens, s.limit - len(s.tokens) - 1, room - 1)) for s in active]
        proposals = self.draft.propose(active, k, self)
        width = 1 + max(len(p.tokens) for p in proposals)
        n = max(s.row for s in active) + 1
        feed, starts = [[0] * width for _ in range(n)], [0] * n
        for s, prop in zip(active, proposals):
            row = [s.tokens[-1]] + prop.tokens
            feed[s.row] = row + [0] * (width - len(row))
            starts[s.row] = s.position
        tokens = to_device(feed, self.device)  # (n, width)
        logits = self.model.step(make_step(tokens, starts, max_positions=positions))  # (n, width, vocab)
        rows = to_device([s.row for s in active], logits.device)
        logits = logits[rows]  # (len(active), width, vocab)
        how = [self.sampling_of(s) for s in active]  # (temperature, top_p, generator) per sequence
        sampled = [i for i, (temperature, _, _) in enumerate(how) if temperature > 0]
        p: dict[int, torch.Tensor] = {}
        if sampled and all(s.sampling is None for s in active):  # one setting for all: one call
            p = dict(enumerate(filtered_probs(logits, self.temperature, self.top_p)))  # (width, vocab) each
        for i in sampled:
            if i not in p:
                p[i] = filtered_probs(logits[i : i + 1], how[i][0], how[i][1])[0]  # (width, vocab)
        argmax = logits.argmax(-1).tolist() if len(sampled) < len(active) else None  # (len(active), width)
        lps = torch.log_softmax(logits.float(), dim=-1) if self.logprobs else None
        self.passes += 1
        self.scored += len(active)
        out: list[tuple[Decoding, int]] = []
        spans = []
        for i, (s, prop) in enumerate(zip(active, proposals)):
            k_i = len(prop.tokens)
            if i in p:
                q = prop.probs
                if q is None:  # a point mass on each drafted token
                    q = torch.zeros(k_i, p[i].shape[-1], device=p[i].device)
                    if k_i:
                        q.scatter_(-1, torch.tensor(prop.tokens, device=p[i].device)[:, None], 1.0)
                new = accept_sampled(p[i][: k_i + 1], q.to(p[i].device), prop.tokens, how[i][2])
            else:
                assert argmax is not None
                new = accept_greedy(argmax[i][: k_i + 1], prop.tokens)
            start = s.position  # position of the token fed first; new[j] is scored at start + j
            kept_drafts = len(new) - 1
            for j, token in enumerate(new):
                if token in s.stop_ids:
                    s.done = True
                    break
                s.tokens.append(token)
                if lps is not None:
                    s.logprobs.append(float(lps[i, j, token]))
                out.append((s, token))
                self.produced += 1
                if len(s.tokens) >= s.limit:
                    s.done = True
                    break
            # Positions written this pass: start .. start + width - 1. Those past the last kept token are rolled
            # back (the last new token itself is not in the cache yet: the next pass feeds it).
            spans.append((s.row, start + 1 + kept_drafts, start + width))
            self.draft.accepted(s, kept_drafts)
        zero_positions(self.caches, spans)
        return out
