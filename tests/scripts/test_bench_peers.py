"""scripts/bench/bench_peers.py on the CPU: the Hugging Face checkpoint it writes is our model, and the protocol runs
(``common.measure_peer``, ``common.hbm_bandwidth``: scripts/bench/common.py, shared by the peers).

The peers themselves (accelerate's GPU offload, AirLLM) are measured on the GPU machine. What can be
proved here is that they would run the same model: transformers' LlamaForCausalLM loaded from
``write_hf_checkpoint``'s directory gives our ``Transformer``'s logits, prefill and cached decode alike.
transformers is not a dependency of the project: those tests skip without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors", reason="write_hf_checkpoint writes safetensors files")
from safetensors import safe_open  # noqa: E402

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import load_state_dict, random_state_dict  # noqa: E402
from llama_offload.model.transformer import Transformer  # noqa: E402

from scripts_loader import load_script  # noqa: E402

common = load_script("common")
bp = load_script("bench_peers")

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32)
# Grouped-query attention with the brief's shapes, and plain multi-head attention with another RoPE base and eps.
ARGS = [ModelArgs(**TINY), ModelArgs(**{**TINY, "n_kv_heads": None, "rope_theta": 1e6, "norm_eps": 1e-6})]


def needs_transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (only the peers need it)")


def ours(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(state_dict)
    model.setup_caches(1, 64, "cpu", torch.float32)
    return model.eval()


def hf_model(hf_dir: Path):
    transformers = needs_transformers()
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[dict[str, torch.Tensor], ModelArgs, Path]:
    args = ARGS[0]
    sd = random_state_dict(args)
    bp.write_hf_checkpoint(sd, args, tmp_path / "hf")
    return sd, args, tmp_path / "hf"


@pytest.mark.parametrize("args", ARGS, ids=["gqa", "mha-theta1e6"])
def test_hf_logits_match_ours(args: ModelArgs, tmp_path: Path) -> None:
    needs_transformers()
    sd = random_state_dict(args, seed=1)
    bp.write_hf_checkpoint(sd, args, tmp_path / "hf", shard_bytes=50_000)
    hf, model = hf_model(tmp_path / "hf"), ours(sd, args)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, 10), generator=gen)
    step = torch.randint(0, args.vocab_size, (1, 3), generator=gen)
    with torch.inference_mode():
        out = hf(input_ids=prompt, use_cache=True)
        expected = model(prompt, 0)
        assert expected.std() > 0.05  # logits that vary, so a match means something
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
        # The KV-cached path the decode benchmark times.
        out2 = hf(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(out2.logits, model(step, 10), atol=1e-5, rtol=1e-5)


def test_without_the_qk_permutation_logits_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The match above is not vacuous: skipping HF's q/k reordering changes the logits.
    needs_transformers()
    args = ARGS[0]
    sd = random_state_dict(args, seed=1)
    monkeypatch.setattr(bp, "_permute_qk", lambda w, n_heads: w)
    bp.write_hf_checkpoint(sd, args, tmp_path / "hf")
    prompt = torch.arange(10).unsqueeze(0)
    with torch.inference_mode():
        diff = (hf_model(tmp_path / "hf")(input_ids=prompt).logits - ours(sd, args)(prompt, 0)).abs().max()
    assert diff > 1e-3


def test_layout(tmp_path: Path) -> None:
    args = ARGS[0]
    sd = random_state_dict(args, dtype=torch.float16)
    out = tmp_path / "hf"
    bp.write_hf_checkpoint(sd, args, out, shard_bytes=30_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert not out.with_name("hf.partial").exists()

    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(args.n_layers)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.down_proj", "mlp.up_proj", "input_layernorm", "post_attention_layernorm")}
    assert set(index["weight_map"]) == expected
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            in_file = 0
            for name in f.keys():
                assert index["weight_map"][name] == file
                t = f.get_tensor(name)
                assert t.dtype == torch.float16
                in_file += t.numel() * t.element_size()
            assert in_file <= 30_000 or len(f.keys()) == 1  # a tensor over the limit gets a file of its own
            total += in_file
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 2 for t in sd.values())

    with safe_open(out / index["weight_map"]["model.layers.1.mlp.down_proj.weight"], framework="pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.mlp.down_proj.weight"), sd["layers.1.feed_forward.w2.weight"])
    with safe_open(out / index["weight_map"]["model.layers.0.self_attn.k_proj.weight"], framework="pt") as f:
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    meta_k = sd["layers.0.attention.wk.weight"]
    assert k.shape == meta_k.shape == (args.kv_heads * args.head_dim, args.dim) and not torch.equal(k, meta_k)
    # Head h's rows: Meta's pairs (2i, 2i+1) -> HF's halves (i, i + head_dim/2).
    hd = args.head_dim
    assert torch.equal(k[hd + 1], meta_k[hd + 2]) and torch.equal(k[hd + hd // 2 + 1], meta_k[hd + 3])

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, args.ffn_hidden_dim, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 96)
    assert config["torch_dtype"] == "float16" and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rms_norm_eps"] == args.norm_eps and config["rope_theta"] == args.rope_theta

    tok = json.loads((out / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == args.vocab_size

    with pytest.raises(FileExistsError):
        bp.write_hf_checkpoint(sd, args, out)


def test_refuses_a_wrong_state_dict(tmp_path: Path) -> None:
    args = ARGS[0]
    sd = random_state_dict(args)
    del sd["layers.1.ffn_norm.weight"]
    with pytest.raises(KeyError, match="layers.1.ffn_norm.weight"):
        bp.write_hf_checkpoint(sd, args, tmp_path / "a")
    sd = random_state_dict(args)
    sd["norm.weight"] = sd["norm.weight"].half()
    with pytest.raises(ValueError, match="one floating dtype"):
        bp.write_hf_checkpoint(sd, args, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tokenizer_loads(tiny) -> None:
    _, args, hf_dir = tiny
    from llama_offload.text.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir / "tokenizer.json")
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (args.vocab_size, 1, 2)
    transformers = needs_transformers()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)  # what AirLLM's constructor calls
    assert len(hf_tok) == args.vocab_size and hf_tok("tok5 tok7").input_ids == [5, 7]


def test_convert_hf_round_trip(tiny, tmp_path: Path) -> None:
    convert_hf = getattr(pytest.importorskip("llama_offload.convert.hf"), "convert_hf", None)
    if convert_hf is None:
        pytest.skip("llama_offload.convert.hf has no convert_hf")
    sd, args, hf_dir = tiny
    out = convert_hf(hf_dir, tmp_path / "meta")
    back_args = ModelArgs.from_json(Path(out) / "params.json")
    assert back_args.ffn_hidden_dim == args.ffn_hidden_dim and back_args.kv_heads == args.kv_heads
    back = load_state_dict(out, back_args, show_progress=False)
    assert back.keys() == sd.keys()
    for key, t in sd.items():
        assert torch.equal(back[key], t), key


def test_measure_peer_protocol(tiny) -> None:
    _, args, hf_dir = tiny
    model = hf_model(hf_dir)
    calls = []

    def forward(**kw):
        calls.append((tuple(kw["input_ids"].shape), kw["past_key_values"] is None))
        return model(**kw)

    figures = common.measure_peer(forward, args.vocab_size, "cpu", steps=2)
    assert set(figures) == {"prefill_s_512", "decode_ms_b1", "decode_ms_b8"}
    assert all(isinstance(v, float) and v > 0 for v in figures.values())
    assert calls == [((1, 8), True), ((1, 512), True),
                     ((1, 16), True), ((1, 1), False), ((1, 1), False),
                     ((8, 16), True), ((8, 1), False), ((8, 1), False)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_accelerate_without_gpu_reports_instead_of_faking(tiny) -> None:
    _, _, hf_dir = tiny
    r = bp.bench_accelerate(hf_dir, 1.0, steps=1)
    assert set(r) == set(common.PEER_KEYS)
    assert r["name"] == "accelerate (1 GiB)" and "CUDA is not available" in r["note"]
    assert all(r[k] is None for k in common.PEER_KEYS if k not in ("name", "note"))


def test_airllm(tiny, tmp_path: Path) -> None:
    sd, args, hf_dir = tiny
    try:
        import airllm  # noqa: F401
    except ImportError:
        r = bp.bench_airllm(hf_dir, device="cpu")
        assert r["note"].startswith("not installed") and r["decode_ms_b1"] is None
        pytest.skip("airllm is not installed: checked only that bench_airllm says so")
    needs_transformers()
    r = bp.bench_airllm(hf_dir, device="cpu", steps=1, shards_dir=tmp_path / "split", keep_split=True)
    assert "FAILED" not in r["note"], r["note"]
    assert all(isinstance(r[k], float) and r[k] > 0 for k in ("decode_ms_b1", "decode_ms_b8", "prefill_s_512"))
    assert (tmp_path / "split" / "splitted_model" / "model.layers.1.safetensors").is_file()
    # AirLLM streams the very same model.
    from airllm import AutoModel

    model = AutoModel.from_pretrained(str(hf_dir), device="cpu", dtype=torch.float32,
                                      layer_shards_saving_path=str(tmp_path / "split"))
    prompt = torch.arange(10).unsqueeze(0)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=prompt).logits, ours(sd, args)(prompt, 0), atol=1e-5, rtol=1e-5)


# --- the HBM floor -----------------------------------------------------------------------------------------------


def test_hbm_bandwidth_counts_a_read_and_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU the copy is timed with perf_counter: fake a clock where every copy takes 0.5 s.
    ticks = iter(x * 0.5 for x in range(100))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    assert common.hbm_bandwidth(1000, reps=3, device="cpu") == pytest.approx(2 * 1000 / 0.5)
    monkeypatch.undo()
    assert common.hbm_bandwidth(2**20, reps=2, device="cpu") > 1e6  # a real copy: at least 1 MB/s
    with pytest.raises(ValueError):
        common.hbm_bandwidth(0, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_hbm_bandwidth_needs_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        common.hbm_bandwidth(2**20)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hbm_bandwidth_on_the_gpu() -> None:
    # H100 SXM: ~3.35 TB/s peak, H200: ~4.8 TB/s; a copy reaches most of it. Anything above PCIe speeds is HBM.
    assert 3e11 < common.hbm_bandwidth(2**28, reps=3) < 6e12


@pytest.mark.parametrize("args", ARGS, ids=["gqa", "mha"])
def test_decode_read_bytes(args: ModelArgs) -> None:
    sd = random_state_dict(args, dtype=torch.float16)
    all_weights = sum(t.numel() * 2 for t in sd.values())
    embedding = sd["tok_embeddings.weight"].numel() * 2
    row = args.dim * 2
    assert bp.decode_read_bytes(args) == all_weights - embedding + row  # one embedding row per sequence
    kv = 2 * args.n_layers * args.kv_heads * args.head_dim * 2  # keys and values, per cached position
    assert bp.decode_read_bytes(args, batch=8, context_len=16) == all_weights - embedding + 8 * row + 8 * 16 * kv
    assert bp.decode_read_bytes(args, itemsize=4) == 2 * bp.decode_read_bytes(args)
