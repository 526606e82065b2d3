"""A quantized block's decode step on the host as one native call (csrc/cpu_block.cpp).

On a CPU, a small model's decode step costs more in per-op overhead than in its weights: SmolLM2-135M's blocks
ran about 45 torch ops and Python module calls each a token, 10 of its 25 ms a token on two cores, against
15 ms of matrix products. ``BlockStep`` hands the block's tensors to one operator that computes Meta's block
math (model.TransformerBlock.forward) with the gemv kernels' products (fp32 activations, the same products as
``QuantLinear`` with the "gemv" kernel) and the native attention, and writes the KV cache where
``KVCache.update`` writes.

``cpu_linear.set_cpu_kernel(module, "gemv")`` sets a ``BlockStep`` on every block it applies to (``applies``); the block
takes it for steps of at most ``MAX_TOKENS`` tokens a row whose activations and KV cache are fp32 on the host,
and runs its modules otherwise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from llama_offload.kernels import native_build
from llama_offload.model.step import StepShape

MAX_TOKENS = 4  # tokens a row: decode, and the verification of a few drafts; a prefill runs the modules
# Meta's names of a block's seven matrices, in the operator's order (quant.LINEAR_NAMES').
MATRICES = (("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
            ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"))

_op: list[Callable[..., None]] = []


def available() -> bool:
    """Whether the fused operator is built and loaded here (building it on first call)."""
    if not _op and native_build.load("cpu_block", verbose=False) is None:
        _op.append(torch.ops.llama_offload_cpu_block.block_decode.default)
    return bool(_op)


def applies(block: nn.Module) -> bool:
    """A block the operator computes: its seven matrices int8/int4 ``QuantLinear`` of one process (not split
    over ranks), its norms fp32."""
    mats = [getattr(getattr(block, part), name) for part, name in MATRICES]
    return (all(_one_process_codes(m) for m in mats)
            and block.attention_norm.weight.dtype == torch.float32 and block.ffn_norm.weight.dtype == torch.float32)


def _one_process_codes(m: nn.Module) -> bool:
    # quant.QuantLinear of one process, known by its buffers rather than its class: quant sits above the kernels
    # (it imports cpu_kernels, which imports this module). A wrapper around one (LoRA's) has no scales of its own.
    w, scales = m._buffers.get("weight"), m._buffers.get("scales")
    return (scales is not None and w is not None and w.dtype in (torch.int8, torch.uint8)
            and getattr(m, "parallel", "") is None)


class BlockStep:
    """``block(x, shape, input_pos, freqs_cis, mask, out)`` in one native call, for the block it was made for: its
    matrix modules looked up once (a decode step of a small model is a few ms, and nn.Module's attribute lookups
    cost about 1 us each, 30 of them a block). Made by set_cpu_kernel, which runs once every module is in place
    (offload(), after LoRA's attach): a matrix replaced afterwards needs set_cpu_kernel again."""

    def __init__(self, block: nn.Module):
        self.mats = tuple(getattr(getattr(block, part), name) for part, name in MATRICES)

    def __call__(self, block: nn.Module, x: torch.Tensor, shape: StepShape, input_pos: torch.Tensor,
                 freqs_cis: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The block's output (``out`` when given), or None where the step is not one the operator takes (then the
        caller runs the modules, which also raise the errors a bad step deserves). x: (bs, seqlen, dim) fp32 on
        the host; freqs_cis: (bs, seqlen, head_dim/2) complex64."""
        attention = block.attention
        cache = attention.cache
        if cache is None or x.dtype != torch.float32 or not x.is_contiguous() or shape.seqlen > MAX_TOKENS:
            return None
        k, v = cache.k, cache.v
        rows, positions = k.shape[:2]
        if (k.device.type != "cpu" or k.dtype != torch.float32 or shape.row0 + shape.bsz > rows
                or shape.kv_len > positions or freqs_cis.ndim != 3 or x.shape[:2] != (shape.bsz, shape.seqlen)):
            return None
        if out is None:
            out = torch.empty_like(x)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.shape != x.shape:
            return None
        # The buffers read through the modules' dicts, not their attributes: the same tensors, a tenth of the cost.
        bufs = [m._buffers for m in self.mats]
        if bufs[0]["weight"].device.type != "cpu":  # a CPU lane block streamed to the GPU for a large step
            return None
        norm1, norm2 = block.attention_norm, block.ffn_norm
        _op[0](x, out, norm1.weight, norm1.eps, norm2.weight, norm2.eps, [b["weight"] for b in bufs],
               [b["scales"] for b in bufs], [b["mins"] for b in bufs], k, v, cache.row_start, shape.row0, input_pos,
               torch.view_as_real(freqs_cis), shape.kv_len, attention.n_local_heads)
        return out
