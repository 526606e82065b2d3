"""scripts/bench/bench_meta.py on the CPU: Meta's reference model, loaded our way from our checkpoint, is our model.

Meta's code is ``llama_models/llama3/model.py`` of the PyPI wheel llama-models==0.3.0, the wheel the tokenizer
tests already fetch (see test_tiktoken.py). It is taken, in order, from: LLAMA_OFFLOAD_META_REF (a directory
holding ``llama_models/``), the installed ``llama_models`` package, a copy of the wheel in the repository's
``.whl/`` (where the GPU wheels are gathered), or ``pip download --no-deps`` into the pytest cache
(``.pytest_cache/d/llama3_reference_model``), keeping only the four files the model needs. The tests that
need it skip, with the reason, only when none of these works.

What is checked: ``meta_logits`` (Meta's explicit attention, its KV cache, its RoPE with our rope_theta) gives
our ``Transformer``'s logits for a prompt and for greedy decode steps, with grouped-query and multi-head
attention; ``bench_meta`` runs the benchmark protocol on the CPU and cleans up the process group it made;
failures and a missing package come back as rows.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairscale", reason="Meta's reference model is built from FairScale's parallel layers")

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint  # noqa: E402
from llama_offload.model.transformer import Transformer  # noqa: E402
from test_tiktoken import LLAMA_MODELS  # noqa: E402  the same pinned wheel as the tokenizer tests

REPO = Path(__file__).resolve().parents[2]
MEMBERS = ("llama_models/__init__.py", "llama_models/llama3/__init__.py", "llama_models/llama3/args.py",
           "llama_models/llama3/model.py")


from scripts_loader import load_script  # noqa: E402

common = load_script("common")
bm = load_script("bench_meta")

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=32)
ARGS = [ModelArgs(**TINY, n_kv_heads=2), ModelArgs(**TINY, rope_theta=1e6, norm_eps=1e-6)]


# --- getting Meta's code ----------------------------------------------------------------------------------------


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        for member in MEMBERS:
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_suffix(".part")
            part.write_bytes(whl.read(member))
            os.replace(part, target)  # a cut-off run never leaves a half file that looks complete


def _fetch(cache: Path) -> Path:
    ref = cache / "ref"
    if all((ref / m).is_file() for m in MEMBERS):
        return ref
    local = sorted((REPO / ".whl").glob("llama_models-0.3.0-*.whl"))
    if local:
        _extract(local[0], ref)
        return ref
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                           LLAMA_MODELS, "-d", str(wheels)], capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob("llama_models-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"pip download {LLAMA_MODELS} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    _extract(found[0], ref)
    for w in found:
        w.unlink()
    return ref


@pytest.fixture(scope="session")
def meta_ref(request: pytest.FixtureRequest):
    """None when the installed package is used, else the directory to import it from."""
    if os.environ.get(bm.ENV_VAR):
        return Path(os.environ[bm.ENV_VAR])
    if importlib.util.find_spec("llama_models") is not None:
        return None
    try:
        return _fetch(Path(request.config.cache.mkdir("llama3_reference_model")))
    except Exception as e:
        pytest.skip(f"Meta's reference model ({LLAMA_MODELS}) could not be had: {e}. "
                    f"Set {bm.ENV_VAR} to an unzipped copy of the wheel.")


# --- the model --------------------------------------------------------------------------------------------------


def ours(state_dict: dict[str, torch.Tensor], args: ModelArgs, batch: int) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(state_dict)
    model.setup_caches(batch, 64, "cpu", torch.float32)
    return model.eval()


@pytest.mark.parametrize("args", ARGS, ids=["gqa", "mha-theta1e6"])
def test_meta_logits_match_ours(args: ModelArgs, meta_ref, tmp_path: Path) -> None:
    sd = random_state_dict(args, seed=1)
    save_checkpoint(sd, args, tmp_path / "ckpt")
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    prefill, fed, decoded = bm.meta_logits(tmp_path / "ckpt", args, tokens, decode_steps=3, device="cpu",
                                           dtype=torch.float32, ref_path=meta_ref)
    assert prefill.shape == (2, 10, args.vocab_size) and fed.shape == (2, 3) and decoded.shape == (2, 3, args.vocab_size)
    model = ours(sd, args, 2)
    with torch.inference_mode():
        expected = model(tokens, 0)
        assert expected.std() > 0.05  # logits that vary, so a match means something
        torch.testing.assert_close(prefill, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(fed[:, :1], expected[:, -1].argmax(-1, keepdim=True))
        for i in range(3):  # the KV-cached path, fed Meta's greedy tokens
            step = model(fed[:, i:i + 1], 10 + i)
            torch.testing.assert_close(decoded[:, i], step[:, -1], atol=1e-5, rtol=1e-5)
            if i + 1 < 3:
                assert torch.equal(fed[:, i + 1], step[:, -1].argmax(-1))
    import torch.distributed as dist

    assert not dist.is_initialized()  # the one-process group made for Meta's layers is gone


def test_model_args_are_passed_not_defaulted(meta_ref) -> None:
    module = bm.meta_reference(meta_ref)
    assert module.ModelArgs().rope_theta == 500000  # Meta's Llama 3 default, wrong for a Llama 2 shape
    margs = bm.meta_model_args(module, ModelArgs(**TINY), max_batch_size=3, max_seq_len=40)
    assert (margs.rope_theta, margs.n_kv_heads, margs.max_batch_size, margs.max_seq_len) == (10000.0, 4, 3, 40)


def test_wrong_rope_theta_would_show(meta_ref, tmp_path: Path) -> None:
    # The match above is not vacuous: Meta's model with its own rope_theta default gives other logits.
    args = ARGS[0]
    sd = random_state_dict(args, seed=1)
    tokens = torch.arange(12).unsqueeze(0)
    good = bm.meta_logits(None, args, tokens, decode_steps=0, device="cpu", dtype=torch.float32, state_dict=sd,
                          ref_path=meta_ref)[0]
    other = ModelArgs(**{**args.to_params(), "rope_theta": 500000.0})
    bad = bm.meta_logits(None, other, tokens, decode_steps=0, device="cpu", dtype=torch.float32, state_dict=sd,
                         ref_path=meta_ref)[0]
    assert (good - bad).abs().max() > 1e-3


def test_bench_meta_protocol_on_cpu(meta_ref, tmp_path: Path) -> None:
    args = ARGS[0]
    save_checkpoint(random_state_dict(args), args, tmp_path / "ckpt")
    row = bm.bench_meta(tmp_path / "ckpt", args, steps=2, device="cpu", dtype=torch.float32, ref_path=meta_ref)
    assert set(common.PEER_KEYS) <= set(row)
    assert "FAILED" not in row["note"], row["note"]
    assert all(isinstance(row[k], float) and row[k] > 0 for k in ("decode_ms_b1", "decode_ms_b8", "prefill_s_512"))
    assert row["peak_gpu_gib"] is None  # no GPU, no memory figure
    assert "llama3/model.py" in row["note"] and "8x512" in row["note"]
    row = bm.bench_meta(tmp_path / "ckpt", args, steps=1, device="cpu", dtype=torch.float32, ref_path=meta_ref,
                        max_batch_size=1)
    assert row["decode_ms_b8"] is None and row["decode_ms_b1"] > 0 and "no decode_ms_b8" in row["note"]
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_bench_meta_failures_are_rows(meta_ref, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ARGS[0]
    row = bm.bench_meta(tmp_path / "missing", args, steps=1, device="cpu", dtype=torch.float32, ref_path=meta_ref)
    assert row["note"].startswith("FAILED building/warm-up: FileNotFoundError") and row["decode_ms_b1"] is None

    def not_there(ref_path=None):
        raise ImportError("No module named 'llama_models'")

    monkeypatch.setattr(bm, "meta_reference", not_there)
    row = bm.bench_meta(tmp_path, args, device="cpu")
    assert row["note"].startswith("not installed") and all(row[k] is None for k in ("decode_ms_b1", "prefill_s_512"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_bench_meta_without_gpu_says_so(tmp_path: Path) -> None:
    row = bm.bench_meta(tmp_path, ARGS[0])
    assert row["note"] == "skipped: CUDA is not available" and row["decode_ms_b1"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_meta_fp16_on_gpu_matches_ours(meta_ref, tmp_path: Path) -> None:
    # On the GPU machine: Meta's explicit attention in fp16 against our model in fp16 on the same device.
    args = ARGS[0]
    sd = random_state_dict(args, seed=1, dtype=torch.float16)
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    prefill, fed, decoded = bm.meta_logits(None, args, tokens, decode_steps=3, device="cuda", dtype=torch.float16,
                                           state_dict=sd, ref_path=meta_ref)
    model = Transformer(args)
    model.load_state_dict(sd)
    model = model.to("cuda", torch.float16).eval()
    model.setup_caches(2, 64, "cuda", torch.float16)
    with torch.inference_mode():
        torch.testing.assert_close(prefill, model(tokens.cuda(), 0).float().cpu(), atol=1e-2, rtol=1e-2)
        for i in range(3):
            step = model(fed[:, i:i + 1].cuda(), 10 + i)[:, -1].float().cpu()
            torch.testing.assert_close(decoded[:, i], step, atol=1e-2, rtol=1e-2)
