"""``llama-offload quantize`` (convert/quantize.py) on tiny random checkpoints, on the CPU.

The codes and scales written are compared with a plain reference quantizer written here (int8 per channel
symmetric, int4 asymmetric per group), sharded and unsharded copies of one model must give the same file, and
every refusal must come before any matrix is quantized and leave the output directory as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch

from llama_offload.checkpoint import meta as convert_module
from llama_offload.checkpoint import output_dir
from llama_offload.model import quant
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.checkpoint.meta import META_FILENAME
from llama_offload.model.quant import LINEAR_NAMES, QuantSpec
from llama_offload.convert.quantize import estimated_bytes, quantize_checkpoint, spec_from_flags

from conftest import run_in_process


# in_features 128 and 384 (w2): every group size divides them. tiny_ckpt's w2 has 192 inputs, which 128 does not.
WIDE = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=128)
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)  # conftest's


# --- the reference quantizers --------------------------------------------------------------------------


def ref_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: scale = amax / 127 rounded to fp16, q = round(w / scale)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).half()  # (out,)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale[:, None]


def ref_int4(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group of g inputs: min, scale = (max - min) / 15 (both fp16), q = round((w - min) / scale)
    in 0..15, packed two to a byte, element 2j in the low nibble."""
    rows, n = w.shape
    x = w.float().reshape(rows, n // g, g)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (rows, groups)
    scale, mn = ((hi - lo) / 15).half(), lo.half()
    q = torch.round((x - mn.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(rows, n)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, mn


def ref_dequantize(weight: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor]) -> torch.Tensor:
    if weight.dtype == torch.uint8:
        q = torch.stack([weight & 15, weight >> 4], dim=-1).reshape(weight.shape[0], -1).float()
    else:
        q = weight.float()
    rows, n = q.shape
    g = n // scales.shape[1]
    w = q.reshape(rows, -1, g) * scales.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.reshape(rows, n)


def check_matrix(sd: dict[str, torch.Tensor], prefix: str, original: torch.Tensor, bits: int,
                 group_size: Optional[int]) -> None:
    """The stored codes and scales equal the reference's exactly; dequantized, the error stays in bounds."""
    w = original.float()
    weight, scales, mins = sd[f"{prefix}.weight"], sd[f"{prefix}.scales"], sd.get(f"{prefix}.mins")
    if bits == 8:
        q, s = ref_int8(original)
        assert weight.dtype == torch.int8 and mins is None
        assert torch.equal(weight, q) and torch.equal(scales, s), prefix
        bound = scales.float() / 2 * (1 + 1e-3) + 1e-7  # (out, 1)
    else:
        q, s, m = ref_int4(original, group_size)
        assert weight.dtype == torch.uint8 and mins is not None
        assert torch.equal(weight, q) and torch.equal(scales, s) and torch.equal(mins, m), prefix
        # half a step, plus the fp16 rounding of the minimum
        bound = (scales.float() / 2 * (1 + 1e-3) + mins.float().abs() * 2**-10 + 1e-7).repeat_interleave(group_size, 1)
    deq = quant.dequantize(weight, scales, mins)
    assert torch.equal(deq, ref_dequantize(weight, scales, mins)), prefix
    assert ((deq - w).abs() <= bound).all(), (prefix, (deq - w).abs().max())


# --- fixtures -----------------------------------------------------------------------------------------


def make_ckpt(root: Path, tokenizer: Path, args: ModelArgs, *, num_shards: int = 1, dtype=torch.float32,
              name: str = "model", seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in Meta's download layout (the tokenizer beside the model folder) and its weights."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "tokenizer.model").exists():
        shutil.copy(tokenizer, root / "tokenizer.model")
    sd = random_state_dict(args, seed=seed, dtype=dtype)
    save_checkpoint(sd, args, root / name, num_shards=num_shards)
    return root / name, sd


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return make_ckpt(tmp_path_factory.mktemp("wide"), sp_tokenizer_path, WIDE)


@pytest.fixture()
def no_quantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any matrix is quantized: the checks must come first."""
    def boom(*a, **kw):
        raise AssertionError("a matrix was quantized before the inputs and the output were checked")
    monkeypatch.setattr(quant, "quantize_tensor", boom)


def load(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)


def listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``llama-offload ARGV`` in this process (test_write_targets.run_cli): exit code, stdout, stderr; never a
    traceback."""
    from test_write_targets import run_cli as run

    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    code, out, err = run(monkeypatch, capsys, *argv)
    assert "Traceback" not in err, err
    return code, out, err


# --- what is written -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128),
                                  QuantSpec(8, None, True), QuantSpec(4, 64, True)], ids=lambda s: repr(s))
def test_codes_equal_the_reference(wide, tmp_path: Path, spec: QuantSpec) -> None:
    ckpt, sd = wide
    out = quantize_checkpoint(ckpt, tmp_path / "q", spec)
    got = load(out)
    for i in range(WIDE.n_layers):
        for name in LINEAR_NAMES:
            prefix = f"layers.{i}.{name}"
            check_matrix(got, prefix, sd[f"{prefix}.weight"], spec.bits, spec.group_size)
            # bits per weight as the README states them: int8 8 + 16/in, int4 4 + 32/g
            parts = {k: got[f"{prefix}.{k}"] for k in ("weight", "scales", "mins") if f"{prefix}.{k}" in got}
            n_in = sd[f"{prefix}.weight"].shape[1]
            assert quant.bits_per_weight(parts) == (8 + 16 / n_in if spec.bits == 8 else 4 + 32 / spec.group_size)
    for name in ("tok_embeddings", "output"):
        if spec.embeddings:
            check_matrix(got, name, sd[f"{name}.weight"], 8, None)
        else:
            assert f"{name}.scales" not in got and torch.equal(got[f"{name}.weight"], sd[f"{name}.weight"])
    norms = [k for k in sd if k.endswith("norm.weight")]
    assert norms and all(torch.equal(got[k], sd[k]) for k in norms)
    quantized = {f"layers.{i}.{n}" for i in range(WIDE.n_layers) for n in LINEAR_NAMES}
    quantized |= {"tok_embeddings", "output"} if spec.embeddings else set()
    want_keys = {k for k in sd if k.removesuffix(".weight") not in quantized}
    want_keys |= {f"{p}.{part}" for p in quantized for part in ("weight", "scales")}
    want_keys |= {f"{p}.mins" for p in quantized if spec.bits == 4 and p not in ("tok_embeddings", "output")}
    assert set(got) == want_keys
    # The disk-space estimate is the tensors' exact size (fp16 scales).
    assert sum(t.numel() * t.element_size() for t in got.values()) == estimated_bytes(WIDE, spec, 4)


def test_bf16_input_keeps_its_dtype(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    ckpt, sd = make_ckpt(tmp_path / "src", sp_tokenizer_path, TINY, dtype=torch.bfloat16)
    got = load(quantize_checkpoint(ckpt, tmp_path / "q", QuantSpec(4, 32)))
    for key in ("tok_embeddings.weight", "output.weight", "norm.weight", "layers.1.ffn_norm.weight"):
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], sd[key])
    check_matrix(got, "layers.1.feed_forward.w2", sd["layers.1.feed_forward.w2.weight"], 4, 32)
    meta = json.loads((tmp_path / "q" / META_FILENAME).read_text())
    assert meta["dtype"] == "bfloat16" and meta["source"]["dtype"] == "bfloat16"


