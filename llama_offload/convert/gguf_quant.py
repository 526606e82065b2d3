"""GGUF's quantized blocks, kept as they are: mapped without loss onto quant.py's layout.

Every GGUF type below becomes integer codes, one scale per group and (for the types with a minimum) one
minimum per group, such that ``quant.dequantize(weight, scales, mins, torch.float32)`` gives the same bits as
``gguf.quants.dequantize`` (llama.cpp's Python reference), negative zeros included. Only the codes move: no
value is rounded again.

    type  block  codes (our layout)           group  scales            mins             bits a weight
    Q4_0   32    int4, n - 8                    32    fp16 d            -                4.5
    Q4_1   32    int4, 0..15                    32    fp16 d            fp16 m           5
    Q8_0   32    int8                           32    fp16 d            -                8.5
    Q5_0   32    int8, q - 16                   32    fp16 d            -                8.5
    Q5_1   32    int8, 0..31                    32    fp16 d            fp16 m           9
    Q2_K  256    int4, 0..3                     16    fp32 d * sc       fp32 -dmin * m   8
    Q3_K  256    int4, n - 8 = -4..3            16    fp32 d * sc       -                6
    Q4_K  256    int4, 0..15                    32    fp32 d * sc       fp32 -dmin * m   6
    Q5_K  256    int8, 0..31                    32    fp32 d * sc       fp32 -dmin * m   10
    Q6_K  256    int8, -32..31                  16    fp32 d * sc       -                10

Why each is exact: gguf-py computes in fp32 ``d * q`` or ``d * q + m`` (Q4_1, Q5_1), and for the K-quants
``(d * sc) * q`` or ``(d * sc) * q - dmin * m``, where d and dmin are fp16 and sc, m small integers. The
sub-block scale ``d * sc`` is a product of an 11-bit and an at most 7-bit integer: exact in fp32 (not in
fp16, hence fp32 scales), and so is each ``scale * q`` (at most 23 significant bits). quant.dequantize forms
the same products, then adds the minimum: ``x + (-y)`` is ``x - y`` in IEEE arithmetic, so storing
``-dmin * m`` as the minimum gives the same rounding, and the same sign of a zero. Codes without a minimum
are signed as gguf-py's are (int4 nibbles read as n - 8), so ``d * 0`` is the same signed zero too.

Every type keeps its exact form, so nothing is requantized. The K-quants pay for it in size: their 6-bit
sub-block scales become fp32 (and 2- or 3-bit codes take a 4-bit nibble, 5- and 6-bit ones a byte), so
Q2_K grows from 2.6 to 8 bits a weight and Q5_K/Q6_K to 10; the 32-blocks keep (Q4_0) or nearly keep theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from llama_offload.checkpoint.load import expected_shapes
from llama_offload.checkpoint.quant_load import check_quantized_state_dict
from llama_offload.model.args import ModelArgs
from llama_offload.model.quant import FORMAT_VERSION

__all__ = ["EXACT_TYPES", "gguf_to_layout", "layout_nbytes", "layout_name", "quantization_record",
           "save_quantized_checkpoint"]

QK_K = 256

# type -> (block elements, bytes per block, code bits in our layout (4 or 8), group size, scale dtype, has mins)
_LAYOUTS: dict[str, tuple[int, int, int, int, torch.dtype, bool]] = {
    "Q4_0": (32, 18, 4, 32, torch.float16, False),
    "Q4_1": (32, 20, 4, 32, torch.float16, True),
    "Q8_0": (32, 34, 8, 32, torch.float16, False),
    "Q5_0": (32, 22, 8, 32, torch.float16, False),
    "Q5_1": (32, 24, 8, 32, torch.float16, True),
    "Q2_K": (QK_K, 84, 4, 16, torch.float32, True),
    "Q3_K": (QK_K, 110, 4, 16, torch.float32, False),
    "Q4_K": (QK_K, 144, 4, 32, torch.float32, True),
    "Q5_K": (QK_K, 176, 8, 32, torch.float32, True),
    "Q6_K": (QK_K, 210, 8, 16, torch.float32, False),
}
# The GGUF types kept as they are (quantized); everything else is dequantized or refused by convert_gguf.
EXACT_TYPES = tuple(_LAYOUTS)


def _type_name(tensor_type: Any) -> str:
    return str(getattr(tensor_type, "name", tensor_type))


def layout_name(tensor_type: Any) -> str:
    """e.g. ``"int4 g32, fp16 scales and mins"`` for Q4_1: what a kept tensor of this type is stored as."""
    _, _, bits, group, scale_dtype, mins = _LAYOUTS[_type_name(tensor_type)]
    width = "fp16" if scale_dtype == torch.float16 else "fp32"
    return f"int{bits} g{group}, {width} scales{' and mins' if mins else ''}"


def layout_nbytes(tensor_type: Any, numel: int) -> int:
    """Bytes that ``numel`` weights of ``tensor_type`` take in our layout (codes, scales, mins)."""
    _, _, bits, group, scale_dtype, mins = _LAYOUTS[_type_name(tensor_type)]
    return numel * bits // 8 + (numel // group) * scale_dtype.itemsize * (2 if mins else 1)


# --- unpacking, mirroring gguf/quants.py's dequantize_blocks (same element order) --------------------------


def _f32(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of each block, as fp32: (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16)  # (n_blocks, 1)


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """32-blocks: element j in the low nibble of byte j, element j + 16 in its high nibble -> (n, 32) 0..15."""
    n = qs.shape[0]
    return (qs.reshape(n, 1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1) & np.uint8(15)).reshape(n, 32)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: bit i of the little-endian uint32 belongs to element i -> (n, 32) 0/1."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's eight 6-bit scales and mins per super-block (gguf's Q4_K.get_scale_min) -> (n, 8) each."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _shifted(x: np.ndarray, parts: int, width: int, shifts: list[int], mask: int) -> np.ndarray:
    """gguf-py's ``(x.reshape(n, parts, 1, width) >> shifts) & mask`` flattened: (n, parts * len(shifts) * width)."""
    n = x.shape[0]
    sh = np.array(shifts, np.uint8).reshape(1, 1, len(shifts), 1)
    return ((x.reshape(n, parts, 1, width) >> sh) & np.uint8(mask)).reshape(n, -1)


