"""Checkpoint I/O on tiny random models: shard merging, mmap loading and every user-facing error."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import (
    SHARD_DIMS, find_shards, load_model, load_state_dict, random_state_dict, save_checkpoint,
)
from llama_offload.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, rope_theta=1e6)
MAX_SEQ, MAX_BATCH = 32, 2


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs(**TINY, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


@pytest.fixture(scope="module")
def sd(args: ModelArgs) -> dict[str, torch.Tensor]:
    return random_state_dict(args, seed=1)


@pytest.fixture
def ckpt(tmp_path: Path, sd, args) -> Path:
    d = tmp_path / "ckpt"
    save_checkpoint(sd, args, d, num_shards=2)
    return d


def _logits(model) -> torch.Tensor:
    model.setup_caches(MAX_BATCH, MAX_SEQ, "cpu", torch.float32)
    tokens = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 95]])
    return model(tokens, 0)


def _edit_shard(path: Path, fn) -> None:
    shard = torch.load(path, map_location="cpu", weights_only=True)  # no mmap: we overwrite the file
    fn(shard)
    torch.save(shard, path)


# --- round trips -------------------------------------------------------------------------------------


def test_table_covers_every_key(args):
    with torch.device("meta"):
        keys = Transformer(args).state_dict().keys()
    for k in keys:
        assert sum(bool(re.match(p, k)) for p, _ in SHARD_DIMS) == 1, k


def test_random_state_dict_is_seeded_and_not_trivial(args, sd):
    again = random_state_dict(args, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = random_state_dict(args, seed=2)
    assert not torch.equal(sd["layers.0.attention.wq.weight"], other["layers.0.attention.wq.weight"])
    norm = sd["layers.1.ffn_norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and abs(norm.mean().item() - 1) < 0.05
    assert abs(sd["output.weight"].std().item() - 0.02) < 0.005
    half = random_state_dict(args, seed=1, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_round_trip_1_2_4_shards_same_tensors_and_logits(tmp_path, args, sd, capsys):
    logits = {}
    for n in (1, 2, 4):
        d = tmp_path / f"ckpt{n}"
        save_checkpoint(sd, args, d, num_shards=n)
        assert [p.name for p in find_shards(d)] == [f"consolidated.{i:02d}.pth" for i in range(n)]
        assert json.loads((d / "params.json").read_text()) == args.to_params()

        loaded = load_state_dict(d, args)
        assert list(loaded) == list(sd)
        for k in sd:
            assert torch.equal(loaded[k], sd[k]), (n, k)

        model = load_model(d, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)
        assert not model.training
        logits[n] = _logits(model)
    assert torch.equal(logits[2], logits[1])
    assert torch.equal(logits[4], logits[1])

    err = capsys.readouterr().err
    assert "loading consolidated.01.pth (2/2," in err
    assert "loading consolidated.03.pth (4/4," in err
    assert "loaded 21 tensors" in err


def test_shards_are_split_as_meta_does(tmp_path, args, sd):
    save_checkpoint(sd, args, tmp_path / "c", num_shards=2)
    s1 = torch.load(tmp_path / "c" / "consolidated.01.pth", map_location="cpu", weights_only=True)
    assert s1["tok_embeddings.weight"].shape == (96, 32)  # Llama 2: embedding split along dim
    assert s1["layers.0.attention.wq.weight"].shape == (32, 64)
    assert s1["layers.0.attention.wk.weight"].shape == (16, 64)  # one of the two kv heads
    assert s1["layers.0.attention.wo.weight"].shape == (64, 32)
    assert s1["layers.0.feed_forward.w2.weight"].shape == (64, args.ffn_hidden_dim // 2)
    assert s1["norm.weight"].shape == (64,)
    assert torch.equal(s1["layers.0.attention.wq.weight"], sd["layers.0.attention.wq.weight"][32:])
    # Each shard's tensors are saved compactly, not as views of the whole tensor's storage.
    assert s1["layers.0.attention.wq.weight"].untyped_storage().nbytes() == 32 * 64 * 4


def test_llama3_embedding_split_along_vocab_is_merged(tmp_path, args, sd):
    d = tmp_path / "c"
    save_checkpoint(sd, args, d, num_shards=2)
    for i in range(2):  # re-cut the embedding the way Llama 3's VocabParallelEmbedding does
        _edit_shard(d / f"consolidated.{i:02d}.pth",
                    lambda s, i=i: s.__setitem__("tok_embeddings.weight", sd["tok_embeddings.weight"][48 * i : 48 * (i + 1)].clone()))
    loaded = load_state_dict(d, args, show_progress=False)
    assert torch.equal(loaded["tok_embeddings.weight"], sd["tok_embeddings.weight"])


def test_rope_freqs_is_dropped(ckpt, args, sd):
    for i in range(2):
        _edit_shard(ckpt / f"consolidated.{i:02d}.pth", lambda s: s.__setitem__("rope.freqs", torch.randn(8)))
    loaded = load_state_dict(ckpt, args, show_progress=False)
    assert "rope.freqs" not in loaded
    assert set(loaded) == set(sd)
    load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_single_shard_load_is_mmap_backed_and_keeps_dtype(tmp_path, args, sd, dtype):
    d = tmp_path / "c"
    save_checkpoint({k: v.to(dtype) for k, v in sd.items()}, args, d)
    model = load_model(d, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False)
    params = dict(model.named_parameters())
    assert all(p.dtype == dtype for p in params.values())
    assert all(p.device.type == "cpu" for p in params.values())
    assert torch.equal(params["output.weight"], sd["output.weight"].to(dtype))

    if sys.platform.startswith("linux"):  # the file mapping is visible in /proc/self/maps
        ranges = _mapped_ranges((d / "consolidated.00.pth").resolve())
        assert ranges, "consolidated.00.pth is not memory-mapped"
        for name, p in params.items():
            assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} is a copy, not the file mapping"

    # An explicit dtype converts; the result is no longer the file, and the logits are finite.
    model32 = load_model(d, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, dtype=torch.float32, show_progress=False)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    assert torch.isfinite(_logits(model32)).all()


def test_vocab_from_tokenizer_when_params_say_minus_one(tmp_path, args, sd):
    d = tmp_path / "c"
    save_checkpoint(sd, args, d)
    (d / "params.json").write_text(json.dumps({**args.to_params(), "vocab_size": -1}))
    model = load_model(d, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, vocab_size=96, show_progress=False)
    assert model.vocab_size == 96
    # Matching numbers on both sides are fine too.
    save_checkpoint(sd, args, tmp_path / "c2")
    load_model(tmp_path / "c2", max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, vocab_size=96, show_progress=False)


# --- errors ------------------------------------------------------------------------------------------


def test_missing_dir(tmp_path, args):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*params.json"):
        load_model(tmp_path / "nowhere", max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_shards(tmp_path / "nowhere")


def test_missing_params_json(ckpt):
    (ckpt / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


def test_no_shards(tmp_path, args):
    (tmp_path / "params.json").write_text(json.dumps(args.to_params()))
    with pytest.raises(FileNotFoundError, match=r"No consolidated\.\*\.pth shards.*params\.json"):
        load_model(tmp_path, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


def test_gap_in_shards(tmp_path, args, sd):
    d = tmp_path / "c"
    save_checkpoint(sd, args, d, num_shards=4)
    (d / "consolidated.01.pth").unlink()
    (d / "consolidated.03.pth").unlink()
    with pytest.raises(ValueError) as e:
        find_shards(d)
    msg = str(e.value)
    assert "[1]" in msg and "consolidated.01.pth" in msg and "[0, 2]" in msg


def test_missing_trailing_shards_says_how_many_are_needed(tmp_path, args, sd):
    d = tmp_path / "c"
    save_checkpoint(sd, args, d, num_shards=4)
    (d / "consolidated.02.pth").unlink()
    (d / "consolidated.03.pth").unlink()
    with pytest.raises(RuntimeError) as e:
        load_state_dict(d, args, show_progress=False)
    msg = str(e.value)
    assert "'tok_embeddings.weight'" in msg and "(96, 32)" in msg and "(96, 64)" in msg
    assert "Found 2 shard(s)" in msg and "needs 4" in msg


def test_truncated_shard(ckpt, args):
    path = ckpt / "consolidated.01.pth"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    msg = str(e.value)
    assert str(path) in msg and "re-download or re-convert" in msg and "kB" in msg


def test_not_a_checkpoint_file(ckpt, args):
    (ckpt / "consolidated.00.pth").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match=r"consolidated\.00\.pth.*re-download or re-convert"):
        load_state_dict(ckpt, args, show_progress=False)


def test_missing_key(ckpt, args):
    _edit_shard(ckpt / "consolidated.00.pth", lambda s: s.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    assert "consolidated.00.pth" in str(e.value) and "'layers.1.ffn_norm.weight'" in str(e.value)


def test_key_missing_from_later_shard(ckpt, args):
    _edit_shard(ckpt / "consolidated.01.pth", lambda s: s.pop("layers.0.attention.wk.weight"))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    msg = str(e.value)
    assert "consolidated.01.pth" in msg and "lacks 'layers.0.attention.wk.weight'" in msg and "consolidated.00.pth" in msg


def test_unexpected_key(ckpt, args):
    _edit_shard(ckpt / "consolidated.00.pth", lambda s: s.__setitem__("layers.2.attention.wq.weight", torch.zeros(1)))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    assert "consolidated.00.pth" in str(e.value) and "'layers.2.attention.wq.weight'" in str(e.value)


def test_later_shard_with_extra_key(ckpt, args):
    _edit_shard(ckpt / "consolidated.01.pth", lambda s: s.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    msg = str(e.value)
    assert "consolidated.01.pth" in msg and "has extra 'extra.weight'" in msg


def test_wrong_shape_key(ckpt, args):
    _edit_shard(ckpt / "consolidated.00.pth",
                lambda s: s.__setitem__("layers.1.attention.wv.weight", torch.zeros(8, 64)))
    _edit_shard(ckpt / "consolidated.01.pth",
                lambda s: s.__setitem__("layers.1.attention.wv.weight", torch.zeros(8, 64)))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    msg = str(e.value)
    assert "'layers.1.attention.wv.weight'" in msg and "(16, 64)" in msg and "(32, 64)" in msg
    assert "consolidated.00.pth" in msg


def test_params_json_not_matching_weights(ckpt, args):
    # Weights for 2 kv heads, params.json saying 4: a shape error that no shard count explains.
    (ckpt / "params.json").write_text(json.dumps({**args.to_params(), "n_kv_heads": 4}))
    with pytest.raises(RuntimeError, match=r"'layers\.0\.attention\.wk\.weight'.*\(32, 64\).*\(64, 64\).*params\.json"):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False)


def test_shards_of_different_dtypes(ckpt, args):
    _edit_shard(ckpt / "consolidated.01.pth", lambda s: s.update({k: v.half() for k, v in s.items()}))
    with pytest.raises(RuntimeError) as e:
        load_state_dict(ckpt, args, show_progress=False)
    msg = str(e.value)
    assert "consolidated.01.pth" in msg and "torch.float16" in msg and "torch.float32" in msg and "'tok_embeddings.weight'" in msg


def test_params_json_unknown_key(ckpt):
    # A key of a feature this version lacks (here: Llama 3.2 Vision's) must stop the load, not be ignored.
    (ckpt / "params.json").write_text(json.dumps({**json.loads((ckpt / "params.json").read_text()), "vision_chunk_size": 560}))
    with pytest.raises(ValueError, match="params.json.*vision_chunk_size"):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


def test_params_json_not_json(ckpt):
    (ckpt / "params.json").write_text("{dim: 64,")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


def test_vocab_minus_one_without_tokenizer(ckpt, args):
    (ckpt / "params.json").write_text(json.dumps({**args.to_params(), "vocab_size": -1}))
    with pytest.raises(ValueError, match="params.json has vocab_size -1.*vocab_size="):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)


def test_vocab_mismatch(ckpt):
    with pytest.raises(ValueError, match="params.json has vocab_size 96 but the tokenizer has 32000"):
        load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, vocab_size=32000)


def test_save_refuses_existing_checkpoint(ckpt, args, sd):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(FileExistsError, match="already holds.*params.json.*another directory or delete"):
        save_checkpoint(sd, args, ckpt, num_shards=1)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]  # no temporary directory left behind


def test_save_into_empty_or_unrelated_dir(tmp_path, args, sd):
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(sd, args, empty)
    assert sorted(p.name for p in empty.iterdir()) == ["consolidated.00.pth", "params.json"]

    shared = tmp_path / "with_tokenizer"
    shared.mkdir()
    (shared / "tokenizer.model").write_bytes(b"keep me")
    save_checkpoint(sd, args, shared, num_shards=2)
    assert (shared / "tokenizer.model").read_bytes() == b"keep me"
    assert len(find_shards(shared)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "with_tokenizer"]


def test_save_rejects_bad_split_and_bad_state_dict(tmp_path, args, sd):
    with pytest.raises(ValueError, match=r"'tok_embeddings\.weight'.*not divisible by 3"):
        save_checkpoint(sd, args, tmp_path / "c", num_shards=3)
    with pytest.raises(ValueError, match=r"missing 'norm\.weight'"):
        save_checkpoint({k: v for k, v in sd.items() if k != "norm.weight"}, args, tmp_path / "c")
    wider = dataclasses.replace(args, dim=128)
    with pytest.raises(ValueError, match=r"'tok_embeddings\.weight'.*\(96, 64\).*\(96, 128\)"):
        save_checkpoint(sd, wider, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# --- the script --------------------------------------------------------------------------------------


def test_make_random_checkpoint_script(tmp_path):
    d = tmp_path / "tiny"
    # The script must find the package itself: keep PYTHONPATH's other entries (installed tools), drop the repo.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO.resolve()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tools" / "make_random_checkpoint.py"), "--ckpt_dir", str(d),
         "--preset", "tiny", "--num_shards", "2", "--dtype", "float16", "--seed", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    params = json.loads((d / "params.json").read_text())
    assert params["dim"] == 64 and params["vocab_size"] == 512 and params["rope_theta"] == 1e6
    assert params["n_kv_heads"] == 2
    model = load_model(d, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, vocab_size=512, show_progress=False)
    assert model.tok_embeddings.weight.dtype == torch.float16
    assert model.tok_embeddings.weight.shape == (512, 64)
