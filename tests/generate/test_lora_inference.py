"""Using a fine-tuned LoRA adapter: ``--lora DIR`` on the run commands and ``Llama.build(..., lora=DIR)`` (merged
into the weights while they load), and ``llama-offload merge`` (merged once, on disk). On the CPU, in fp32, with
tiny random models and an adapter whose B is random (a fresh adapter's B is zero: it would change nothing).

- ``--lora`` and the merged checkpoint compute with the same weights, so their logits and greedy tokens are
  equal exactly, and differ from the base model's;
- the merged model is the adapter's own model: the same logits as the base model with ``LoRALinear``s attached;
- every refusal is one line on stderr, without a traceback, and leaves an existing output as it was.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from llama_offload.cli import main as cli
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import load_model, random_state_dict, save_checkpoint
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta
from llama_offload.generate.generation import Llama
from llama_offload.checkpoint.lora_merge import lora_deltas, merge_state_dict
from llama_offload.generate.run_plan import plan_run
from llama_offload.model.quant import QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.generate.run_options import RunOptions
from llama_offload.model.lora import LoRAAdapter, LoRAConfig, ModelShape, attach, merge_into
from llama_offload.checkpoint.adapter import load_adapter, save_adapter

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
TARGETS = ("wq", "wv", "wo", "w2")
PROMPTS = ["Once upon a time", "The capital of France is"]
SEQ, BATCH = 48, 2


def make_adapter(out: Path, args: ModelArgs = ARGS, *, seed: int = 0, rank: int = 4,
                 targets: tuple[str, ...] = TARGETS) -> Path:
    """An adapter with random nonzero B (and A from its own init), saved as finetune saves one."""
    torch.manual_seed(seed)
    adapter = LoRAAdapter(LoRAConfig(rank, 2.0 * rank, targets, ModelShape.of(args)), "cpu")
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.lora_B.copy_(torch.randn_like(pair.lora_B) * 0.1)
    return save_adapter(adapter, out)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> Path:
    """Meta's download layout: the tokenizer beside the model folders."""
    root = tmp_path_factory.mktemp("lora")
    shutil.copy(sp_tokenizer_path, root / "tokenizer.model")
    save_checkpoint(random_state_dict(ARGS, seed=0), ARGS, root / "base")
    make_adapter(root / "adapter")
    return root


@pytest.fixture(scope="module")
def merged(root: Path) -> Path:
    out = root / "merged"
    code, _, err = invoke("merge", "--ckpt_dir", str(root / "base"), "--lora", str(root / "adapter"),
                          "--out", str(out))
    assert code == 0, err
    return out


def invoke(*argv: str, script: Optional[str] = None) -> tuple[int, str, str]:
    """``llama-offload ARGV`` (or an example script) in this process, as the shell runs it: (exit status, stdout,
    stderr). A bug (an exception fire_main does not turn into one line) propagates and fails the test."""
    import contextlib
    import io
    import runpy

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [script or "llama-offload", *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if script is None:
                    cli.main()
                else:
                    runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def refused(*argv: str, script: Optional[str] = None) -> str:
    """The one-line error of a command that must fail (exit 1, no traceback)."""
    code, _, err = invoke(*argv, script=script)
    assert code == 1, err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"{Path(script).name if script else 'llama-offload'}: error: "), err
    return first


def build(ckpt: Path, **flags) -> Llama:
    return Llama.build(ckpt, ckpt.parent / "tokenizer.model", SEQ, BATCH, device="cpu", **flags)


def greedy(llama: Llama) -> tuple[list[list[int]], list[list[float]]]:
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = llama.generate(prompts, 12, temperature=0, logprobs=True, echo=True)
    return tokens, logprobs


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, 10), generator=torch.Generator().manual_seed(seed))
    model.setup_caches(BATCH, SEQ, "cpu", torch.float32)
    return model(tokens, 0)


