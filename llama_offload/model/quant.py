"""Quantized weights: int8 and int4 groups, kept as bytes, dequantized on the device right before their matmul.

Paged decoding moves every streamed byte over PCIe once per step, so fewer bytes per weight is the only way
left to a faster step: int8 halves a 16-bit model's bytes, int4 in groups of 64 (with fp16 scale and minimum)
cuts them to 4.5 bits a weight. The pager moves these bytes like any others (offload.pager.FlatPages); only this
module knows what they mean.

The layout of one quantized matrix ``L`` of (out_features, in_features), under Meta's names
(``layers.N.attention.wq``, ..., ``tok_embeddings``, ``output``):

    L.weight   int8  (out, in)        q: int8
               uint8 (out, in / 2)    q: int4, two per byte: element 2j in the low nibble of byte j, 2j+1 high
    L.scales   fp16 or fp32 (out, in / g)    g, the group size, is in / scales.shape[1]
    L.mins     fp16 or fp32 (out, in / g)    optional

    with mins:     w = q * scale + min    (int4 nibbles read as 0..15)
    without mins:  w = q * scale          (int4 nibbles read as n - 8, so -8..7)

Our own quantizer writes int8 per output channel (g = in, symmetric, no mins) and int4 in groups of 32, 64
or 128 with fp16 scales and mins. GGUF's blocks map onto the same layout without loss (convert/gguf_quant.py):
Q8_0 and Q4_0 have no minimum, Q4_1 has one, the K-quants' sub-block scales need fp32.

Dequantization computes in fp32 and rounds once to the model dtype. Every product q * scale is exact in fp32
(an integer of at most 8 bits times a scale of at most 17 significant bits), so the result is the same
whichever kernel computes it, fused multiply-add or not: a paged block, a resident one and the plain model
give the same bits, and GGUF's Q4_0/Q4_1/Q8_0 blocks equal gguf-py's own dequantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama_offload.kernels import cpu as cpu_kernels
from llama_offload.kernels import quant_gemv, quant_triton

# The seven matrices of a block that quantization applies to (Meta's names, relative to layers.N).
LINEAR_NAMES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
EMBEDDING_NAMES = ("tok_embeddings", "output")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# The quantization format this reader understands; llama_offload.json records the version a checkpoint needs.
FORMAT_VERSION = 1

# Rows of a matrix quantized at once: bounds the fp32 copy and the quantizer's temporaries (~16 bytes a weight)
# for the largest matrices (a 128k-token head, a 70B feed-forward) to a few hundred MB, in host or GPU memory.
QUANTIZE_CHUNK_ELEMENTS = 1 << 24
# At most this many weights are dequantized at once: larger matrices (a big vocabulary's head, a 70B
# feed-forward) are multiplied in row chunks, so the scratch buffer stays small beside the budget.
SCRATCH_ELEMENTS = 1 << 27
# Steps of at most this many tokens multiply the codes directly on a GPU (quant_gemv.py) instead of dequantizing
# into the scratch: a decode step is bound by reading each matrix, which the fused kernel does once, where the
# dequantize-then-GEMM path writes and re-reads a 16-bit copy. Its products run on CUDA cores, unrolled per token,
# so larger batches (a prefill) go to cuBLAS's tensor cores instead. By bits: on the H100, a 7B block's int4 g64
# took 0.41 ms fused at 8 tokens against 0.50 dequantized; int8 0.31 against 0.59 at 4 tokens, but 0.64 against
# 0.58 at 8 (BENCHMARKS.md, "The CPU lane, fifth run"; scripts/bench_quant_gemv.py re-measures).
FUSED_GEMV_MAX_TOKENS = {4: 8, 8: 4}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a model: ``bits`` 8 or 4 for the blocks' seven matrices, ``group_size`` for int4 (int8 is
    per output channel), ``embeddings``: the embedding and output head in int8 too (else they keep 16 bits)."""

    bits: int
    group_size: Optional[int] = None
    embeddings: bool = False

    @staticmethod
    def parse(quantize: Any, group_size: Any = None, embeddings: Any = False) -> "QuantSpec":
        """``--quantize int8|int4`` (or 8/4), ``--group_size``, ``--quantize_embeddings``; one-line errors."""
        names = {"int8": 8, "8": 8, "int4": 4, "4": 4}
        bits = names.get(str(quantize).strip().lower())
        if bits is None:
            raise ValueError(f"--quantize must be int8 or int4, found {quantize!r}.")
        if bits == 8:
            if group_size is not None:
                raise ValueError(f"--group_size applies to int4 only (int8 is scaled per output channel); found "
                                 f"--group_size {group_size!r} with int8. Drop it.")
            return QuantSpec(8, None, bool(embeddings))
        size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(size, bool) or size not in GROUP_SIZES:
            raise ValueError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))} for int4, found {group_size!r}.")
        return QuantSpec(4, int(size), bool(embeddings))

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4 g{self.group_size}"

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "embeddings": "int8" if self.embeddings else "16-bit"}

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse matrices whose input features the group size does not divide, before any work."""
        if self.bits != 4:
            return
        bad = {k: s for k, s in shapes.items() if s[1] % self.group_size}
        if bad:
            key, (_, n_in) = next(iter(bad.items()))
            fits = [g for g in GROUP_SIZES if all(s[1] % g == 0 for s in shapes.values())]
            raise ValueError(
                f"--group_size {self.group_size} does not divide the input features of {key} ({n_in}) "
                f"and {len(bad) - 1} other matrices. Group sizes that fit this model: "
                f"{', '.join(map(str, fits)) or 'none (use --quantize int8)'}."
            )


# --- the format ------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, n) nibbles 0..15 -> (rows, n / 2) bytes, element 2j low, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)  # (rows, n / 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(rows, n / 2) bytes -> (rows, n) nibbles 0..15 as uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)  # (rows, n)


def in_features(weight: torch.Tensor) -> int:
    return weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor] = None,
               dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The matrix a quantized ``weight`` stands for, (rows, in_features) in ``dtype`` (written into ``out`` if
    given). Works on any row range: pass the rows of weight, scales and mins together."""
    if weight.is_cuda and out is not None:
        if quant_triton.available():
            return quant_triton.dequantize(weight, scales, mins, out)
    rows, n_in = weight.shape[0], in_features(weight)
    if weight.dtype == torch.uint8:
        q = unpack_int4(weight).to(torch.float32)  # (rows, in)
        if mins is None:
            q -= 8
    elif weight.dtype == torch.int8:
        q = weight.to(torch.float32)  # (rows, in)
    else:
        raise TypeError(f"A quantized weight is int8 or uint8 (packed int4), found {weight.dtype}.")
    groups = scales.shape[1]
    w = q.view(rows, groups, n_in // groups) * scales.to(torch.float32)[:, :, None]  # (rows, groups, g)
    if mins is not None:
        w += mins.to(torch.float32)[:, :, None]
    w = w.view(rows, n_in)  # (rows, in)
    if out is None:
        return w.to(dtype)
    return out.copy_(w)


def _scale_dtype(largest: torch.Tensor) -> torch.dtype:
    # fp16 scales (2 bytes a group) unless a scale would overflow it: fp32 then, never a silent inf.
    return torch.float16 if bool(torch.isfinite(largest.to(torch.float16)).all()) else torch.float32


def _exact_div(x: torch.Tensor, n: int) -> torch.Tensor:
    # A tensor divisor, not a Python number: CUDA divides by a scalar as a multiplication by its rounded
    # reciprocal, which changes some scales' last bit. Tensor by tensor, every device divides exactly (IEEE).
    return x / torch.full_like(x, n)


def quantize_int8(w: torch.Tensor, group_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Symmetric int8: per output channel (``group_size`` None), or per group of ``group_size`` inputs."""
    rows, n_in = w.shape
    g = n_in if group_size is None else group_size
    if n_in % g:
        raise ValueError(f"group size {g} does not divide the input features ({n_in}).")
    groups = w.detach().to(torch.float32).reshape(rows, n_in // g, g)  # (rows, groups, g)
    amax = groups.abs().amax(dim=-1)  # (rows, groups)
    step = _exact_div(amax, 127)
    scales = step.to(_scale_dtype(step))
    # Round against the scale as stored, so the stored scale is the one the codes were chosen for.
    s = scales.to(torch.float32)
    q = torch.where(s[:, :, None] > 0, groups / s.clamp_min(torch.finfo(torch.float32).tiny)[:, :, None], 0.0)
    q = q.round().clamp_(-127, 127).to(torch.int8).reshape(rows, n_in)
    return {"weight": q, "scales": scales}


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: min and (max - min) / 15 per group, fp16 when it fits."""
    rows, n_in = w.shape
    if n_in % group_size or n_in % 2:
        raise ValueError(f"group size {group_size} does not divide the input features ({n_in}).")
    groups = w.detach().to(torch.float32).reshape(rows, n_in // group_size, group_size)  # (rows, groups, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (rows, groups)
    step = _exact_div(hi - lo, 15)
    dtype = _scale_dtype(torch.stack([lo.abs(), hi.abs(), step]))
    scales, mins = step.to(dtype), lo.to(dtype)
    s, m = scales.to(torch.float32)[:, :, None], mins.to(torch.float32)[:, :, None]
    q = torch.where(s > 0, (groups - m) / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = q.round().clamp_(0, 15).reshape(rows, n_in)
    return {"weight": pack_int4(q), "scales": scales, "mins": mins}


def quantize_tensor(w: torch.Tensor, bits: int, group_size: Optional[int]) -> dict[str, torch.Tensor]:
    return quantize_int8(w, group_size) if bits == 8 else quantize_int4(w, group_size or DEFAULT_GROUP_SIZE)


def quantize_matrix(w: torch.Tensor, bits: int, group_size: Optional[int], *,
                    device: Optional[torch.device | str] = None) -> dict[str, torch.Tensor]:
    """``quantize_tensor`` over row chunks, each computed on ``device`` (default: where ``w`` is), the codes, scales
    and mins returned on the CPU. Every row is quantized on its own, so the codes are the whole matrix's, and the
    same on any device (division, rounding and fp16 conversion are IEEE-exact on both)."""
    rows, cols = w.shape
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(cols, 1))
    chunks = []
    for r in range(0, rows, step):
        chunk = w[r : r + step] if device is None else w[r : r + step].to(device, non_blocking=True)
        chunks.append({k: v.cpu() for k, v in quantize_tensor(chunk, bits, group_size).items()})
    if len(chunks) == 1:
        return chunks[0]
    # A chunk whose scales overflow fp16 keeps them in fp32; the others' fp16 values are exact in fp32.
    out: dict[str, torch.Tensor] = {}
    for name in chunks[0]:
        parts = [c[name] for c in chunks]
        if len({p.dtype for p in parts}) > 1:
            parts = [p.to(torch.float32) for p in parts]
        out[name] = torch.cat(parts)
    return out


def format_name(weight: torch.Tensor, scales: torch.Tensor) -> str:
    """e.g. "int4 g64", "int8 g32" (GGUF's Q8_0) or "int8 per channel": what info and logs call a matrix's format."""
    bits, groups = (4 if weight.dtype == torch.uint8 else 8), scales.shape[1]
    return "int8 per channel" if bits == 8 and groups == 1 else f"int{bits} g{in_features(weight) // groups}"


def quantized_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_quantized(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    """Does ``state_dict`` hold the matrix ``prefix`` (e.g. ``layers.0.attention.wq``) quantized?"""
    return f"{prefix}.scales" in state_dict


# --- scratch -----------------------------------------------------------------------------------------------


class _Scratch:
    """One reusable buffer per device and dtype that matrices are dequantized into, one matrix at a time.

    Kernels on one stream run in order, so each matmul has read its matrix before the next dequantization
    overwrites it. It only grows, and is sized by the first step (CUDA graph captures come after a warm-up
    step, so a captured graph keeps pointing at the buffer it saw)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < rows * cols:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("internal: the dequantization scratch buffer would grow during a CUDA graph capture")
            # A normal tensor even when first made in inference mode: training's no-grad forward writes it too.
            with torch.inference_mode(False):
                buf = self.buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
        return buf[: rows * cols].view(rows, cols)

    def nbytes(self, device: torch.device) -> int:
        return sum(b.numel() * b.element_size() for (d, _), b in self.buffers.items() if d == device)


SCRATCH = _Scratch()


def scratch_bytes(shapes: list[tuple[int, int]], dtype: torch.dtype) -> int:
    """The scratch a model with these quantized matrices (out, in) needs: the largest chunk dequantized at once.
    Groups that run as one GEMM (wq/wk/wv, w1/w3) are dequantized together when they fit (see ``group_weight``)."""
    return max((min(rows, max(1, SCRATCH_ELEMENTS // cols)) * cols for rows, cols in shapes), default=0) * dtype.itemsize


# --- modules -----------------------------------------------------------------------------------------------


class _QuantTensors(nn.Module):
    """Holds weight, scales and (optional) mins as buffers: paged, moved and loaded like any other tensor,
    never trained. Casting the module to another dtype leaves them as stored (the codes define the values)."""

    def _init_buffers(self, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor]) -> None:
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    def _apply(self, fn: Callable, recurse: bool = True):  # type: ignore[override]
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            b = self._buffers[name]
            if b is not None and b.dtype != dtype:
                self._buffers[name] = b.to(dtype)
        return out

    @property
    def bits(self) -> int:
        return 4 if self.weight.dtype == torch.uint8 else 8

    @property
    def group_size(self) -> int:
        return in_features(self.weight) // self.scales.shape[1]

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None), out: Optional[torch.Tensor] = None) -> torch.Tensor:
        mins = None if self.mins is None else self.mins[rows]
        return dequantize(self.weight[rows], self.scales[rows], mins, dtype, out)


class QuantLinear(_QuantTensors):
    """``nn.Linear`` (no bias) over a quantized matrix. ``parallel``: None in one process; with N ranks
    "column" (1/N of the output features; ``gather_output`` joins them) or "row" (1/N of the input features,
    partial sums all-reduced), as FairScale's parallel layers split the same matrices."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor] = None, *,
                 parallel: Optional[str] = None, gather_output: bool = False):
        super().__init__()
        self._init_buffers(weight, scales, mins)
        self.out_features, self.in_features = weight.shape[0], in_features(weight)
        self.parallel = parallel
        self.gather_output = gather_output

    @classmethod
    def empty(cls, shapes: dict[str, tuple[torch.Size, torch.dtype]], **kw: Any) -> "QuantLinear":
        """On the meta device, from the shapes and dtypes of its state-dict entries (``load_state_dict(assign=True)``)."""
        make = lambda name: torch.empty(shapes[name][0], dtype=shapes[name][1], device="meta") if name in shapes else None
        return cls(make("weight"), make("scales"), make("mins"), **kw)

    # How a CPU lane block (hybrid.py) multiplies on the host: "dequantize" (then a dense matmul, the default),
    # "torch" (torch's CPU weight-only kernels, on the codes) or "gemv" (kernels/cpu.py); calibration (offload/lanes.py)
    # times each and picks.
    cpu_kernel = "dequantize"

    def chunk_rows(self) -> int:
        return max(1, min(self.out_features, SCRATCH_ELEMENTS // self.in_features))

    def native_cpu(self) -> bool:
        """Whether torch has a CPU weight-only kernel for this format: int8 per output channel, or int4 groups."""
        return self.parallel is None and (self.bits == 4 or (self.scales.shape[1] == 1 and self.mins is None))

    def _cpu_int4_layout(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes in the layout of torch's CPU int4 kernel, made once (a host copy beside the pinned page,
        which large steps still stream): w = (q - 8) * scale + zero, so zero = min + 8 * scale."""
        cached = getattr(self, "_int4_cpu", None)
        if cached is None or cached[1].dtype != dtype:
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).to(torch.int32), 1)
            s = self.scales.to(torch.float32)  # (out, in / g)
            # Without mins the nibbles are read as n - 8 already: w = (q - 8) * scale, zero 0.
            zeros = torch.zeros_like(s) if self.mins is None else self.mins.to(torch.float32) + 8 * s
            scales_and_zeros = torch.stack([s, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (in / g, out, 2)
            cached = self._int4_cpu = (packed, scales_and_zeros)
        return cached

    def _native_cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales.reshape(-1).to(x.dtype))
        else:
            packed, scales_and_zeros = self._cpu_int4_layout(x.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out_features)

    def fused_gemv(self, tokens: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether ``forward`` on ``tokens`` tokens of ``dtype`` on ``device`` runs quant_gemv's kernel on the codes."""
        if device.type != "cuda" or torch.is_grad_enabled() or not 1 <= tokens <= FUSED_GEMV_MAX_TOKENS[self.bits]:
            return False
        return (quant_gemv.enabled and quant_triton.available()
                and quant_gemv.check_format(self.weight, self.scales, self.mins, dtype) is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.parallel is None and not torch.is_grad_enabled():
            if self.cpu_kernel == "gemv":
                # Unchecked (cpu_kernels.native): the codes, scales and mins were checked when they were made.
                return cpu_kernels.native("linear_quant")(x, self.weight, self.scales, self.mins, True)
            if self.cpu_kernel == "torch" and self.native_cpu():
                return self._native_cpu_forward(x)
        if self.fused_gemv(x.numel() // self.in_features, x.dtype, x.device):
            return _parallel_output(quant_gemv.gemv(x, self.weight, self.scales, self.mins), self.parallel, self.gather_output)
        if torch.is_grad_enabled():
            # Training (a LoRA base): autograd keeps the weight for the backward pass, so it may not live in the
            # shared scratch, which the next matrix overwrites.
            return _parallel_output(F.linear(x, self.dequantized(x.dtype)), self.parallel, self.gather_output)
        rows = self.chunk_rows()
        if rows >= self.out_features:
            w = self.dequantized(x.dtype, out=SCRATCH.get(self.out_features, self.in_features, x.dtype, x.device))
            y = F.linear(x, w)  # (..., out_features)
        else:  # a matrix too large to dequantize at once: its rows in chunks
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for r0 in range(0, self.out_features, rows):
                r1 = min(r0 + rows, self.out_features)
                w = self.dequantized(x.dtype, slice(r0, r1), SCRATCH.get(r1 - r0, self.in_features, x.dtype, x.device))
                y[..., r0:r1] = F.linear(x, w)
        return _parallel_output(y, self.parallel, self.gather_output)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, mins={self.mins is not None}, parallel={self.parallel}")


def _parallel_output(y: torch.Tensor, parallel: Optional[str], gather_output: bool) -> torch.Tensor:
    if parallel is None:
        return y
    from fairscale.nn.model_parallel import mappings

    if parallel == "row":
        return mappings.reduce_from_model_parallel_region(y)
    return mappings.gather_from_model_parallel_region(y) if gather_output else y


class QuantEmbedding(_QuantTensors):
    """``nn.Embedding`` over a quantized table: only the looked-up rows are dequantized."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor] = None, *,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self._init_buffers(weight, scales, mins)
        self.num_embeddings, self.embedding_dim = weight.shape[0], in_features(weight)
        self.dtype = dtype  # the model's: the table itself is int8 or uint8

    empty = classmethod(QuantLinear.empty.__func__)  # type: ignore[attr-defined]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)  # (n,)
        mins = None if self.mins is None else self.mins[flat]
        rows = dequantize(self.weight[flat], self.scales[flat], mins, self.dtype)  # (n, dim)
        return rows.view(*tokens.shape, self.embedding_dim)  # (bs, seqlen, dim)


def group_weight(linears: list[nn.Module], dtype: torch.dtype, device: torch.device,
                 tokens: Optional[int] = None) -> Optional[torch.Tensor]:
    """Quantized linears that read the same input (wq/wk/wv, w1/w3) dequantized back to back into the scratch,
    so they run as one GEMM as the 16-bit ones do (fused.py); None if any is not quantized, they are too big, or
    (given the input's ``tokens``) they multiply their codes directly: then the caller runs each linear."""
    if not all(type(m) is QuantLinear and m.parallel is None for m in linears):
        return None
    if device.type == "cpu" and any(m.cpu_kernel != "dequantize" for m in linears):
        return None  # the CPU lane multiplies the codes themselves, one matrix at a time
    if tokens is not None and any(m.fused_gemv(tokens, dtype, device) for m in linears):
        return None  # a decode step: reading the codes once beats one GEMM over a dequantized copy
    n_in = linears[0].in_features
    rows = sum(m.out_features for m in linears)
    if any(m.in_features != n_in for m in linears) or rows * n_in > SCRATCH_ELEMENTS:
        return None
    # Under autograd the GEMM keeps its weight for the backward pass: a buffer of its own, not the shared scratch.
    buf = torch.empty(rows, n_in, dtype=dtype, device=device) if torch.is_grad_enabled() else SCRATCH.get(rows, n_in, dtype, device)
    r0 = 0
    for m in linears:
        m.dequantized(dtype, out=buf[r0 : r0 + m.out_features])
        r0 += m.out_features
    return buf


def quant_modules(model: nn.Module) -> list[tuple[str, _QuantTensors]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QuantTensors)]


def describe_quantization(model: nn.Module) -> Optional[str]:
    """e.g. "int4 g64 (7 matrices per block), embeddings 16-bit" for info and logs; None if nothing is quantized."""
    found = quant_modules(model)
    if not found:
        return None
    kinds = sorted({format_name(m.weight, m.scales) for _, m in found if isinstance(m, QuantLinear)})
    emb = any(name.split(".")[-1] in EMBEDDING_NAMES for name, _ in found)
    return f"{', '.join(kinds)}; embedding and head {'int8' if emb else '16-bit'}"


def bits_per_weight(tensors: dict[str, torch.Tensor]) -> float:
    n = tensors["weight"].shape[0] * in_features(tensors["weight"])
    return 8 * quantized_nbytes(tensors) / n if n else math.nan
