"""Running quantized models on the CPU: the packed (pageable) blocks equal the plain model bit for bit, a checkpoint
written by ``llama-offload quantize`` equals ``--quantize`` at load, and the run commands refuse bad quantization
flags before loading. The same code pages on a GPU (tests/test_cuda_quant.py checks it there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_offload.checkpoint.load import load_model
from llama_offload.checkpoint.meta import META_FILENAME
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import QuantEmbedding, QuantLinear, QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint

MAX_SEQ, MAX_BATCH = 32, 2
SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 64, True)]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 512, (MAX_BATCH, 7), generator=g), torch.randint(0, 512, (MAX_BATCH, 5), generator=g)


def run_steps(model, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, then one decode step per column of ``tokens``: every step's logits."""
    logits, pos = [model(prompt, 0)], prompt.shape[1]
    for t in tokens.unbind(1):
        logits.append(model(t[:, None], pos))
        pos += 1
    return logits


def plain(ckpt: Path, spec: QuantSpec | None) -> list[torch.Tensor]:
    model = load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False, quantize=spec)
    model.setup_caches(MAX_BATCH, MAX_SEQ, "cpu", torch.float32)
    return run_steps(model, *inputs())


def packed(ckpt: Path, spec: QuantSpec | None) -> list[torch.Tensor]:
    model = load_model(ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False, quantize=spec)
    return run_steps(offload(model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, device="cpu"), *inputs())


@pytest.fixture(scope="module")
def unquantized(tiny_ckpt: Path) -> list[torch.Tensor]:
    return plain(tiny_ckpt, None)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}{' +embeddings' if s.embeddings else ''}")
def test_packed_quantized_equals_plain_quantized_exactly(tiny_ckpt: Path, spec: QuantSpec,
                                                         unquantized: list[torch.Tensor]) -> None:
    model = load_model(tiny_ckpt, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, show_progress=False, quantize=spec)
    assert isinstance(model.layers[1].feed_forward.w2, QuantLinear)
    assert isinstance(model.tok_embeddings, QuantEmbedding) == spec.embeddings
    want, got = plain(tiny_ckpt, spec), packed(tiny_ckpt, spec)
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), (step, (a - b).abs().max().item())
    # Quantization happened, and stayed close: the logits move, by less than the unquantized logits' spread.
    moved = max((a - b).abs().max().item() for a, b in zip(want, unquantized))
    spread = max(u.std().item() for u in unquantized)
    assert 0 < moved < spread, (moved, spread)


@pytest.mark.parametrize("spec", [QuantSpec(8, None, True), QuantSpec(4, 32)], ids=lambda s: s.name)
def test_a_quantized_checkpoint_equals_quantizing_at_load(tiny_ckpt: Path, tmp_path: Path, spec: QuantSpec) -> None:
    out = quantize_checkpoint(tiny_ckpt, tmp_path / "q", spec)
    for a, b in zip(packed(out, None), packed(tiny_ckpt, spec)):
        assert torch.equal(a, b)


# --- the run commands ---------------------------------------------------------------------------------


@pytest.fixture
def cli(run_cli):
    """``llama-offload ARGV`` in this process (conftest.run_cli): returncode, stdout, stderr."""
    return run_cli


@pytest.fixture(scope="module")
def int4_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-int4", QuantSpec(4, 64))


def test_complete_with_quantize_at_load(tiny_ckpt: Path, cli) -> None:
    tok = str(tiny_ckpt.parent / "tokenizer.model")
    p = cli("complete", "Once upon a time", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", tok, "--quantize", "int4",
            "--max_gen_len", "6", "--temperature", "0", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "quantizing to int4 g64: [" in p.stderr and "14/14 matrices" in p.stderr
    assert p.stdout.strip()


def test_info_shows_the_quantized_block_bytes(tiny_ckpt: Path, int4_ckpt: Path, cli) -> None:
    tok = str(tiny_ckpt.parent / "tokenizer.model")
    stored = cli("info", "--ckpt_dir", str(int4_ckpt), "--tokenizer_path", tok)
    at_load = cli("info", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", tok, "--quantize", "int4")
    full = cli("info", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", tok)
    for p in (stored, at_load, full):
        assert p.returncode == 0, p.stderr
    line = lambda p: next(x for x in p.stdout.splitlines() if x.startswith("weights"))  # noqa: E731
    assert "per block (int4 g64" in line(stored), stored.stdout
    assert "per block (int4 g64)" in line(at_load), at_load.stdout
    bytes_of = lambda p: line(p).replace(", as stored", "")  # noqa: E731
    assert bytes_of(stored) == bytes_of(at_load)  # the plan counts what --quantize would page
    assert "int4" not in line(full)


def test_quantize_flag_on_a_quantized_checkpoint_is_refused(tiny_ckpt: Path, int4_ckpt: Path, cli) -> None:
    p = cli("complete", "Hi", "--ckpt_dir", str(int4_ckpt), "--quantize", "int8", "--device", "cpu")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "already quantized" in p.stderr and "Drop --quantize" in p.stderr, p.stderr


def test_a_newer_quantization_format_is_refused(int4_ckpt: Path, tmp_path: Path, cli) -> None:
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(int4_ckpt, newer)
    meta = json.loads((newer / META_FILENAME).read_text())
    meta["quantization"]["format_version"] = 99
    (newer / META_FILENAME).write_text(json.dumps(meta))
    p = cli("complete", "Hi", "--ckpt_dir", str(newer), "--device", "cpu")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "version 99" in p.stderr and "newer llama_offload" in p.stderr, p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int4", "--group_size", "128"], "--group_size 128 does not divide the input features"),
    (["--quantize", "int3"], "--quantize must be int8 or int4"),
    (["--quantize", "int8", "--group_size", "64"], "--group_size applies to int4 only"),
    (["--group_size", "64"], "--group_size applies to --quantize int8|int4"),
    (["--quantize", "int4", "--group_size", "48"], "--group_size must be one of 32, 64, 128"),
])
def test_bad_quantize_flags_are_refused_before_loading(tiny_ckpt: Path, flags: list[str], message: str,
                                                       cli) -> None:
    p = cli("complete", "Hi", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", str(tiny_ckpt.parent / "tokenizer.model"),
            "--device", "cpu", *flags)
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr
    assert message in p.stderr, p.stderr
    assert "loading" not in p.stderr  # refused before any shard was opened
