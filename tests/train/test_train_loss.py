"""chunked_cross_entropy against F.cross_entropy on the full logits: same loss, same gradients, and never more
than one chunk of logits alive."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llama_offload.train.loss as loss_mod
from llama_offload.train.loss import chunked_cross_entropy

BS, SEQLEN, DIM, VOCAB = 2, 7, 8, 50  # 14 tokens: chunk 5 leaves a remainder, chunk 64 covers all at once
TOKENS = BS * SEQLEN

# fp64 checks are tight (only summation order differs); fp32 uses assert_close's defaults.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: {}}


def _inputs(dtype: torch.dtype, *, w_grad: bool = True, ignore_index: int = -100, n_ignored: int = 4,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(BS, SEQLEN, DIM, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(VOCAB, DIM, generator=g, dtype=dtype) * 0.5).requires_grad_(w_grad)
    t = torch.randint(0, VOCAB, (BS, SEQLEN), generator=g)
    flat = t.view(-1)  # (tokens,)
    flat[torch.randperm(TOKENS, generator=g)[:n_ignored]] = ignore_index
    return h, w, t


def _reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, *, reduction: str,
               ignore_index: int = -100) -> torch.Tensor:
    # fp32 logits for fp32 (the .float() of the spec); fp64 kept in fp64 so the tight check means something.
    logits = F.linear(h, w).to(torch.promote_types(h.dtype, torch.float32))
    return F.cross_entropy(logits.view(-1, VOCAB), t.view(-1), ignore_index=ignore_index, reduction=reduction)


def _grads(loss: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    h.grad = None
    w.grad = None
    loss.backward()
    return h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_matches_full_cross_entropy(dtype: torch.dtype, reduction: str, chunk: int) -> None:
    h, w, t = _inputs(dtype)
    ref = _reference(h, w, t, reduction=reduction)
    ref_gh, ref_gw = _grads(ref, h, w)
    got = chunked_cross_entropy(h, w, t, chunk_tokens=chunk, reduction=reduction)
    assert got.shape == () and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL[dtype])
    gh, gw = _grads(got, h, w)
    torch.testing.assert_close(gh, ref_gh, **TOL[dtype])
    torch.testing.assert_close(gw, ref_gw, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_range_ignore_index(dtype: torch.dtype) -> None:
    # A pad id inside the vocabulary is ignored, as F.cross_entropy does, not scored.
    h, w, t = _inputs(dtype, ignore_index=3)
    assert (t == 3).sum() >= 4
    ref = _reference(h, w, t, reduction="mean", ignore_index=3)
    ref_gh, ref_gw = _grads(ref, h, w)
    got = chunked_cross_entropy(h, w, t, chunk_tokens=3, ignore_index=3)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    gh, gw = _grads(got, h, w)
    torch.testing.assert_close(gh, ref_gh, **TOL[dtype])
    torch.testing.assert_close(gw, ref_gw, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_head(dtype: torch.dtype) -> None:
    h, w, t = _inputs(dtype, w_grad=False)
    ref_gh, _ = _grads(_reference(h, w, t, reduction="mean"), h, w)
    gh, gw = _grads(chunked_cross_entropy(h, w, t, chunk_tokens=4), h, w)
    assert gw is None and w.grad is None
    torch.testing.assert_close(gh, ref_gh, **TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(reduction: str) -> None:
    h, w, t = _inputs(torch.float32, n_ignored=TOKENS)
    assert (t == -100).all()
    got = chunked_cross_entropy(h, w, t, chunk_tokens=4, reduction=reduction)
    assert got.requires_grad and got.item() == 0.0
    gh, gw = _grads(got, h, w)
    assert not gh.isnan().any() and not gw.isnan().any()
    assert (gh == 0).all() and (gw == 0).all()


def test_no_tokens() -> None:
    h = torch.randn(0, DIM, requires_grad=True)
    w = torch.randn(VOCAB, DIM, requires_grad=True)
    got = chunked_cross_entropy(h, w, torch.empty(0, dtype=torch.long))
    got.backward()
    assert got.item() == 0.0 and h.grad.shape == (0, DIM) and (w.grad == 0).all()


def test_never_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w, t = _inputs(torch.float32)
    chunk = 4
    calls: list[tuple[str, tuple[int, ...]]] = []
    phase = ["forward"]
    real_linear = F.linear

    def recording_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = real_linear(x, weight, bias)
        calls.append((phase[0], tuple(out.shape)))
        return out

    monkeypatch.setattr(loss_mod.F, "linear", recording_linear)
    saved: list[tuple[int, ...]] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = chunked_cross_entropy(h, w, t, chunk_tokens=chunk)
    phase[0] = "backward"
    loss.backward()

    n_chunks = math.ceil(TOKENS / chunk)
    for p in ("forward", "backward"):
        shapes = [s for q, s in calls if q == p]
        assert len(shapes) == n_chunks, (p, shapes)
        assert all(s[0] <= chunk and s[1] == VOCAB for s in shapes), (p, shapes)
    # What waits for backward is h, the weight and per-token vectors: nothing of size tokens x vocab.
    assert saved and all(math.prod(s) < TOKENS * VOCAB for s in saved), saved


def test_autocast_cpu_bf16() -> None:
    h, w, t = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, t, reduction="mean")
    ref_gh, ref_gw = _grads(ref, h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, t, chunk_tokens=5)
    assert got.dtype == torch.float32
    # Same bf16 logits on both sides, so the loss agrees to fp32 rounding of the log-softmax.
    torch.testing.assert_close(got, ref)
    gh, gw = _grads(got, h, w)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("case, match", [
    ("dim", "last dim must equal weight's dim"),
    ("targets_shape", "targets' shape must be"),
    ("target_high", r"targets must lie in \[0, 50\)"),
    ("target_negative", r"targets must lie in \[0, 50\)"),
    ("chunk_zero", "chunk_tokens must be an int >= 1"),
    ("reduction", "reduction must be one of"),
    ("dtype_mismatch", "cast one to the other's dtype"),
    ("float_targets", "integer token ids"),
])
def test_value_errors(case: str, match: str) -> None:
    h, w, t = _inputs(torch.float32)
    kwargs: dict = {}
    if case == "dim":
        h = torch.randn(BS, SEQLEN, DIM + 1)
    elif case == "targets_shape":
        t = t[:, :-1]
    elif case == "target_high":
        t = t.clone()
        t[0, 0] = VOCAB
    elif case == "target_negative":
        t = t.clone()
        t[1, 2] = -1
    elif case == "chunk_zero":
        kwargs["chunk_tokens"] = 0
    elif case == "reduction":
        kwargs["reduction"] = "none"
    elif case == "dtype_mismatch":
        w = w.double()
    elif case == "float_targets":
        t = t.float()
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(h, w, t, **kwargs)
