"""Sequences decoding together, each at its own position, in the rows of one KV cache.

``BatchDecoder`` is the loop every generation path shares. A sequence joins in a free cache row: its prompt
is prefilled (in chunks of ``prefill_chunk`` positions, so activation memory stays bounded however long the
prompt) and its first token sampled. Each ``step`` then runs one decode pass over every active sequence,
each at its own position: sequences of different lengths need no padding steps, one that stops frees its row,
and a new one can join between two steps. Greedy output per sequence equals decoding it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from llama_offload.model.step import Step, make_step, to_device


class StepModel(Protocol):
    max_positions: int

    def step(self, step: Step) -> torch.Tensor: ...


# Top-p looks first at this many most likely tokens: a full sort of a 49k-128k vocabulary took 12.8 ms a step at
# batch 4 on a 2-core CPU (a third of the default model's step there), where a nucleus of p = 0.9 rarely holds more
# than a few hundred tokens. Where it does not fit, the whole vocabulary is sorted as before.
TOP_P_CANDIDATES = 1024


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probabilities add up to more than ``p`` (Meta's rule).

    Where the nucleus lies among the ``TOP_P_CANDIDATES`` most likely tokens, only those are sorted, and the draw
    is torch.multinomial's own (one Exp(1) variate per vocabulary entry, the argmax of probability over variate),
    made over the full row so that it consumes the generator exactly as multinomial over the sorted vocabulary
    does: the tokens and the generator's next state are the same as with the full sort."""
    if probs.shape[-1] > TOP_P_CANDIDATES:
        top, idx = torch.topk(probs, TOP_P_CANDIDATES, dim=-1)  # (bs, candidates), descending
        if bool((top.sum(dim=-1) > p).all()):  # the first token left out would be past every nucleus
            kept = _nucleus(top, p)
            q = torch.empty_like(probs).exponential_(1, generator=generator)  # (bs, vocab), as multinomial draws
            choice = (kept / q[:, :TOP_P_CANDIDATES]).argmax(dim=-1, keepdim=True)  # (bs, 1)
            return torch.gather(idx, -1, choice)  # (bs, 1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bs, vocab)
    next_token = torch.multinomial(_nucleus(probs_sort, p), num_samples=1, generator=generator)  # (bs, 1)
    return torch.gather(probs_idx, -1, next_token)  # (bs, 1)


def _nucleus(probs_sort: torch.Tensor, p: float) -> torch.Tensor:
    """Sorted probabilities with the tokens past the nucleus zeroed, renormalised (in place)."""
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens after the nucleus is already complete
    probs_sort[mask] = 0.0
    return probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))


@dataclass(frozen=True)
class Sampling:
    """One sequence's own sampling, where it differs from its decoder's (a server's requests each bring theirs).
    ``temperature`` 0 is greedy; ``seed`` None draws from the decoder's generator.

    The logit adjustments are OpenAI's, applied before temperature and top-p: a token already generated n times
    loses ``presence_penalty`` (once, n > 0) and ``frequency_penalty * n``; ``logit_bias`` adds its value to the
    token's logit. ``logprobs`` records each chosen token's log-probability and ``top_logprobs`` the most likely
    alternatives (both of the model's own distribution, before any adjustment)."""

    temperature: float
    top_p: float = 1.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Decoding:
    """One sequence's state. ``tokens`` excludes the stop token that ended it, as Meta's output does."""

    row: int
    prompt: list[int]
    limit: int  # most new tokens
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # of prompt tokens 1.., when echoing
    done: bool = False
    sampling: Optional[Sampling] = None  # None: the decoder's temperature, top_p and generator
    generator: Optional[torch.Generator] = None  # this sequence's own, when its sampling has a seed
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when sampling asks
    counts: Optional[torch.Tensor] = None  # (vocab,) times each token was generated, when sampling penalizes

    @property
    def position(self) -> int:
        """Where the last token sits: the next decode pass feeds it there."""
        return len(self.prompt) + len(self.tokens) - 1


