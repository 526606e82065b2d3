"""GGUF quantized blocks kept as they are (convert/gguf_quant.py): quant.dequantize gives gguf-py's bits.

Every type is checked on random blocks of every bit pattern a block can hold (any finite fp16 scale, zeros
and subnormals included) and, where gguf-py can quantize to it, on quantized random weights; then a tiny
GGUF mixing the types converts to a checkpoint holding the codes, its llama_offload.json record, and a model
that computes what the dequantized conversion computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from llama_offload.convert import gguf as convert_gguf_module  # noqa: E402
from llama_offload.model import quant  # noqa: E402
from llama_offload.checkpoint.meta import read_checkpoint_meta  # noqa: E402
from llama_offload.convert.gguf import convert_gguf  # noqa: E402
from llama_offload.convert.gguf_quant import EXACT_TYPES, gguf_to_layout, layout_name, layout_nbytes  # noqa: E402
from test_convert_gguf import N_VOCAB, TOKENS, gguf_name, gguf_tensors_from_meta, load, logits, write_gguf  # noqa: E402
from tiny import tiny_args, tiny_model  # noqa: E402

# Where each type keeps its fp16 d (and dmin / m) inside a block.
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2],
           "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1")  # gguf-py quantizes only these; K-quants: crafted bytes
SHAPES = [(64, 256), (48, 1024), (7, 512)]


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of a (rows, cols) tensor of ``type_name``, every fp16 field a random finite fp16."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[Q[type_name]]
    b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in FP16_AT[type_name]:
        bits = rng.integers(0, 1 << 16, b.shape[0], dtype=np.uint32).astype(np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf / NaN -> a finite value of the same sign
        bits[::17] = 0x8000  # -0.0: every d * q and min a signed zero
        bits[1::17] = 0x0000
        bits[2::17] = 0x0001  # the smallest subnormal
        b[:, at : at + 2] = bits.reshape(-1, 1).view(np.uint8)
    return b.reshape(rows, -1)


def assert_same_bits(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    layout = gguf_to_layout(data, Q[type_name], shape)
    got = quant.dequantize(layout["weight"], layout["scales"], layout.get("mins"), dtype=torch.float32)
    want = torch.from_numpy(np.ascontiguousarray(dequantize(data, Q[type_name]))).reshape(shape)
    assert got.shape == want.shape
    same = got.view(torch.int32) == want.view(torch.int32)
    assert bool(same.all()), (type_name, shape, int((~same).sum()), got[~same][:4], want[~same][:4])
    return layout


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("type_name", EXACT_TYPES)
def test_random_blocks_dequantize_to_the_same_bits(type_name: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    layout = assert_same_bits(random_blocks(type_name, rows, cols), type_name, shape)
    # The layout quant.py documents: int4 packed two a byte, or int8; fp16 scales for the 32-blocks' own
    # fp16 d, fp32 for the K-quants' products; mins exactly for the types with a minimum.
    block, _ = GGML_QUANT_SIZES[Q[type_name]]
    w = layout["weight"]
    assert w.dtype in (torch.uint8, torch.int8) and quant.in_features(w) == cols and w.shape[0] == rows
    expect_bits = int(layout_name(type_name)[3])
    assert (w.dtype == torch.uint8) == (expect_bits == 4)
    assert layout["scales"].dtype == (torch.float32 if block == 256 else torch.float16)
    assert ("mins" in layout) == ("mins" in layout_name(type_name))
    assert layout_nbytes(type_name, rows * cols) == quant.quantized_nbytes(layout)
    for t in layout.values():  # owns its memory: saved as is, never a view of the mmapped file
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantized_weights_dequantize_to_the_same_bits(type_name: str) -> None:
    rng = np.random.default_rng(1)
    for rows, cols in SHAPES:
        w = (rng.standard_normal((rows, cols)) * rng.choice([1e-3, 1.0, 300.0], (rows, 1))).astype(np.float32)
        w[0, :32] = 0.0  # a block of zeros: d = 0
        assert_same_bits(quantize(w, Q[type_name]), type_name, (rows, cols))


def test_layout_details() -> None:
    # Q4_0 is d * (n - 8): its nibbles are stored unchanged (no-mins int4 reads n - 8), only reordered.
    data = quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64), Q.Q4_0)
    layout = gguf_to_layout(data, "Q4_0", (1, 64))  # a type name works as well as the enum
    nib = quant.unpack_int4(layout["weight"])[0]
    gguf_nib = np.concatenate([np.concatenate([b[2:] & 15, b[2:] >> 4]) for b in data.reshape(2, 18)])
    assert nib.tolist() == gguf_nib.tolist()
    assert layout["scales"].tolist() == data.reshape(2, 18)[:, :2].copy().view(np.float16).reshape(1, 2).tolist()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight is stored as IQ4_NL, which cannot be kept quantized.*--dtype"):
        gguf_to_layout(np.zeros((2, 36), np.uint8), Q.IQ4_NL, (2, 64), name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match=r"do not make a \(4, 64\) matrix"):
        gguf_to_layout(np.zeros((2, 36), np.uint8), Q.Q4_0, (4, 64))
    with pytest.raises(ValueError, match=r"do not make a \(2, 48\) matrix"):
        gguf_to_layout(np.zeros((2, 27), np.uint8), Q.Q4_0, (2, 48))


# --- conversion ------------------------------------------------------------------------------------------

# dim 64 takes 32-blocks; the feed-forward's 256 hidden features (ffn_down's inputs) take the K-quants.
TYPES = {
    "token_embd.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q8_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q4_0,
    "blk.0.attn_output.weight": Q.Q5_0,
    "blk.0.ffn_gate.weight": Q.Q5_1,
    "blk.0.ffn_up.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q6_K,
    "blk.1.attn_q.weight": Q.Q4_0,
    "blk.1.attn_k.weight": Q.Q4_0,
    "blk.1.attn_v.weight": Q.Q8_0,
    "blk.1.ffn_down.weight": Q.Q4_K,
    "output.weight": Q.Q8_0,
}


@pytest.fixture(scope="module")
def model_and_args():
    args = tiny_args(vocab_size=N_VOCAB, n_layers=2, multiple_of=256)
    assert args.ffn_hidden_dim == 256
    return args, tiny_model(args, seed=7)


def k_quant_bytes(type_name: str, w: np.ndarray, seed: int) -> np.ndarray:
    """K-quant blocks gguf-py cannot write: random codes and sub-block scales with d, dmin near the weights' scale."""
    rows, cols = w.shape
    b = random_blocks(type_name, rows, cols, seed).reshape(-1, GGML_QUANT_SIZES[Q[type_name]][1])
    small = (np.abs(np.random.default_rng(seed).standard_normal(b.shape[0])) * 2e-3).astype(np.float16)
    for at in FP16_AT[type_name]:
        b[:, at : at + 2] = small.reshape(-1, 1).view(np.uint8)
    return b.reshape(rows, -1)


def write_mixed(path: Path, args, model, *, tied: bool = False, types: dict = TYPES) -> Path:
    tensors = gguf_tensors_from_meta(model, args)
    types = dict(types)
    for name, t in list(types.items()):
        if t.name.endswith("_K"):
            tensors[name] = k_quant_bytes(t.name, tensors[name], seed=len(name))
    if tied:
        del tensors["output.weight"]
        types.pop("output.weight", None)
    return write_gguf(path, args, tensors, types=types)


def stored(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)


def test_conversion_keeps_the_codes(model_and_args, tmp_path: Path) -> None:
    args, model = model_and_args
    path = write_mixed(tmp_path / "m.gguf", args, model)
    out = convert_gguf(path, tmp_path / "c")
    sd = stored(out)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}

    kept = {}
    for key in model.state_dict():
        name, prefix = gguf_name(key), key.removesuffix(".weight")
        t = by_name[name]
        want = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(model.state_dict()[key].shape)
        if t.tensor_type.name in EXACT_TYPES:
            kept[prefix] = t.tensor_type.name
            got = quant.dequantize(sd[key], sd[f"{prefix}.scales"], sd.get(f"{prefix}.mins"), torch.float32)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), key
            assert sd[key].dtype in (torch.int8, torch.uint8), key
        else:  # F32 norms and matrices as float32, F16 as float16, BF16 as bfloat16: values as stored
            assert f"{prefix}.scales" not in sd
            assert sd[key].dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.tensor_type.name]
            assert torch.equal(sd[key].float().view(torch.int32), want.view(torch.int32)), key
    assert sd["layers.0.feed_forward.w2.scales"].dtype == torch.float32  # Q6_K: d * sc, int8 in groups of 16
    assert sd["layers.0.feed_forward.w2.scales"].shape == (args.dim, 256 // 16)
    assert sd["layers.1.feed_forward.w2.mins"].shape == (args.dim, 256 // 32)  # Q4_K: int4 with mins, g32
    assert sd["layers.0.attention.wk.mins"].dtype == torch.float16  # Q4_1's own fp16 m

    meta = read_checkpoint_meta(out)
    record = meta["quantization"]
    assert record["format_version"] == quant.FORMAT_VERSION and record["source"] == "gguf"
    assert record["tensor_types"] == kept and "requantized" not in record
    assert record["layouts"]["Q4_K"] == "int4 g32, fp32 scales and mins"
    assert meta["format_version"] == 2 and meta["dtype"] == "float32"  # the norms' width
    assert meta["source"]["tensor_types"]["Q8_0"] == 3

    # The size estimate from the header alone: the saved tensors plus room for the tokenizer files.
    tensor_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    estimate = convert_gguf_module._estimated_bytes(reader, None)
    assert tensor_bytes <= estimate <= tensor_bytes + (1 << 20)
    assert (out / "consolidated.00.pth").stat().st_size <= estimate


def test_explicit_dtype_still_dequantizes(model_and_args, tmp_path: Path) -> None:
    args, model = model_and_args
    path = write_mixed(tmp_path / "m.gguf", args, model)
    out = convert_gguf(path, tmp_path / "c", dtype="float32")
    sd = stored(out)
    assert not any(k.endswith((".scales", ".mins")) for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float32}
    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for key, v in sd.items():
        t = by_name[gguf_name(key)]
        assert torch.equal(v.reshape(-1), torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(-1)), key
    meta = read_checkpoint_meta(out)
    assert "quantization" not in meta and meta["dtype"] == "float32" and meta["format_version"] == 1


def test_tied_quantized_embedding(model_and_args, tmp_path: Path) -> None:
    # SmolLM2's layout: token_embd in Q8_0 and no output tensor, so the head is a copy of the quantized one.
    args, model = model_and_args
    types = {**TYPES, "token_embd.weight": Q.Q8_0}
    out = convert_gguf(write_mixed(tmp_path / "m.gguf", args, model, tied=True, types=types), tmp_path / "c")
    sd = stored(out)
    for part in ("weight", "scales"):
        assert torch.equal(sd[f"output.{part}"], sd[f"tok_embeddings.{part}"]), part
    assert sd["output.weight"].dtype == torch.int8 and "output.mins" not in sd
    meta = read_checkpoint_meta(out)
    assert meta["tied_embeddings"] is True
    assert meta["quantization"]["tensor_types"]["output"] == meta["quantization"]["tensor_types"]["tok_embeddings"] == "Q8_0"


def test_kept_model_computes_what_the_dequantized_one_does(model_and_args, tmp_path: Path) -> None:
    # The loader (checkpoint.load_model) runs the codes; in fp32 they are the dequantized conversion's weights.
    args, model = model_and_args
    path = write_mixed(tmp_path / "m.gguf", args, model)
    kept = load(convert_gguf(path, tmp_path / "q"), dtype=torch.float32)
    plain = load(convert_gguf(path, tmp_path / "f", dtype="float32"))
    assert any(isinstance(m, quant.QuantLinear) for m in kept.modules())
    torch.testing.assert_close(logits(kept, TOKENS), logits(plain, TOKENS), rtol=0, atol=0)
