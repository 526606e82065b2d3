"""Hugging Face Llama directory -> Meta conversion, on tiny models written here in HF's layout.

The HF layout is made the way HF's convert_llama_weights_to_hf.py makes it (q/k permuted for
``rotate_half``), so converting back must give Meta's weights bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import load_model  # noqa: E402
from llama_offload.checkpoint.meta import read_checkpoint_meta  # noqa: E402
from llama_offload.convert.hf import convert_hf, permute_hf_to_meta, permute_meta_to_hf  # noqa: E402
from llama_offload.model.transformer import Transformer, apply_rotary_emb, precompute_freqs_cis  # noqa: E402
from llama_offload.text.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer  # noqa: E402
from test_tokenizer_json import tiny_bpe_fields, write_tiny_tokenizer  # noqa: E402
from tiny import tiny_args, tiny_model  # noqa: E402

_HF_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_state_dict(model: Transformer, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta weights renamed and permuted as HF's convert_llama_weights_to_hf.py does."""
    out = {}
    for key, w in model.state_dict().items():
        if key.endswith("attention.wq.weight"):
            w = permute_meta_to_hf(w, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = permute_meta_to_hf(w, args.kv_heads)
        if key.startswith("layers."):
            _, n, rest = key.split(".", 2)
            name = f"model.layers.{n}.{_HF_LAYER[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[key]
        out[name] = w.contiguous()
    return out


def hf_config(args: ModelArgs, **overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers, "num_key_value_heads": args.kv_heads, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "vocab_size": args.vocab_size, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def write_hf(directory: Path, model: Transformer, args: ModelArgs, *, shards: int = 1, tied: bool = False,
             **config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model, args)
    if tied:
        del sd["lm_head.weight"]
    (directory / "config.json").write_text(json.dumps(hf_config(args, tie_word_embeddings=tied, **config)))
    if shards == 1:
        safetensors_torch.save_file(sd, directory / "model.safetensors")
    else:
        names = list(sd)
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i * per : (i + 1) * per]}
            safetensors_torch.save_file(part, directory / file)
            weight_map.update({n: file for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


N_VOCAB = len(tiny_bpe_fields()["tokenizer.ggml.tokens"])
TOKENS = torch.tensor([[5, 17, 270, 3, 99, 200, 1, 2, 150, 42], [7, 7, 260, 261, 262, 0, 12, 250, 251, 252]])


def logits(model: Transformer, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model.setup_caches(tokens.shape[0], 64, "cpu", model.tok_embeddings.weight.dtype)
    return model(tokens, 0)


def load(out: Path) -> Transformer:
    return load_model(out, max_seq_len=64, max_batch_size=2, show_progress=False)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bpe")
    write_tiny_tokenizer(d)
    return d


def add_bpe_tokenizer(hf_dir: Path, bpe_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((bpe_dir / name).read_bytes())


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_is_exact(tmp_path: Path, bpe_dir: Path, shards: int) -> None:
    args = tiny_args(vocab_size=N_VOCAB)
    model = tiny_model(args, seed=1)
    hf = write_hf(tmp_path / "hf", model, args, shards=shards)
    add_bpe_tokenizer(hf, bpe_dir)
    out = convert_hf(hf, tmp_path / "ckpt")

    assert ModelArgs.from_json(out / "params.json").ffn_hidden_dim == args.ffn_hidden_dim
    converted = load(out)
    for key, w in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], w), key
    torch.testing.assert_close(logits(converted), logits(model), rtol=0, atol=0)

    meta = read_checkpoint_meta(out)
    assert meta["chat_format"] == "chatml" and meta["tokenizer"] == "tokenizer.json"
    assert meta["source"]["format"] == "huggingface" and meta["dtype"] == "float32"
    assert isinstance(load_tokenizer(out), HFTokenizer)
    assert (out / "tokenizer_config.json").is_file()


def test_tied_embeddings_and_dtype(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    model = tiny_model(args, seed=2)
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    hf = write_hf(tmp_path / "hf", model, args, tied=True)
    add_bpe_tokenizer(hf, bpe_dir)
    out = convert_hf(hf, tmp_path / "ckpt", dtype="bfloat16")
    converted = load(out)
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert torch.equal(converted.output.weight, model.tok_embeddings.weight.bfloat16())
    assert read_checkpoint_meta(out)["dtype"] == "bfloat16"
    assert read_checkpoint_meta(out)["tied_embeddings"] is True  # info counts the matrix once


def test_sentencepiece_tokenizer_and_llama2_template(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    args = tiny_args(vocab_size=512)
    model = tiny_model(args, seed=4)
    hf = write_hf(tmp_path / "hf", model, args)
    (hf / "tokenizer.model").write_bytes(sp_tokenizer_path.read_bytes())
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}))
    out = convert_hf(hf, tmp_path / "ckpt")
    meta = read_checkpoint_meta(out)
    assert meta["chat_format"] == "llama2" and meta["tokenizer"] == "tokenizer.model"
    assert isinstance(load_tokenizer(out), SentencePieceTokenizer)


def test_no_chat_template_records_null(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args)
    (hf / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    out = convert_hf(hf, tmp_path / "ckpt")
    assert read_checkpoint_meta(out)["chat_format"] is None


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_type": "gpt2"}, r"model_type is 'gpt2'.*'llama', 'mistral'"),
        ({"model_type": "qwen2"}, r"'qwen2'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling of type 'llama3'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"head_dim": 32}, "head_dim 32"),
    ],
)
def test_unsupported_configs(tmp_path: Path, bpe_dir: Path, config: dict, match: str) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args, **config)
    add_bpe_tokenizer(hf, bpe_dir)
    with pytest.raises(ValueError, match=match):
        convert_hf(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_default_rope_scaling_and_mistral_are_accepted(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args, model_type="mistral", sliding_window=1024,
                  rope_scaling={"rope_type": "default"})
    add_bpe_tokenizer(hf, bpe_dir)
    out = convert_hf(hf, tmp_path / "ckpt")
    assert read_checkpoint_meta(out)["context_length"] == 1024  # exact only within the window


def test_bias_weights_are_refused(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args)
    sd = safetensors_torch.load_file(hf / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(args.dim)
    safetensors_torch.save_file(sd, hf / "model.safetensors")
    add_bpe_tokenizer(hf, bpe_dir)
    with pytest.raises(ValueError, match="q_proj.bias.*Bias"):
        convert_hf(hf, tmp_path / "ckpt")


def test_missing_pieces(tmp_path: Path, bpe_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_hf(tmp_path, tmp_path / "ckpt")
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args, shards=2)
    add_bpe_tokenizer(hf, bpe_dir)
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        convert_hf(hf, tmp_path / "ckpt")


def test_vocab_mismatch_is_named(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB + 21, n_layers=1)  # a padded embedding table
    hf = write_hf(tmp_path / "hf", tiny_model(args), args)
    add_bpe_tokenizer(hf, bpe_dir)
    with pytest.raises(ValueError, match=f"vocab_size {N_VOCAB + 21}"):
        convert_hf(hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_existing_out_dir_needs_force(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB, n_layers=1)
    hf = write_hf(tmp_path / "hf", tiny_model(args), args)
    add_bpe_tokenizer(hf, bpe_dir)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "params.json").write_text("old")
    for force in (False, True):  # not a checkpoint this tool wrote (no llama_offload.json): never replaced
        with pytest.raises(FileExistsError, match="holds no llama_offload.json"):
            convert_hf(hf, out, force=force)
    assert [p.name for p in out.iterdir()] == ["params.json"] and (out / "params.json").read_text() == "old"
    (out / "llama_offload.json").write_text("{}")  # as an earlier conversion leaves it
    with pytest.raises(FileExistsError, match="--force"):
        convert_hf(hf, out)
    assert (out / "params.json").read_text() == "old"
    convert_hf(hf, out, force=True)
    assert (out / "params.json").read_text() != "old"
    with pytest.raises(FileExistsError, match="even with --force"):
        convert_hf(hf, tmp_path, force=True)  # would delete the model being converted


# --- which q/k row order our RoPE needs -------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF LlamaRotaryEmbedding + apply_rotary_pos_emb: channel i rotates with channel i + head_dim/2."""
    seqlen, head_dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (head_dim/2,)
    freqs = torch.outer(torch.arange(seqlen).float(), inv_freq)  # (seqlen, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (seqlen, head_dim)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # (1, seqlen, 1, head_dim)
    return x * cos + rotate_half(x) * sin


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bshd,bthd->bhst", q, k)  # (bs, n_heads, seqlen, seqlen)


def test_rope_order_hf_rows_with_rotate_half_equal_meta_rows_with_complex_rope() -> None:
    torch.manual_seed(0)
    n_heads, head_dim, dim, seqlen, theta = 4, 16, 64, 12, 1e4
    wq, wk = torch.randn(n_heads * head_dim, dim), torch.randn(n_heads * head_dim, dim)
    x = torch.randn(1, seqlen, dim)

    def project(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).view(1, seqlen, n_heads, head_dim)  # (bs, seqlen, n_heads, head_dim)

    # Ours: Meta rows, complex RoPE on interleaved pairs.
    freqs = precompute_freqs_cis(head_dim, seqlen, theta)
    q_meta, k_meta = apply_rotary_emb(project(wq), project(wk), freqs)
    # HF: permuted rows, rotate_half.
    wq_hf, wk_hf = permute_meta_to_hf(wq, n_heads), permute_meta_to_hf(wk, n_heads)
    q_hf, k_hf = hf_rope(project(wq_hf), theta), hf_rope(project(wk_hf), theta)
    torch.testing.assert_close(scores(q_hf, k_hf), scores(q_meta, k_meta), rtol=1e-4, atol=1e-4)
    # Same rows in both conventions give different attention: the permutation is what makes them agree.
    q_wrong, k_wrong = apply_rotary_emb(project(wq_hf), project(wk_hf), freqs)
    assert not torch.allclose(scores(q_wrong, k_wrong), scores(q_meta, k_meta), atol=1e-2)
    # And undoing it restores Meta's rows exactly.
    assert torch.equal(permute_hf_to_meta(wq_hf, n_heads), wq)


def test_converting_without_undoing_the_permutation_would_be_wrong(tmp_path: Path, bpe_dir: Path) -> None:
    args = tiny_args(vocab_size=N_VOCAB)
    model = tiny_model(args, seed=6)
    hf = write_hf(tmp_path / "hf", model, args)
    add_bpe_tokenizer(hf, bpe_dir)
    converted = load(convert_hf(hf, tmp_path / "ckpt"))
    sd = converted.state_dict()
    for i in range(args.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = permute_meta_to_hf(sd[f"layers.{i}.attention.wq.weight"], args.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = permute_meta_to_hf(sd[f"layers.{i}.attention.wk.weight"], args.kv_heads)
    converted.load_state_dict(sd, assign=True)
    assert not torch.allclose(logits(converted), logits(model), atol=1e-3)