def load(ckpt: Path, **kw) -> torch.nn.Module:
    return load_model(ckpt, max_seq_len=SEQ, max_batch_size=BATCH, vocab_size=512, show_progress=False, **kw)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- (a) --lora and the merged checkpoint are the same model ----------------------------------------------


def test_merge_writes_a_checkpoint_that_records_the_adapter(root: Path, merged: Path) -> None:
    assert sorted(p.name for p in merged.iterdir()) == ["consolidated.00.pth", META_FILENAME, "params.json",
                                                        "tokenizer.model"]
    assert (merged / "params.json").read_bytes() == (root / "base" / "params.json").read_bytes()
    meta = read_checkpoint_meta(merged)
    (record,) = meta["lora_merged"]
    assert (record["rank"], record["alpha"], tuple(record["targets"])) == (4, 8.0, TARGETS)
    assert meta["dtype"] == "float32"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_lora_loads_the_merged_weights(root: Path, merged: Path) -> None:
    base = load(root / "base").state_dict()
    with_lora = load(root / "base", lora=root / "adapter").state_dict()
    on_disk = load(merged).state_dict()
    assert with_lora.keys() == on_disk.keys() == base.keys()
    for key, t in on_disk.items():
        assert t.dtype == torch.float32
        assert torch.equal(with_lora[key], t), key  # bit for bit: both round fp32(W) + delta once
        targeted = any(f".{name}.weight" in key for name in TARGETS)
        assert torch.equal(base[key], t) is not targeted, key


def test_build_with_lora_equals_the_merged_checkpoint(root: Path, merged: Path) -> None:
    tokens, logprobs = greedy(build(root / "base", lora=str(root / "adapter")))
    assert (tokens, logprobs) == greedy(build(merged))  # the same logits, exactly
    base_tokens, base_logprobs = greedy(build(root / "base"))
    assert base_logprobs != logprobs and base_tokens != tokens


def test_the_lora_flag_on_the_commands(root: Path, merged: Path) -> None:
    """complete and the text script with --lora print what the merged checkpoint prints; info names the adapter."""
    gen = ["--max_gen_len", "8", "--temperature", "0", "--max_seq_len", str(SEQ)]

    def answers(*argv: str, script: Optional[str] = None) -> list[str]:
        code, out, err = invoke(*argv, *gen, script=script)
        assert code == 0, err
        return [line for line in out.splitlines() if line.startswith("> ")]

    adapter = ["--ckpt_dir", str(root / "base"), "--lora", str(root / "adapter")]
    want = answers("complete", *PROMPTS, "--ckpt_dir", str(merged))
    assert len(want) == 2
    assert answers("complete", *PROMPTS, *adapter) == want
    script = str(Path(__file__).resolve().parents[2] / "scripts" / "example_text_completion.py")
    assert answers(*adapter, "--prompts", json.dumps(PROMPTS), script=script) == want
    code, out, err = invoke("info", *adapter, "--quantize", "int8")
    assert code == 0, err
    assert "LoRA rank 4, alpha 8 (scale 2), targets wq,wv,wo,w2" in out and "before --quantize" in out
    code, out, err = invoke("info", "--ckpt_dir", str(merged))
    assert code == 0, err
    assert "merged adapter LoRA rank 4, targets wq,wv,wo,w2" in out


# --- (b) the merged model is the adapter's model ------------------------------------------------------------


def test_merged_model_equals_the_attached_adapter(root: Path, merged: Path) -> None:
    adapter = load_adapter(root / "adapter")
    plain = load(root / "base")
    attach(plain, adapter)  # base(x) + scale * B(A(x)), unmerged
    torch.testing.assert_close(logits(load(merged)), logits(plain), atol=2e-5, rtol=1e-4)
    # merge_into (the model-level merge in model.lora) makes the same weights as the state-dict merge.
    model = load(root / "base")
    merge_into(model, adapter)
    sd = merge_state_dict(load(root / "base").state_dict(), adapter)
    for key, t in model.state_dict().items():
        assert torch.equal(t, sd[key]), key