class BatchDecoder:
    def __init__(self, model: StepModel, *, max_batch_size: int, max_seq_len: int, device: torch.device,
                 temperature: float = 0.6, top_p: float = 0.9, seed: int = 1, prefill_chunk: int = 2048,
                 logprobs: bool = False, echo_logprobs: bool = False):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = device
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator(device).manual_seed(seed)
        self.prefill_chunk = prefill_chunk
        self.logprobs = logprobs or echo_logprobs
        self.echo_logprobs = echo_logprobs
        self.rows: list[Optional[Decoding]] = [None] * max_batch_size

    @property
    def active(self) -> list[Decoding]:
        return [s for s in self.rows if s is not None and not s.done]

    def free_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.rows) if s is None or s.done]

    def sampling_of(self, seq: Decoding) -> tuple[float, float, torch.Generator]:
        """(temperature, top_p, generator) for ``seq``: its own where it has them, else the decoder's."""
        if seq.sampling is None:
            return self.temperature, self.top_p, self.generator
        return seq.sampling.temperature, seq.sampling.top_p, seq.generator or self.generator

    def join(self, prompts: Sequence[Sequence[int]], max_gen_len: int, stop_ids: set[int],
             sampling: Optional[Sequence[Optional[Sampling]]] = None) -> list[Decoding]:
        """Prefill ``prompts`` into free rows and sample each one's first token (see ``Decoding.tokens``);
        ``sampling``: per prompt, its own sampling (None: the decoder's)."""
        free = self.free_rows()
        if len(prompts) > len(free):
            raise ValueError(f"{len(prompts)} sequences cannot join: {len(free)} of {self.max_batch_size} rows are "
                             "free. Wait for running ones to finish, or build with a larger max_batch_size.")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"Prompt {i} is empty: it has no tokens. Give it some text.")
            if len(p) >= self.max_seq_len:
                raise ValueError(f"Prompt {i} is {len(p)} tokens long, but max_seq_len is {self.max_seq_len} and at "
                                 "least one position must be left to generate into. Shorten the prompt or build "
                                 "with a larger max_seq_len.")
        sampling = list(sampling) if sampling is not None else [None] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling settings: give one per prompt.")
        for i, sm in enumerate(sampling):
            bad = [t for t, _ in (sm.logit_bias if sm is not None else ()) if t < 0]
            if bad:
                raise ValueError(f"Sequence {i}: logit_bias names token ids {bad[:5]}; ids are 0 or more.")
        joined = [Decoding(row, list(p), min(max_gen_len, self.max_seq_len - len(p)), frozenset(stop_ids),
                           sampling=sm, generator=_own_generator(sm, self.device))
                  for row, p, sm in zip(free, prompts, sampling)]
        for seq in joined:
            self.rows[seq.row] = seq
        try:
            for run in _contiguous(joined):
                self._prefill(run)
        except BaseException:  # a failed prefill gives its rows back: the running sequences go on without them
            for seq in joined:
                self.rows[seq.row] = None
            raise
        return joined

    def _prefill(self, run: list[Decoding]) -> None:
        """One batch of prompts in contiguous rows, chunk by chunk; then each one's first token."""
        lengths = [len(s.prompt) for s in run]
        longest = max(lengths)
        last_logits = None
        for c0 in range(0, longest, self.prefill_chunk):
            c1 = min(longest, c0 + self.prefill_chunk)
            ids = [(s.prompt[c0:c1] + [0] * (c1 - c0))[: c1 - c0] for s in run]  # pad with any valid id
            tokens = to_device(ids, self.device)  # (bs, chunk)
            ends = [min(max(n - 1 - c0, 0), c1 - c0 - 1) for n in lengths]  # each prompt's last index in the chunk
            if self.echo_logprobs:
                logits = self.model.step(make_step(tokens, c0, max_positions=self.model.max_positions,
                                                   row0=run[0].row))  # (bs, chunk, vocab)
                self._prompt_logprobs(run, logits, c0)
                chunk_last = logits[torch.arange(len(run), device=logits.device),
                                    to_device(ends, logits.device)]  # (bs, vocab)
            else:
                chunk_last = self.model.step(make_step(tokens, c0, max_positions=self.model.max_positions,
                                                       row0=run[0].row, last=ends))  # (bs, vocab)
            here = to_device([[int(c0 <= n - 1 < c1)] for n in lengths], chunk_last.device).bool()  # (bs, 1)
            last_logits = chunk_last if last_logits is None else torch.where(here, chunk_last, last_logits)
        assert last_logits is not None
        self._accept(run, last_logits)

    def _prompt_logprobs(self, run: list[Decoding], logits: torch.Tensor, c0: int) -> None:
        lp = torch.log_softmax(logits, dim=-1)  # (bs, chunk, vocab)
        for i, seq in enumerate(run):
            targets = seq.prompt[c0 + 1 : c0 + logits.shape[1] + 1]  # token j + 1 is scored at position j
            if targets:
                idx = to_device(targets, lp.device)
                seq.prompt_logprobs += lp[i, torch.arange(len(targets), device=lp.device), idx].tolist()

    def step(self) -> list[tuple[Decoding, int]]:
        """One decode pass over rows 0 .. the last active row; returns the (sequence, token) pairs produced.
        Rows without a running sequence are fed a placeholder at position 0 of their own row."""
        active = self.active
        if not active:
            return []
        n = max(s.row for s in active) + 1
        feed, starts = [0] * n, [0] * n
        for s in active:
            feed[s.row], starts[s.row] = s.tokens[-1], s.position
        tokens = to_device([[t] for t in feed], self.device)  # (n, 1)
        logits = self.model.step(make_step(tokens, starts, max_positions=self.model.max_positions,
                                           last=[0] * n))  # (n, vocab)
        rows = to_device([s.row for s in active], logits.device)
        return self._accept(active, logits[rows])

    def _accept(self, seqs: list[Decoding], logits: torch.Tensor) -> list[tuple[Decoding, int]]:
        """Sample one token per sequence from its logits (len(seqs), vocab) and record it."""
        own = [s.sampling for s in seqs if s.sampling is not None]
        if own:
            # Sequences with their own sampling go row by row; penalties and bias touch only their own rows, so
            # the others' tokens are the same as without them.
            adjusted = self._adjusted(seqs, logits) if any(sm.adjusts_logits for sm in own) else logits
            next_token = torch.cat([self._sample(adjusted[i : i + 1], *self.sampling_of(s))
                                    for i, s in enumerate(seqs)])  # (n,)
        else:
            next_token = self._sample(logits, self.temperature, self.top_p, self.generator)  # (n,)
        lps, tops = None, None
        if self.logprobs or any(sm.logprobs for sm in own):
            log_probs = torch.log_softmax(logits, dim=-1)  # (n, vocab): the model's own distribution
            lps = log_probs.gather(-1, next_token[:, None])[:, 0].tolist()
            k = max((sm.top_logprobs for sm in own if sm.logprobs), default=0)
            if k > 0:
                top_v, top_i = torch.topk(log_probs.float(), k, dim=-1)  # (n, k)
                tops = list(zip(top_i.tolist(), top_v.tolist()))
        out = []
        for i, (seq, token) in enumerate(zip(seqs, next_token.tolist())):
            if token in seq.stop_ids:
                seq.done = True
                continue
            seq.tokens.append(token)
            if lps is not None and (self.logprobs or (seq.sampling is not None and seq.sampling.logprobs)):
                seq.logprobs.append(lps[i])
                if tops is not None and seq.sampling is not None and seq.sampling.top_logprobs:
                    ids, values = tops[i]
                    seq.top_logprobs.append(list(zip(ids, values))[: seq.sampling.top_logprobs])
            if seq.counts is not None:
                seq.counts[token] += 1
            seq.done = len(seq.tokens) >= seq.limit
            out.append((seq, token))
        return out

    def _adjusted(self, seqs: list[Decoding], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with each sequence's penalties and bias applied to its own row (a copy; rows of sequences
        without them are left bit for bit as they were)."""
        logits = logits.clone()
        vocab = logits.shape[-1]
        for i, seq in enumerate(seqs):
            sm = seq.sampling
            if sm is None or not sm.adjusts_logits:
                continue
            row = logits[i].float()  # (vocab,)
            if sm.penalizes:
                if seq.counts is None:  # the first token: nothing generated yet, nothing to penalize
                    seq.counts = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
                    for t in seq.tokens:
                        seq.counts[t] += 1
                row -= sm.presence_penalty * (seq.counts > 0) + sm.frequency_penalty * seq.counts
            if sm.logit_bias:
                ids = [t for t, _ in sm.logit_bias]
                if max(ids) >= vocab:
                    raise ValueError(f"logit_bias names token id {max(ids)}, but the vocabulary has {vocab} ids.")
                row[to_device(ids, row.device)] += torch.tensor([b for _, b in sm.logit_bias], device=row.device)
            logits[i] = row.to(logits.dtype)
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator) -> torch.Tensor:
        """(n,) tokens from (n, vocab) logits: nucleus sampling at ``temperature``, or argmax at 0."""
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            return sample_top_p(probs, top_p, generator).reshape(-1)
        return torch.argmax(logits, dim=-1)


def _own_generator(sampling: Optional[Sampling], device: torch.device) -> Optional[torch.Generator]:
    if sampling is None or sampling.seed is None:
        return None
    return torch.Generator(device).manual_seed(sampling.seed)


def _contiguous(seqs: list[Decoding]) -> list[list[Decoding]]:
    """Group sequences into runs of consecutive cache rows: each run is prefilled in one pass."""
    runs: list[list[Decoding]] = []
    for s in sorted(seqs, key=lambda s: s.row):
        if runs and runs[-1][-1].row + 1 == s.row:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs
