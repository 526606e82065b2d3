"""One training step through paged blocks: the forward and backward passes, block by block.

Autograd never sees the whole model. The forward pass runs each block without a graph and keeps only its input
(the per-block activation checkpoint); the backward pass visits the blocks in reverse, recomputes each one from
its checkpoint with a graph, and back-propagates through it at once, while its weights are still on the GPU:

    forward:   page in block i (block i+1 copying meanwhile) -> x[i+1] = block_i(x[i]), no graph; save x[i]
    loss:      norm and output head on x[n], chunked cross-entropy (loss.py) -> d loss / d x[n]
    backward:  page in block i (block i-1 copying meanwhile) -> recompute block_i(x[i]) with a graph,
               backward with d x[i+1] -> d x[i]; the LoRA pairs (resident) accumulate their gradients
    long rows: the feed-forward half (token by token) runs a chunk of positions at a time, in both passes

So every paged weight crosses PCIe twice per step (the floor: 2 x paged bytes / pinned bandwidth), the GPU
holds one block's graph at a time, and checkpoints go to pinned host memory (``offload_activations``) while the
next blocks compute. The frozen base weights never change, so, unlike FairScale's training path, nothing is
copied back to the host: a dropped page just points home. The same stream discipline as inference applies
(offload.pager.InferenceOffloadModel's load_page / wait_loaded / drop_page): compute waits for each copy, and a slot is
refilled only after the kernels that read it are done.

On the CPU the same schedule runs with nothing to page: the tests compare it with plain autograd.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from llama_offload.model.transformer import Transformer, TransformerBlock, precompute_freqs_cis
from llama_offload.model.quant import QuantLinear
from llama_offload.offload.pager import InferenceOffloadModel


class Checkpoints:
    """The input of each block from the forward pass, kept on the device or in pinned host memory.

    Offloaded, a checkpoint is copied out on its own stream as soon as the block that made it is queued, and
    copied back one block ahead of the backward pass that needs it, so the copies hide behind compute."""

    def __init__(self, n: int, device: torch.device, offload: bool):
        self.device, self.offload = device, offload and device.type == "cuda"
        self.kept: list[Optional[torch.Tensor]] = [None] * n
        self.host: list[Optional[torch.Tensor]] = [None] * n  # pinned, reused while the shape stays the same
        self.ready: list[Optional[torch.cuda.Event]] = [None] * n
        if self.offload:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)

    def save(self, i: int, x: torch.Tensor) -> None:
        if not self.offload:
            self.kept[i] = x
            return
        host = self.host[i]
        if host is None or host.shape != x.shape or host.dtype != x.dtype:
            host = self.host[i] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # x is written by the compute stream
        self.d2h.wait_stream(self.h2d)  # the previous step's copy back from this host buffer is done
        with torch.cuda.stream(self.d2h):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.d2h)  # x's memory is not reused until the copy out has read it
        self.kept[i] = None

    def prefetch(self, i: int) -> None:
        if not self.offload or i < 0 or self.kept[i] is not None:
            return
        host = self.host[i]
        x = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.h2d.wait_stream(torch.cuda.current_stream(self.device))  # x's memory is free on the compute stream
        self.h2d.wait_stream(self.d2h)  # the copy out has finished writing the host buffer
        with torch.cuda.stream(self.h2d):
            x.copy_(host, non_blocking=True)
            self.ready[i] = torch.cuda.Event()
            self.ready[i].record(self.h2d)
        x.record_stream(self.h2d)
        self.kept[i] = x

    def take(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        x = self.kept[i]
        if self.offload:
            torch.cuda.current_stream(self.device).wait_event(self.ready[i])
        self.kept[i] = None
        return x


class BlockPager:
    """Visits paged blocks in a given order with the next one copying while the current one computes.

    Wraps an ``InferenceOffloadModel`` of one block per slice, for its pinned pages and copy stream.
    ``before_load(i)`` runs on the host before page i is copied: full fine-tuning waits there for the CPU
    optimizer to have written the block's new weights into the page."""

    def __init__(self, pages, before_load: Optional[Callable[[int], None]] = None):
        self.pages = pages
        self.width = len(pages.slots)
        self.before_load = before_load

    def _load(self, i: int, slot: int) -> None:
        if self.before_load is not None:
            self.before_load(i)
        self.pages.load_page(i, slot)

    def visit(self, order: Sequence[int]) -> Iterator[int]:
        """Starts the first copy now (behind whatever the caller computes first), then yields each index once
        its weights are on the GPU."""
        if order:
            self._load(order[0], 0)
        return self._walk(list(order))

    def _walk(self, order: list[int]) -> Iterator[int]:
        pages, width = self.pages, self.width
        for k, i in enumerate(order):
            ahead = k + 1 < len(order)
            if ahead and width > 1:  # two slots: the next copy overlaps this block's compute
                self._load(order[k + 1], (k + 1) % width)
            pages.wait_loaded(k % width)
            yield i
            pages.drop_page(i, k % width)
            if ahead and width == 1:  # one slot: refill it once this block's kernels are queued
                self._load(order[k + 1], 0)