def test_sharded_and_unsharded_copies_give_the_same_tensors(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    one, sd = make_ckpt(tmp_path / "src", sp_tokenizer_path, TINY, num_shards=1, name="one", seed=3)
    two, sd2 = make_ckpt(tmp_path / "src", sp_tokenizer_path, TINY, num_shards=2, name="two", seed=3)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert len(list(two.glob("consolidated.*.pth"))) == 2
    for spec in (QuantSpec(4, 64, True), QuantSpec(8)):
        a = load(quantize_checkpoint(one, tmp_path / f"a{spec.bits}", spec))
        b = load(quantize_checkpoint(two, tmp_path / f"b{spec.bits}", spec))
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_row_chunks_give_the_whole_matrix_codes(wide, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, _ = wide
    whole = load(quantize_checkpoint(ckpt, tmp_path / "whole", QuantSpec(4, 64, True)))
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK_ELEMENTS", 3 * 128)  # 3 rows of the dim-wide matrices at a time
    chunked = load(quantize_checkpoint(ckpt, tmp_path / "chunked", QuantSpec(4, 64, True)))
    assert list(whole) == list(chunked) and all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_chunks_whose_scales_overflow_fp16_are_joined_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "QUANTIZE_CHUNK_ELEMENTS", 64)  # one row at a time
    w = torch.randn(4, 64)
    w[0] *= 1e8  # its int8 scale (~2e6) does not fit fp16
    q = quant.quantize_matrix(w, 8, None)
    assert q["scales"].dtype == torch.float32
    deq = quant.dequantize(q["weight"], q["scales"])
    assert ((deq - w).abs() <= q["scales"] / 2 * (1 + 1e-3)).all()


def test_cli_end_to_end(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-int8"
    # The command's entry point (fire included) in this process: conftest.run_in_process.
    p = run_in_process("quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out), "--bits", "8",
                       "--quantize_embeddings")
    assert p.returncode == 0, p.stderr
    assert f"-> {out}" in p.stdout
    # 8 + 16 / in per matrix: 8.25 for in = 64, 8.08 for w2's 192 (a 7B model: 8.00)
    assert "int8: 8.21 bits per weight in the blocks' matrices" in p.stderr
    assert "->" in p.stderr.splitlines()[-2]  # the sizes before and after
    assert sorted(x.name for x in out.iterdir()) == ["consolidated.00.pth", META_FILENAME, "params.json",
                                                     "tokenizer.model"]
    assert (out / "params.json").read_bytes() == (tiny_ckpt / "params.json").read_bytes()
    # Meta's layout: the tokenizer came from the parent; now it is inside the checkpoint.
    assert (out / "tokenizer.model").read_bytes() == (tiny_ckpt.parent / "tokenizer.model").read_bytes()
    meta = json.loads((out / META_FILENAME).read_text())
    assert meta["quantization"] == {"format_version": quant.FORMAT_VERSION, "bits": 8, "group_size": None,
                                    "embeddings": "int8"}
    assert meta["format_version"] == 2 and meta["tokenizer"] == "tokenizer.model"
    assert meta["source"]["path"] == str(tiny_ckpt.resolve())
    sd = load(out)
    assert sd["tok_embeddings.weight"].dtype == torch.int8 and sd["layers.0.attention.wq.weight"].dtype == torch.int8
    assert not list(tmp_path.glob(".*"))  # no temporary directory left


def test_metadata_and_tokenizer_json_are_carried_over(tmp_path: Path, sp_tokenizer_path: Path) -> None:
    """A converted checkpoint's record (chat format, context length, tied embeddings, ...) is kept; a
    tokenizer.json comes with its tokenizer_config.json."""
    from llama_offload.text.tokenizer import load_tokenizer
    from test_tokenizer_json import write_tiny_tokenizer

    tok = write_tiny_tokenizer(tmp_path / "bpe")
    args = ModelArgs(**{**TINY.to_params(), "vocab_size": load_tokenizer(tok).n_words})
    ckpt, _ = make_ckpt(tmp_path / "src", sp_tokenizer_path, args)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok.parent / name, ckpt / name)
    convert_module.write_checkpoint_meta(ckpt, chat_format="chatml", tokenizer="tokenizer.json",
                                         source={"format": "gguf", "path": "/x.gguf"}, dtype="float32",
                                         context_length=2048, tied_embeddings=True)
    out = quantize_checkpoint(ckpt, tmp_path / "q", QuantSpec(4, 32))
    meta = json.loads((out / META_FILENAME).read_text())
    assert meta["chat_format"] == "chatml" and meta["tokenizer"] == "tokenizer.json"
    assert meta["context_length"] == 2048 and meta["tied_embeddings"] is True and meta["dtype"] == "float32"
    assert meta["source"]["converted_from"] == {"format": "gguf", "path": "/x.gguf"}
    assert meta["quantization"]["group_size"] == 32
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", META_FILENAME, "params.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()


# --- refusals ------------------------------------------------------------------------------------------


def test_group_size_that_does_not_divide(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys,
                                         no_quantizing) -> None:
    out = tmp_path / "q"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out),
                           "--bits", "4", "--group_size", "128")
    assert code == 1
    assert "--group_size 128 does not divide the input features of layers.0.attention.wq.weight (64)" in err
    assert "Group sizes that fit this model: 32, 64" in err and "--quantize" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--bits", "5"], "--bits must be 8 or 4, found 5"),
    ([], "--bits must be 8 or 4, found nothing"),
    (["--bits", "8", "--group_size", "64"], "--group_size applies to --bits 4 only"),
    (["--bits", "4", "--group_size", "48"], "--group_size must be one of 32, 64, 128 for --bits 4, found 48"),
])
def test_bad_flags(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys, no_quantizing, flags, message) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out",
                           str(tmp_path / "q"), *flags)
    assert code == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_missing_or_invalid_input(tmp_path: Path, monkeypatch, capsys, no_quantizing) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "q"), "--bits", "8")
    assert code == 1 and "does not exist" in err and "params.json" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "q"), "--bits", "8")
    assert code == 1 and "No consolidated.*.pth shards" in err
    (tmp_path / "empty" / "consolidated.00.pth").write_bytes(b"")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "q"), "--bits", "8")
    assert code == 1 and "params.json not found" in err
    assert not (tmp_path / "q").exists()