# Each returns (codes (n_blocks, block) as uint8 nibbles 0..15 or int8, scales (n_blocks, groups), mins or None).
_Unpacked = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


def _q4_0(b: np.ndarray) -> _Unpacked:
    return _nibbles_split(b[:, 2:18]), _f16(b, 0), None


def _q4_1(b: np.ndarray) -> _Unpacked:
    return _nibbles_split(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> _Unpacked:
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8), _f16(b, 0), None


def _q5_0(b: np.ndarray) -> _Unpacked:
    q = _nibbles_split(b[:, 6:22]) | (_bits32(b[:, 2:6]) << np.uint8(4))
    return q.view(np.int8) - np.int8(16), _f16(b, 0), None


def _q5_1(b: np.ndarray) -> _Unpacked:
    q = _nibbles_split(b[:, 8:24]) | (_bits32(b[:, 4:8]) << np.uint8(4))
    return q.view(np.int8), _f16(b, 0), _f16(b, 2)


def _q2_k(b: np.ndarray) -> _Unpacked:
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f32(b, 80), _f32(b, 82)
    dl = d * (scales & np.uint8(0xF)).astype(np.float32)  # (n, 16)
    ml = dmin * (scales >> np.uint8(4)).astype(np.float32)
    return _shifted(qs, 2, 32, [0, 2, 4, 6], 3), dl, -ml