def _token_spans(seqlen: int, chunk: Optional[int]) -> list[slice]:
    if chunk is None or chunk >= seqlen:
        return [slice(None)]
    return [slice(s, min(s + chunk, seqlen)) for s in range(0, seqlen, chunk)]


def block_forward(block: TransformerBlock, x: torch.Tensor, freqs_cis: torch.Tensor,
                  ffn_chunk: Optional[int]) -> torch.Tensor:
    """The block without a graph, its feed-forward over ``ffn_chunk`` positions at a time: the feed-forward works
    token by token, and its (tokens x ffn_hidden_dim) intermediates are the largest tensors of a long sequence."""
    h = x + block.attention.forward_causal(block.attention_norm(x), freqs_cis)  # (bs, seqlen, dim)
    spans = _token_spans(h.shape[1], ffn_chunk)
    if len(spans) == 1:
        return h + block.feed_forward(block.ffn_norm(h))
    out = torch.empty_like(h)
    for span in spans:
        hc = h[:, span]  # (bs, chunk, dim)
        out[:, span] = hc + block.feed_forward(block.ffn_norm(hc))
    return out


def block_backward(block: TransformerBlock, x: torch.Tensor, grad_out: torch.Tensor, freqs_cis: torch.Tensor,
                   ffn_chunk: Optional[int], autocast, collect: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Recompute the block from its input ``x`` and back-propagate ``grad_out``; returns d loss / d x.

    The attention half keeps its graph while the feed-forward half is recomputed and back-propagated a chunk of
    positions at a time, so only one chunk's feed-forward intermediates are alive: at 64k tokens of an 8B
    model the whole feed-forward graph would hold ~7.5 GB, the attention half ~3.8 GB. ``collect`` runs after
    every partial backward: full fine-tuning sums each chunk's weight gradients in fp32 there, rather than
    letting autograd add them up in the weights' 16-bit dtype."""
    x = x.detach().requires_grad_()
    after = collect or (lambda: None)
    with torch.enable_grad(), autocast():
        h = x + block.attention.forward_causal(block.attention_norm(x), freqs_cis)  # (bs, seqlen, dim)
    spans = _token_spans(h.shape[1], ffn_chunk)
    if len(spans) == 1:
        with torch.enable_grad(), autocast():
            y = h + block.feed_forward(block.ffn_norm(h))
        torch.autograd.backward(y, grad_out.to(y.dtype))
        after()
        return x.grad
    grad_h = torch.empty_like(h)
    for span in spans:
        hc = h[:, span].detach().requires_grad_()  # (bs, chunk, dim)
        with torch.enable_grad(), autocast():
            yc = hc + block.feed_forward(block.ffn_norm(hc))
        torch.autograd.backward(yc, grad_out[:, span].to(yc.dtype))
        after()
        grad_h[:, span] = hc.grad
    torch.autograd.backward(h, grad_h)
    after()
    return x.grad


def head_weight(output: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The output head as one (vocab, dim) matrix for the chunked loss (an int8 head dequantized)."""
    if isinstance(output, QuantLinear):
        return output.dequantized(dtype)
    return output.weight


class TrainedWeights(Protocol):
    """Full fine-tuning's side of the schedule (host_update.HostUpdate), where every weight trains. A part is a
    block's index, "embedding" or "head" (the final norm and the output head)."""

    def before_use(self, part: int | str) -> None:
        """The part's newest weights are in place: a block's page (before it is copied) or its GPU copy."""

    def collect(self, part: int | str) -> None:
        """Move aside the gradients a partial backward left in the part's parameters."""

    def done(self, part: int | str) -> None:
        """The part's gradient of this micro-batch is complete: send it to the CPU optimizer."""


class BlockRunner:
    """Runs a model's blocks for training: ``resident`` of them kept on ``device``, the rest paged.

    ``forward`` returns the last block's output, keeping checkpoints for ``backward``, which takes the loss's
    gradient with respect to that output and leaves the LoRA gradients in their ``.grad`` (or, with ``weights``,
    hands each block's gradients to full fine-tuning's update as the block finishes)."""

    def __init__(self, blocks: Sequence[TransformerBlock], device: torch.device, *, resident: Optional[int] = None,
                 offload_activations: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                 ffn_chunk: Optional[int] = None):
        self.blocks = list(blocks)
        self.device = device
        n = len(self.blocks)
        self.resident = n if resident is None or device.type != "cuda" else resident
        for block in self.blocks[: self.resident]:
            block.to(device)
        self.pager = None
        if self.resident < n:
            paged = nn.Sequential(*self.blocks[self.resident :])
            self.pager = BlockPager(InferenceOffloadModel(paged, device, len(paged)),
                                    before_load=lambda k: self._before_use(k + self.resident))
        self.weights: Optional[TrainedWeights] = None  # set by full fine-tuning once its units are laid out
        # Offloaded whenever asked, paged or not: the plan counts three checkpoints on the GPU, not n.
        self.checkpoints = Checkpoints(n, device, offload_activations)
        self.autocast_dtype = autocast_dtype
        self.ffn_chunk = ffn_chunk  # positions per feed-forward chunk (budget.FFN_CHUNK_TOKENS); None: all at once

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _before_use(self, i: int) -> None:
        if self.weights is not None:
            self.weights.before_use(i)

    def _visit(self, order: list[int]) -> Iterator[int]:
        """Block indices in ``order``: resident ones as they come, paged ones through the pager."""
        paged = [i - self.resident for i in order if i >= self.resident]
        pages = self.pager.visit(paged) if paged else iter(())
        for i in order:
            if i < self.resident:
                self._before_use(i)
                yield i
            else:
                yield next(pages) + self.resident
        for _ in pages:  # lets the pager drop the last page
            pass

    @torch.no_grad()
    def forward(self, h: torch.Tensor, freqs_cis: torch.Tensor, *, keep: bool = True) -> torch.Tensor:
        """(bs, seqlen, dim) in, (bs, seqlen, dim) out; ``keep=False`` (evaluation) saves no checkpoints."""
        with self.autocast():
            for i in self._visit(list(range(len(self.blocks)))):
                if keep:
                    self.checkpoints.save(i, h)
                h = block_forward(self.blocks[i], h, freqs_cis, self.ffn_chunk)
        return h

    def backward(self, grad: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """d loss / d (last block's output) in; d loss / d (first block's input) out."""
        order = list(reversed(range(len(self.blocks))))
        self.checkpoints.prefetch(order[0])
        weights = self.weights
        for i in self._visit(order):
            x = self.checkpoints.take(i)
            self.checkpoints.prefetch(i - 1)  # behind this block's compute
            collect = None if weights is None else (lambda i=i: weights.collect(i))
            grad = block_backward(self.blocks[i], x, grad, freqs_cis, self.ffn_chunk, self.autocast, collect)
            if weights is not None:
                weights.done(i)  # queued before the page is dropped: the copy out reads the GPU gradients only
        return grad


def rope_table(model: Transformer, seq_len: int, device: torch.device) -> torch.Tensor:
    """(seq_len, head_dim/2) complex64: every training row starts at position 0."""
    p = model.params
    return precompute_freqs_cis(p.head_dim, seq_len, p.rope_theta, device=device, use_scaled=p.use_scaled_rope)


def paged_loss_and_backward(model: Transformer, runner: BlockRunner, tokens: torch.Tensor, targets: torch.Tensor,
                            freqs_cis: torch.Tensor, normalizer: float,
                            loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the summed loss (detached, fp32).

    ``tokens``/``targets``: (bs, seqlen) on the device (targets -100 where untrained); the gradients are of
    sum(loss) / ``normalizer`` (the trained tokens of the whole optimizer step, so micro-batches and ranks
    add up to one mean)."""
    weights = runner.weights  # full fine-tuning: the embedding and the head train too
    if weights is not None:
        weights.before_use("embedding")
    with torch.no_grad():
        h = model.tok_embeddings(tokens)  # (bs, seqlen, dim)
    h = runner.forward(h, freqs_cis)
    h = h.detach().requires_grad_()
    if weights is not None:
        weights.before_use("head")
    with torch.enable_grad(), runner.autocast():
        hn = model.norm(h)  # (bs, seqlen, dim)
        loss = loss_fn(hn, head_weight(model.output, hn.dtype), targets, reduction="sum")
    (loss / normalizer).backward()
    if weights is not None:  # the head's update runs on the host while the blocks go backward
        weights.collect("head")
        weights.done("head")
    grad = runner.backward(h.grad, freqs_cis)
    if weights is not None:
        with torch.enable_grad():
            torch.autograd.backward(model.tok_embeddings(tokens), grad)
        weights.collect("embedding")
        weights.done("embedding")
    return loss.detach().float()


@torch.no_grad()
def paged_eval_loss(model: Transformer, runner: BlockRunner, tokens: torch.Tensor, targets: torch.Tensor,
                    freqs_cis: torch.Tensor, loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Summed loss of a micro-batch, forward only."""
    if runner.weights is not None:
        runner.weights.before_use("embedding")
    h = runner.forward(model.tok_embeddings(tokens), freqs_cis, keep=False)
    if runner.weights is not None:
        runner.weights.before_use("head")
    with runner.autocast():
        hn = model.norm(h)
        return loss_fn(hn, head_weight(model.output, hn.dtype), targets, reduction="sum").float()


def plain_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The reference: plain autograd over the whole model and full logits. Summed loss, graph attached."""
    h = model.tok_embeddings(tokens)  # (bs, seqlen, dim)
    for layer in model.layers:
        h = layer.forward_causal(h, freqs_cis)
    logits = model.output(model.norm(h)).float()  # (bs, seqlen, vocab)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