def test_out_inside_the_input_is_refused(tiny_ckpt: Path, monkeypatch, capsys, no_quantizing) -> None:
    for out in (tiny_ckpt, tiny_ckpt / "int4"):
        code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out),
                               "--bits", "4")
        assert code == 1 and "Choose an --out outside it" in err, err
    assert not (tiny_ckpt / "int4").exists()


def test_already_quantized_input_is_refused(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    first = quantize_checkpoint(tiny_ckpt, tmp_path / "q8", QuantSpec(8))
    monkeypatch.setattr(quant, "quantize_tensor", lambda *a, **k: pytest.fail("quantized again"))
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(first), "--out",
                           str(tmp_path / "again"), "--bits", "4")
    assert code == 1 and "already quantized" in err and "Quantize the 16-bit original" in err
    # The record is summarised, not dumped (a GGUF's has an entry per matrix: thousands of characters).
    error = next(line for line in err.splitlines() if ": error: " in line)
    assert "records a quantization, int8 per output channel" in error and len(error) < 500, error
    # Without its llama_offload.json, the .scales keys give it away.
    (first / META_FILENAME).unlink()
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(first), "--out",
                           str(tmp_path / "again"), "--bits", "4")
    assert code == 1 and "already quantized" in err and "holds quantized tensors" in err
    assert not (tmp_path / "again").exists()