def _q3_k(b: np.ndarray) -> _Unpacked:
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f32(b, 108)
    lo = (scales[:, 0:8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hi = (scales[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((lo & np.uint8(0x0F)) | ((hi & np.uint8(0x03)) << np.uint8(4))).view(np.int8) - np.int8(32)
    dl = d * sc.astype(np.float32)  # (n, 16)
    ql = _shifted(qs, 2, 32, [0, 2, 4, 6], 3)  # (n, 256) 0..3
    qh = _shifted(hmask, 1, 32, list(range(8)), 1)  # (n, 256): 1 means no offset, 0 means -4
    # q = ql - 4 * (1 - qh) in -4..3, stored as the nibble q + 8 (read back as n - 8)
    return ql + (qh << np.uint8(2)) + np.uint8(4), dl, None


def _q4_k(b: np.ndarray) -> _Unpacked:
    d, dmin = _f32(b, 0), _f32(b, 2)
    sc, m = _k_scale_min(b[:, 4:16])
    codes = _shifted(b[:, 16:144], 4, 32, [0, 4], 0xF)
    return codes, d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q5_k(b: np.ndarray) -> _Unpacked:
    d, dmin = _f32(b, 0), _f32(b, 2)
    sc, m = _k_scale_min(b[:, 4:16])
    ql = _shifted(b[:, 48:176], 4, 32, [0, 4], 0xF)
    qh = _shifted(b[:, 16:48], 1, 32, list(range(8)), 1)
    return (ql | (qh << np.uint8(4))).view(np.int8), d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q6_k(b: np.ndarray) -> _Unpacked:
    ql = _shifted(b[:, 0:128], 2, 64, [0, 4], 0xF)
    qh = _shifted(b[:, 128:192], 2, 32, [0, 2, 4, 6], 3)
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f32(b, 208)
    return (ql | (qh << np.uint8(4))).view(np.int8) - np.int8(32), d * scales, None


_UNPACK: dict[str, Callable[[np.ndarray], _Unpacked]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
assert set(_UNPACK) == set(_LAYOUTS)


def gguf_to_layout(data: np.ndarray, tensor_type: Any, shape: tuple[int, int], *,
                   name: str = "tensor") -> dict[str, torch.Tensor]:
    """A GGUF tensor's quantized bytes as quant.py's layout: ``{"weight", "scales"[, "mins"]}``.

    ``data``: the tensor's raw bytes as gguf-py's reader gives them (uint8, any shape, row-major blocks);
    ``tensor_type``: a ``GGMLQuantizationType`` or its name; ``shape``: the torch shape (out, in), i.e. GGUF's
    ``ne1, ne0``. ``quant.dequantize`` of the result equals ``gguf.quants.dequantize(data, tensor_type)``
    bit for bit. Raises ValueError for a type that has no exact mapping (see EXACT_TYPES) or bytes that do
    not fit ``shape``; ``name`` appears in those messages.
    """
    type_name = _type_name(tensor_type)
    if type_name not in _LAYOUTS:
        raise ValueError(f"{name} is stored as {type_name}, which cannot be kept quantized (types kept as they are: "
                         f"{', '.join(EXACT_TYPES)}). Dequantize it instead (convert with --dtype bfloat16).")
    block, type_size, bits, group, _, _ = _LAYOUTS[type_name]
    rows, cols = (int(s) for s in shape)
    raw = np.asarray(data)
    if raw.dtype != np.uint8:
        raw = np.ascontiguousarray(raw).view(np.uint8)
    if cols % block or raw.size != rows * (cols // block) * type_size:
        raise ValueError(f"{name}: {raw.size} bytes of {type_name} do not make a ({rows}, {cols}) matrix "
                         f"({block}-element blocks of {type_size} bytes along the rows).")
    blocks = raw.reshape(rows * (cols // block), type_size)
    codes, scales, mins = _UNPACK[type_name](blocks)
    codes = codes.reshape(rows, cols)
    if bits == 4:  # element 2j in the low nibble of byte j, 2j + 1 in the high one
        codes = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))  # (rows, cols / 2) uint8
    out = {"weight": torch.from_numpy(np.ascontiguousarray(codes)),
           "scales": torch.from_numpy(np.ascontiguousarray(scales).reshape(rows, cols // group))}
    if mins is not None:
        out["mins"] = torch.from_numpy(np.ascontiguousarray(mins).reshape(rows, cols // group))
    return out


def quantization_record(kept: dict[str, str]) -> dict[str, Any]:
    """llama_offload.json's "quantization" for a conversion that kept ``kept`` (matrix name -> GGUF type)."""
    return {"format_version": FORMAT_VERSION, "source": "gguf", "tensor_types": dict(kept),
            "layouts": {t: layout_name(t) for t in sorted(set(kept.values()))}}


def save_quantized_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, ckpt_dir: str | Path) -> None:
    """``consolidated.00.pth`` and ``params.json`` of a state dict with quantized matrices, into ``ckpt_dir``, an
    empty directory the caller publishes (checkpoint.output_dir). One shard, as checkpoint/quant_load.py reads it: the
    multi-shard ``checkpoint.load.save_checkpoint`` takes plain tensors only."""
    check_quantized_state_dict(state_dict, expected_shapes(args), "the converted state dict")
    ckpt_dir = Path(ckpt_dir)
    torch.save(state_dict, ckpt_dir / "consolidated.00.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")  # last: loading starts here
