"""Cross-entropy over a huge vocabulary without ever holding the full logits.

Llama 3's head has 128,256 outputs: at 64k tokens the fp32 logits alone would take 31 GiB, more than the rest of
a fine-tuning step. ``chunked_cross_entropy`` fuses the output projection with the loss. The forward pass runs
``chunk_tokens`` rows at a time and keeps only one float per token (its log-sum-exp); the backward pass
recomputes each chunk's logits from the saved hidden states and turns them into gradients straight away. At most
one chunk of logits (``chunk_tokens x vocab``) exists at any time, for the price of running the head's matmul
twice.

Autocast: ``torch.amp.custom_fwd`` wants its device type when the class is defined, while the loss must serve
whatever device ``h`` lives on. So the wrapper casts explicitly instead: under autocast for ``h``'s device, ``h``
and the weight are cast to autocast's dtype (the dtype autocast would give ``F.linear``), autograd carries those
casts' gradients back, and autocast is switched off inside the Function so that every dtype in it is the one
written here.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

REDUCTIONS = ("mean", "sum")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on ``device_type`` right now, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):
        # torch 2.3 (still allowed by pyproject) knows only its per-device functions.
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # Only entered when autocast is on, so devices that have no autocast never reach torch.autocast.
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _upcast(dtype: torch.dtype) -> torch.dtype:
    # Log-softmax in at least fp32 (bf16's 8-bit mantissa would wreck it); fp64 stays fp64 for exact checks.
    return torch.promote_types(dtype, torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of per-token cross-entropies (or their mean); see ``chunked_cross_entropy``."""

    @staticmethod
    def forward(ctx: FunctionCtx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int, ignore_index: int, mean: bool) -> torch.Tensor:
        n_tokens = h.shape[0]
        acc = _upcast(h.dtype)
        valid = targets != ignore_index  # (tokens,)
        # Ignored rows gather column 0 instead of an out-of-range id; their loss is masked out below.
        safe = torch.where(valid, targets, torch.zeros_like(targets))  # (tokens,)
        lse = torch.empty(n_tokens, dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        with _autocast_off(h.device.type):
            for s in range(0, n_tokens, chunk_tokens):
                e = min(s + chunk_tokens, n_tokens)
                logits = F.linear(h[s:e], weight).to(acc)  # (chunk, vocab)
                chunk_lse = torch.logsumexp(logits, dim=-1)  # (chunk,)
                target_logit = logits.gather(1, safe[s:e, None]).squeeze(1)  # (chunk, 1) -> (chunk,)
                lse[s:e] = chunk_lse
                total += torch.where(valid[s:e], chunk_lse - target_logit, 0.0).sum()
                del logits  # free this chunk before the next one is allocated
        # A tensor, not a Python int: no device-to-host sync, and a count of 0 gives 0 / 1 = 0 instead of NaN.
        count = valid.sum().clamp(min=1).to(acc)
        ctx.save_for_backward(h, weight, safe, valid, lse, count)
        ctx.chunk_tokens = chunk_tokens
        ctx.mean = mean
        return total / count if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        h, weight, safe, valid, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        n_tokens, acc, chunk_tokens = h.shape[0], lse.dtype, ctx.chunk_tokens
        scale = grad_out.to(acc) / count if ctx.mean else grad_out.to(acc)
        # One factor per row: the incoming gradient (over count, for mean), and 0 where the target is ignored.
        row_scale = valid.to(acc) * scale  # (tokens,)
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 (or fp64) accumulator: summing many chunks' bf16 products in bf16 would lose their low bits.
        grad_w = torch.zeros(weight.shape, dtype=_upcast(weight.dtype), device=weight.device) if need_w else None
        with _autocast_off(h.device.type):
            for s in range(0, n_tokens, chunk_tokens):
                e = min(s + chunk_tokens, n_tokens)
                h_chunk = h[s:e]
                # The same logits as the forward pass (same kernel, same dtype), so softmax matches its lse.
                probs = F.linear(h_chunk, weight).to(acc)  # (chunk, vocab)
                probs.sub_(lse[s:e, None]).exp_()  # softmax, in place: this chunk's only (chunk, vocab) buffer
                rows = torch.arange(e - s, device=h.device)
                probs[rows, safe[s:e]] -= 1.0  # softmax - onehot
                probs.mul_(row_scale[s:e, None])
                grad_logits = probs.to(h.dtype)  # (chunk, vocab); a no-op unless h is 16-bit
                if need_h:
                    grad_h[s:e] = grad_logits @ weight  # (chunk, vocab) @ (vocab, dim) -> (chunk, dim)
                if need_w:
                    # (vocab, chunk) @ (chunk, dim) -> (vocab, dim)
                    if grad_w.dtype == h.dtype:
                        grad_w.addmm_(grad_logits.t(), h_chunk)
                    else:
                        grad_w += grad_logits.t() @ h_chunk
                del probs, grad_logits
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
           ignore_index: int, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}; "
                         f"for per-token losses call F.cross_entropy on a small batch instead")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1 (rows of logits computed at a time), "
                         f"got {chunk_tokens!r}; the default 4096 suits most GPUs")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the output head's (vocab, dim) matrix, got shape {tuple(weight.shape)}; "
                         f"pass model.output.weight")
    if h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"h's last dim must equal weight's dim {weight.shape[1]}, got h of shape "
                         f"{tuple(h.shape)}; pass the final-norm hidden states (..., dim), not logits or tokens")
    if not h.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"h and weight must be floating point, got {h.dtype} and {weight.dtype}")
    if h.dtype != weight.dtype:
        raise ValueError(f"h is {h.dtype} but weight is {weight.dtype}; cast one to the other's dtype, "
                         f"or run under torch.autocast, which casts both")
    if h.device != weight.device or targets.device != h.device:
        raise ValueError(f"h, weight and targets must be on one device, got {h.device}, {weight.device} and "
                         f"{targets.device}; move them with .to(device)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids (int64), got {targets.dtype}; "
                         f"pass the token tensor, not probabilities or a mask")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"targets' shape must be h's without its last dim, {tuple(h.shape[:-1])}, got "
                         f"{tuple(targets.shape)}; shift the targets to line up with h before the call")
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    # One device-to-host sync per call; an out-of-range id would otherwise fail deep inside gather, or not at all.
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}, found "
                         f"{int(bad.sum())} that do not (first: {first}); check the tokenizer's vocab "
                         f"against the model's, and the padding id against ignore_index")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_tokens: int = 4096, ignore_index: int = -100,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits = h @ weight.T`` without materialising the (tokens x vocab) logits.

    h: (..., dim) final-norm hidden states; weight: (vocab, dim) the output head's weight; targets: (...) int64
    token ids, ``ignore_index`` where no loss is counted. The matmul runs in h's dtype, as ``F.linear`` would (in
    autocast's dtype under ``torch.autocast``), the log-softmax in fp32 (fp64 for fp64 inputs). ``reduction``:
    "mean" over the non-ignored tokens (0.0, with a zero gradient, if there are none) or "sum". Returns a 0-dim
    tensor. The head's weight gets a gradient only if it requires one: a frozen head skips that matmul.
    """
    # Autocast first, so the dtype check sees what the matmul will actually get.
    cast = _autocast_dtype(h.device.type)
    if cast is not None and h.dtype in (torch.float32, torch.float16, torch.bfloat16):
        h = h.to(cast)
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.to(cast)
    _check(h, weight, targets, chunk_tokens, ignore_index, reduction)
    dim = h.shape[-1]
    h2 = h.reshape(-1, dim)  # (..., dim) -> (tokens, dim)
    t2 = targets.reshape(-1).long()  # (...) -> (tokens,)
    return _ChunkedCrossEntropy.apply(h2, weight, t2, chunk_tokens, ignore_index, reduction == "mean")