def test_existing_out_needs_force(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "q"
    assert run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out),
                   "--bits", "8")[0] == 0
    before = listing(out)
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out),
                           "--bits", "4")
    assert code == 1 and "refusing to overwrite" in err and "--force" in err
    assert listing(out) == before
    code, stdout, _ = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out", str(out),
                              "--bits", "4", "--force")
    assert code == 0 and "int4 g64" in stdout
    assert json.loads((out / META_FILENAME).read_text())["quantization"]["bits"] == 4
    assert load(out)["layers.0.attention.wq.weight"].dtype == torch.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the old copy and the temporary dir are gone
    # A directory a user filled is never replaced, not even with --force.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--ckpt_dir", str(tiny_ckpt), "--out",
                           str(tmp_path / "mine"), "--bits", "4", "--force")
    assert code == 1 and "refusing to write into it" in err
    assert listing(tmp_path / "mine") == {"notes.txt": b"keep"}


def test_not_enough_disk_is_refused_first(tiny_ckpt: Path, tmp_path: Path, monkeypatch, no_quantizing) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError, match=r"Not enough free disk space .* has 1.0 MiB free"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "q", QuantSpec(4, 64))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_nothing(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         existing: bool) -> None:
    out = tmp_path / "q"
    if existing:
        quantize_checkpoint(tiny_ckpt, out, QuantSpec(8))
    before = listing(out) if existing else None
    real, calls = quant.quantize_tensor, []

    def fail_later(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)
    monkeypatch.setattr(quant, "quantize_tensor", fail_later)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(tiny_ckpt, out, QuantSpec(4, 64), force=True)
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == (["q"] if existing else [])  # no temporary dir
    if existing:
        assert listing(out) == before


def test_spec_from_flags() -> None:
    assert spec_from_flags(8) == QuantSpec(8, None, False)
    assert spec_from_flags("4") == QuantSpec(4, 64, False)
    assert spec_from_flags(4, 128, True) == QuantSpec(4, 128, True)
    with pytest.raises(ValueError, match="--bits must be 8 or 4"):
        spec_from_flags(True)
    with pytest.raises(ValueError, match="--bits must be 8 or 4"):
        quantize_checkpoint("x", "y", QuantSpec(5))