def test_merge_keeps_dtype_and_shards(root: Path, tmp_path: Path) -> None:
    """A 2-shard bfloat16 checkpoint stays 2 bfloat16 shards; each holds its part of the merged matrices."""
    ckpt = tmp_path / "sharded"
    save_checkpoint(random_state_dict(ARGS, seed=1, dtype=torch.bfloat16), ARGS, ckpt, num_shards=2)
    code, _, err = invoke("merge", "--ckpt_dir", str(ckpt), "--lora", str(root / "adapter"), "--out",
                          str(tmp_path / "out"), "--tokenizer_path", str(root / "tokenizer.model"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("consolidated.*.pth")) == ["consolidated.00.pth",
                                                                                      "consolidated.01.pth"]
    shard = torch.load(tmp_path / "out" / "consolidated.01.pth", weights_only=True)
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    kw = dict(max_seq_len=SEQ, max_batch_size=BATCH, show_progress=False, model_parallel_size=1)
    on_disk = load_model(tmp_path / "out", **kw).state_dict()
    with_lora = load_model(ckpt, lora=root / "adapter", **kw).state_dict()
    for key, t in on_disk.items():
        assert t.dtype == torch.bfloat16 and torch.equal(with_lora[key], t), key


def test_an_int8_self_draft_gets_the_adapter_too(root: Path, merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_offload.generate.drafts as drafts

    seen = []
    real = drafts.load_model

    def recording(*args, **kwargs):
        seen.append(kwargs.get("lora"))
        return real(*args, **kwargs)

    monkeypatch.setattr(drafts, "load_model", recording)
    llama = build(root / "base", lora=str(root / "adapter"), draft="int8", num_draft_tokens=3)
    assert len(seen) == 1 and seen[0] is not None and seen[0].config.targets == TARGETS
    assert greedy(llama)[0] == greedy(build(merged))[0]  # the output is the model's own


# --- (c) refusals: one line, before the weights are read, nothing overwritten ---------------------------------


def test_bad_adapter_directories(root: Path, tmp_path: Path) -> None:
    base = ["complete", "hello", "--ckpt_dir", str(root / "base")]
    assert "does not exist" in refused(*base, "--lora", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "is not a LoRA adapter" in refused(*base, "--lora", str(tmp_path / "empty"))
    shape = make_adapter(tmp_path / "other", ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512,
                                                       multiple_of=32))
    err = refused(*base, "--lora", str(shape))
    assert "another model shape" in err and "n_layers 3 (model 2)" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "adapter", corrupt)
    (corrupt / "adapter_config.json").write_text("{not json")
    assert "is not a llama_offload LoRA config" in refused(*base, "--lora", str(corrupt))
    assert "--lora takes a LoRA adapter directory" in refused(*base, "--lora")  # a bare flag: fire gives True
    # The same through the API and the other entry points, and for merge.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(root / "base", lora=str(tmp_path / "missing"))
    assert "another model shape" in refused("info", "--ckpt_dir", str(root / "base"), "--lora", str(shape))
    assert "another model shape" in refused("merge", "--ckpt_dir", str(root / "base"), "--lora", str(shape),
                                            "--out", str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_lora_on_a_quantized_checkpoint_runs_beside_the_codes(root: Path, tmp_path: Path) -> None:
    # Codes cannot take a dense update: a run attaches the adapter beside them (as QLoRA trains it), which must
    # equal the dequantized matrices with the update added; merging on disk is refused.
    from llama_offload.model.quant import QuantLinear
    from llama_offload.model.lora import LoRALinear, ModelShape
    from llama_offload.checkpoint.adapter import load_adapter

    q = quantize_checkpoint(root / "base", tmp_path / "int8", QuantSpec(8))
    attached = load(q, lora=root / "adapter")
    assert sum(isinstance(m, LoRALinear) for m in attached.modules()) > 0
    reference = load(q)
    adapter = load_adapter(root / "adapter")
    assert adapter.config.shape == ModelShape.of(reference.params)
    with torch.no_grad():
        for name, delta in lora_deltas(adapter):
            owner = reference.get_submodule(name.rsplit(".", 2)[0])
            matrix = getattr(owner, name.split(".")[-2])
            assert isinstance(matrix, QuantLinear)
            dense = torch.nn.Linear(matrix.in_features, matrix.out_features, bias=False)
            dense.weight.copy_(matrix.dequantized(torch.float32) + delta)
            setattr(owner, name.split(".")[-2], dense)
    torch.testing.assert_close(logits(attached), logits(reference), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(attached), logits(load(q)), atol=1e-3)
    code, out, err = invoke("complete", "hello", "--ckpt_dir", str(q), "--lora", str(root / "adapter"),
                            "--max_gen_len", "4", "--device", "cpu")
    assert code == 0, err
    assert "attached beside the quantized matrices" in invoke("info", "--ckpt_dir", str(q), "--lora",
                                                              str(root / "adapter"))[1]
    err = refused("complete", "hello", "--ckpt_dir", str(q), "--lora", str(root / "adapter"), "--cpu_blocks", "2")
    assert "--cpu_blocks 2 cannot run with a LoRA adapter attached to a quantized checkpoint" in err
    err = refused("merge", "--ckpt_dir", str(q), "--lora", str(root / "adapter"), "--out", str(tmp_path / "m"))
    assert "is quantized" in err and not (tmp_path / "m").exists()


def test_lora_under_model_parallelism_is_refused(root: Path) -> None:
    opts = RunOptions(max_seq_len=SEQ, max_batch_size=BATCH, device="cpu", lora=str(root / "adapter"))
    with pytest.raises(ValueError, match="several processes.*llama-offload merge"):
        plan_run(root / "base", root / "tokenizer.model", opts, model_parallel_size=2)
    with pytest.raises(ValueError, match="several processes"):
        load(root / "base", lora=root / "adapter", model_parallel_size=2)


def test_merge_never_overwrites_without_force(root: Path, merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    before = tree(out)
    other = make_adapter(tmp_path / "adapter2", seed=1)
    merge = ["merge", "--ckpt_dir", str(root / "base"), "--lora", str(other), "--out", str(out)]
    assert "--force" in refused(*merge)
    assert tree(out) == before  # untouched
    # --force replaces a checkpoint llama_offload wrote, all at once.
    code, _, err = invoke(*merge, "--force")
    assert code == 0, err
    after = tree(out)
    assert after.keys() == before.keys() and after["consolidated.00.pth"] != before["consolidated.00.pth"]
    assert read_checkpoint_meta(out)["lora_merged"][0]["path"] == str(other.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A directory holding anything else is never written into, even with --force.
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    err = refused("merge", "--ckpt_dir", str(root / "base"), "--lora", str(other), "--out", str(foreign), "--force")
    assert "refusing to write into it" in err and tree(foreign) == {"todo.txt": b"keep me"}
    # The input itself (or a directory inside it) is not an output.
    for out_dir in (root / "base", root / "base" / "sub"):
        assert "must be different directories" in refused("merge", "--ckpt_dir", str(root / "base"), "--lora",
                                                          str(other), "--out", str(out_dir), "--force")
    assert sorted(p.name for p in (root / "base").iterdir()) == ["consolidated.00.pth", "params.json"]


def test_merge_in_a_subprocess(root: Path, tmp_path: Path) -> None:
    """As a user runs it: a refusal is one line and exit 1; -- --help lists merge."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_OFFLOAD_TRACEBACK", "WORLD_SIZE")}
    p = subprocess.run([sys.executable, "-m", "llama_offload.cli.main", "merge", "--ckpt_dir", str(root / "base"),
                        "--lora", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("llama-offload: error: LoRA adapter directory") and "does not exist" in p.stderr
    code, out, _ = invoke("--", "--help")
    assert code == 0 and "merge" in out
