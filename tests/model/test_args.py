import json

import pytest

from llama_offload.model.args import ModelArgs


def test_llama2_7b_params_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                "norm_eps": 1e-05, "vocab_size": -1}))
    args = ModelArgs.from_json(path, max_seq_len=512)
    assert (args.head_dim, args.kv_heads, args.ffn_hidden_dim) == (128, 32, 11008)
    assert args.max_seq_len == 512 and args.vocab_size == -1


def test_llama2_70b_shapes():
    args = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096)
    assert (args.kv_heads, args.ffn_hidden_dim) == (8, 28672)


def test_round_trip_through_params():
    args = ModelArgs(dim=64, n_heads=4, n_kv_heads=2, rope_theta=1e6, vocab_size=96)
    assert ModelArgs.from_dict(args.to_params()) == args
    assert "max_seq_len" not in args.to_params()


@pytest.mark.parametrize(
    "params, words",
    [
        ({"dim": 100, "n_heads": 3}, ["dim (100)", "n_heads (3)"]),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, ["n_kv_heads (3)"]),
        ({"dim": 60, "n_heads": 4}, ["head_dim", "15"]),
        ({"dim": 64, "n_heads": 4, "flash": True}, ["['flash']", "Known keys"]),
        ({"dim": 64, "n_heads": 4, "vocab_size": 0}, ["vocab_size"]),
        ({"dim": 64, "n_heads": 4, "n_layers": 0}, ["n_layers"]),
    ],
)
def test_bad_params_are_rejected_clearly(params, words):
    with pytest.raises(ValueError) as e:
        ModelArgs.from_dict(params, source="ckpt/params.json")
    assert "ckpt/params.json" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_and_corrupt_params_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        ModelArgs.from_json(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelArgs.from_json(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ModelArgs.from_json(tmp_path / "params.json")
