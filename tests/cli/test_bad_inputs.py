"""Every bad input is refused with its exit code and a clear one-line message, never a traceback.

One table, ``CASES``: a case is one line, ``Case(argv, code, fragment)``, with ``stdin=`` for piped input,
``sub=True`` where the behaviour is a whole process's (run in a subprocess, else in-process through the
same ``fire_main`` the commands use, which is much faster), and ``preload=False`` where the error may come
after the weights were opened (otherwise the case also asserts that no shard was loaded).

``argv[0]`` picks the entry point: ``llama-offload``, ``text`` (scripts/example_text_completion.py) or
``chat`` (scripts/example_chat_completion.py). ``{name}`` in an argument is the path of one of the
checkpoints made once below (``CHECKPOINTS``): a good tiny one and its broken variants.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.model.quant import QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.model.lora import LoRAAdapter, LoRAConfig, ModelShape
from llama_offload.checkpoint.adapter import save_adapter

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"text": REPO / "scripts" / "example_text_completion.py", "chat": REPO / "scripts" / "example_chat_completion.py"}
PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
LONG = "word " * 300


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    code: int
    fragment: str
    stdin: Optional[str] = None
    sub: bool = False  # run in a subprocess: the behaviour is the process's (exit status, what reaches it)
    preload: bool = True  # refused before any shard is loaded
    skip_if: Optional[Callable[[], bool]] = None


def C(*argv: str, code: int = 1, fragment: str, **kw) -> Case:
    return Case(tuple(argv), code, fragment, **kw)


CASES: list[Case] = [
    # --- unknown flags: exit 2 with the closest flag, before anything runs (the shard is garbage) ---
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{garbage}", "--temprature", "0", code=2,
      fragment="--temprature is not a flag of llama-offload complete (did you mean --temperature?)", sub=True),
    C("llama-offload", "chat", "--ckpt_dir", "{garbage}", "--temprature", "0", code=2,
      fragment="(did you mean --temperature?)"),
    C("llama-offload", "info", "--ckpt_dir", "{garbage}", "--max_seq_length", "8", code=2,
      fragment="(did you mean --max_seq_len?)"),
    C("llama-offload", "convert", "x.gguf", "--out", "{tmp}/out", "--forse", code=2, fragment="(did you mean --force?)"),
    C("llama-offload", "tokenize", "--txt", "hi", code=2, fragment="(did you mean --text?)"),
    C("text", "--ckpt_dir", "{garbage}", "--temprature", "0", code=2, fragment="(did you mean --temperature?)",
      sub=True),
    C("chat", "--ckpt_dir", "{garbage}", "--top-pp", "0.5", code=2, fragment="(did you mean --top_p?)"),
    # --- checks that need no weights: refused before the shards are opened ---
    C("llama-offload", "complete", "", "--ckpt_dir", "{good}", fragment="Prompt 1 is empty"),
    C("llama-offload", "complete", LONG, "--ckpt_dir", "{good}", fragment="Prompt 1 is 602 tokens long, but --max_seq_len is 128"),
    C("llama-offload", "complete", "--ckpt_dir", "{good}", stdin=LONG + "\n", fragment="Prompt 1 is 602 tokens long"),
    C("text", "--ckpt_dir", "{good}", "--prompts", json.dumps(["Hi", LONG]), fragment="Prompt 2 is 602 tokens long"),
    C("llama-offload", "chat", "--ckpt_dir", "{good}", "--system", LONG,
      fragment="--system (with a one-word question) is"),
    C("text", "--ckpt_dir", "{good}", "--prompts", '["Caf\\udce9"]', fragment="--prompts item 0 is not valid UTF-8"),
    C("chat", "--ckpt_dir", "{good}", "--dialogs", json.dumps([[{"role": "user", "content": LONG}]]),
      fragment="Dialog 1 is 616 tokens long, but --max_seq_len is 512"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--num_slices", "3",
      fragment="num_slices must be between 1 and the number of blocks (2), found 3."),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--device", "tpu",
      fragment="--device 'tpu' is not a device this runs on"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--device", "cuda",
      fragment="PyTorch sees no CUDA GPU", skip_if=torch.cuda.is_available),
    C("llama-offload", "chat", "--ckpt_dir", "{good}", "--chat_format", "bogus", fragment="Unknown --chat_format 'bogus'"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--gpu_memory_gb", "0.0001",
      fragment="A GPU memory budget of 0.0001 GiB is too small"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--max_seq_len", "100000000", "--max_batch_size", "64",
      fragment="GiB of host memory (weights"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{context64}", fragment="--max_seq_len 128 is above the 64 tokens "
      "this model was trained for"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{context64}", "--max_seq_len", "65", fragment="pass --allow_long_context"),
    # info exits non-zero wherever complete refuses the same flags (the same pre-load checks), after its plan
    C("llama-offload", "info", "--ckpt_dir", "{context64}", "--max_seq_len", "65",
      fragment="a run with these flags would be refused: --max_seq_len 65 is above the 64 tokens"),
    C("llama-offload", "info", "--ckpt_dir", "{good}", "--max_seq_len", "100000000", "--max_batch_size", "64",
      fragment="a run with these flags would be refused: This run on the CPU needs about"),
    C("llama-offload", "info", "--ckpt_dir", "{context64}", "--max_seq_len", "65", "--allow_long_context", code=0,
      fragment="context        64 tokens"),
    # --- the checkpoint itself (complete refuses them before loading; info exits non-zero) ---
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{tmp}/nowhere", fragment="does not exist"),
    C("llama-offload", "info", "--ckpt_dir", "{tmp}/nowhere", fragment="does not exist"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{badjson}", fragment="is not valid JSON"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{unknownkey}", fragment="has keys this version does not understand: ['flux']"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{truncated}", fragment="The file is truncated or corrupt"),
    C("llama-offload", "info", "--ckpt_dir", "{truncated}", fragment="The file is truncated or corrupt"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{random}", fragment="Could not read shard", preload=False),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{noshard00}", fragment="lacks shard(s) [0]"),
    C("llama-offload", "info", "--ckpt_dir", "{noshard00}", fragment="lacks shard(s) [0]"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{vocab600}", fragment="Vocabulary size mismatch"),
    C("llama-offload", "info", "--ckpt_dir", "{vocab600}", fragment="Vocabulary size mismatch"),
    # --- params.json: a missing shape key is named (not blamed on the shard size), a wrong type too ---
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{nodim}", fragment="params.json lacks dim: every Meta params.json"),
    C("llama-offload", "info", "--ckpt_dir", "{noheads}", fragment="params.json lacks n_heads"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{kvtext}", fragment="n_kv_heads must be a whole number or null, found '2'"),
    # --- llama_offload.json: damaged JSON or a field of the wrong kind ---
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{badmeta}", fragment="llama_offload.json is not valid JSON"),
    C("llama-offload", "info", "--ckpt_dir", "{badmeta}", fragment="llama_offload.json is not valid JSON"),
    C("llama-offload", "info", "--ckpt_dir", "{metalist}", fragment="llama_offload.json should hold a JSON object"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{metaquant}", fragment='"quantization" must be a JSON object'),
    C("llama-offload", "info", "--ckpt_dir", "{quantized_cut}", fragment="Could not read shard"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{quantized_cut}", fragment="Could not read shard"),
    # --- quantize on a quantized checkpoint: one short line that summarises the record ---
    C("llama-offload", "quantize", "--ckpt_dir", "{quantized}", "--out", "{tmp}/q2", "--bits", "4",
      fragment="records a quantization, int4 in groups of 64"),
    # --- --lora with a damaged adapter: one line on every path, before any weight is read ---
    *[C("llama-offload", *cmd, "--ckpt_dir", "{good}", "--lora", "{adapter_cut}",
        fragment="adapter.safetensors is damaged: it is") for cmd in (("complete", "Hi"), ("chat",), ("info",), ("serve",))],
    C("llama-offload", "merge", "--ckpt_dir", "{good}", "--lora", "{adapter_cut}", "--out", "{tmp}/merged",
      fragment="adapter.safetensors is damaged: it is"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--lora", "{adapter_noise}",
      fragment="adapter.safetensors is damaged: its header length field says"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--lora", "{adapter_empty}",
      fragment="adapter.safetensors is damaged: it is 0 bytes long"),
    C("llama-offload", "info", "--ckpt_dir", "{good}", "--lora", "{adapter_badconfig}",
      fragment="is not a llama_offload LoRA config"),
    C("llama-offload", "finetune", "--data", "{data}", "--out", "{adapter_cut}", "--ckpt_dir", "{good}", "--resume",
      "--device", "cpu", "--seq_len", "16", "--lora_rank", "4", fragment="adapter.safetensors is damaged: it is"),
    C("llama-offload", "finetune", "--data", "{data}", "--out", "{adapter_badstate}", "--ckpt_dir", "{good}", "--resume",
      "--device", "cpu", "--seq_len", "16", "--lora_rank", "4", fragment="trainer_state.pt could not be read"),
    # --- finetune's --out: writable and with room for its saves, checked before the weights are read ---
    C("llama-offload", "finetune", "--data", "{data}", "--out", "{good}/params.json/adapter", "--ckpt_dir", "{good}",
      "--device", "cpu", "--seq_len", "16", fragment="is a file, not a directory"),
    # --- flag values ---
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--dtype", "int8", fragment="Unknown --dtype 'int8'"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--temperature", "-1", fragment="--temperature must be"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--top_p", "2", fragment="--top_p must be a number in (0, 1]"),
    C("llama-offload", "complete", "Hi", "--ckpt_dir", "{good}", "--max_gen_len", "0", fragment="--max_gen_len must be a positive"),
    C("text", "--ckpt_dir", "{good}", "--prompts", '["Hi"', fragment="--prompts is not valid JSON"),
    C("text", "--ckpt_dir", "{good}", "--prompts", "[1]", fragment="--prompts item 0 is an int"),
    C("chat", "--ckpt_dir", "{good}", "--dialogs", '[{"role": "user", "content": "Hi"}]', fragment="it looks like one dialog"),
    C("chat", "--ckpt_dir", "{good}", "--dialogs", '[[{"role": "robot", "content": "Hi"}]]', fragment="--dialogs item 0"),
    # --- help is output: stdout, with readable types ---
    C("llama-offload", "complete", "--help", code=0, fragment="Type: Optional[str]", sub=True),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> dict[str, str]:
    """The good tiny checkpoint and its broken variants, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = root / "good"
    args = ModelArgs(**PARAMS)
    save_checkpoint(random_state_dict(args), args, good)
    shutil.copy(sp_tokenizer_path, good / "tokenizer.model")
    shard = good / "consolidated.00.pth"

    def variant(name: str, change: Callable[[Path], None]) -> Path:
        d = root / name
        shutil.copytree(good, d)
        change(d)
        return d

    def params(**kw):
        return lambda d: (d / "params.json").write_text(json.dumps({**args.to_params(), **kw}))

    made = {
        "good": good,
        "garbage": variant("garbage", lambda d: (d / shard.name).write_bytes(b"not a checkpoint" * 1000)),
        "context64": variant("context64", lambda d: (d / "llama_offload.json").write_text(
            json.dumps({"format_version": 1, "chat_format": None, "context_length": 64}))),
        "badjson": variant("badjson", lambda d: (d / "params.json").write_text('{"dim": 64,')),
        "unknownkey": variant("unknownkey", params(flux=1)),
        "truncated": variant("truncated", lambda d: (d / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])),
        "random": variant("random", lambda d: (d / shard.name).write_bytes(os.urandom(shard.stat().st_size))),
        "noshard00": variant("noshard00", lambda d: (d / shard.name).rename(d / "consolidated.01.pth")),
        "vocab600": variant("vocab600", params(vocab_size=600)),
        "nodim": variant("nodim", lambda d: (d / "params.json").write_text(
            json.dumps({k: v for k, v in args.to_params().items() if k != "dim"}))),
        "noheads": variant("noheads", lambda d: (d / "params.json").write_text(
            json.dumps({k: v for k, v in args.to_params().items() if k != "n_heads"}))),
        "kvtext": variant("kvtext", params(n_kv_heads="2")),
        "badmeta": variant("badmeta", lambda d: (d / "llama_offload.json").write_text('{"format_version": 1, "chat')),
        "metalist": variant("metalist", lambda d: (d / "llama_offload.json").write_text("[1, 2]")),
        "metaquant": variant("metaquant", lambda d: (d / "llama_offload.json").write_text(
            json.dumps({"format_version": 1, "chat_format": None, "quantization": "int4"}))),
    }
    made["quantized"] = quantize_checkpoint(good, root / "quantized", QuantSpec(4, 64))
    made["quantized_cut"] = root / "quantized_cut"
    shutil.copytree(made["quantized"], made["quantized_cut"])
    qshard = made["quantized_cut"] / shard.name
    qshard.write_bytes(qshard.read_bytes()[: qshard.stat().st_size // 2])
    # A LoRA adapter of the good checkpoint (saved with a trainer state, as finetune does) and damaged copies.
    adapter = root / "adapter"
    config = LoRAConfig(4, 8.0, ("wq", "wv"), ModelShape.of(args))
    save_adapter(LoRAAdapter(config), adapter, state={"version": 1})
    weights = adapter / "adapter.safetensors"

    def adapter_variant(name: str, change: Callable[[Path], None]) -> Path:
        d = root / name
        shutil.copytree(adapter, d)
        change(d)
        return d

    made.update({
        "adapter_cut": adapter_variant("adapter_cut", lambda d: (d / weights.name).write_bytes(
            weights.read_bytes()[: weights.stat().st_size // 2])),
        "adapter_noise": adapter_variant("adapter_noise", lambda d: (d / weights.name).write_bytes(os.urandom(4096))),
        "adapter_empty": adapter_variant("adapter_empty", lambda d: (d / weights.name).write_bytes(b"")),
        "adapter_badconfig": adapter_variant("adapter_badconfig", lambda d: (d / "adapter_config.json").write_text(
            '{"format": "llama_offload-lora", "rank": 4, "alpha": 8.0, "targets": ["wq"], "model": {"dim": 64}}')),
        "adapter_badstate": adapter_variant("adapter_badstate", lambda d: (d / "trainer_state.pt").write_bytes(
            b"PK\x03\x04 not a whole zip")),
    })
    data = root / "train.jsonl"
    data.write_text(json.dumps({"text": "The book is blue. " * 8}) + "\n")
    made["data"] = data
    return {"tmp": str(root), **{k: str(v) for k, v in made.items()}}


def _run_in_process(case: Case, argv: list[str], monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from llama_offload.cli import main as cli
    from llama_offload.cli.options import fire_main

    monkeypatch.setattr(sys, "stdin", io.StringIO(case.stdin or ""))
    if argv[0] == "llama-offload":
        monkeypatch.setattr(sys, "argv", argv)
        run = cli.main
    else:
        spec = importlib.util.spec_from_file_location(f"_script_{argv[0]}", SCRIPTS[argv[0]])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [SCRIPTS[argv[0]].name, *argv[1:]])
        run = lambda: fire_main(module.main, name=SCRIPTS[argv[0]].name)  # noqa: E731
    capsys.readouterr()
    code = 0
    try:
        run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _run_subprocess(case: Case, argv: list[str]) -> tuple[int, str, str]:
    entry = [sys.executable, "-m", "llama_offload.cli.main"] if argv[0] == "llama-offload" else [sys.executable, str(SCRIPTS[argv[0]])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLAMA_OFFLOAD_DEFAULT_MODEL": "tiny-random"}
    env.pop("LLAMA_OFFLOAD_TRACEBACK", None)
    proc = subprocess.run(entry + argv[1:], input=case.stdin or "", capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(c.argv)[:70])
def test_bad_input(case: Case, paths: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    if case.skip_if is not None and case.skip_if():
        pytest.skip("not applicable on this machine")
    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    argv = [a.format(**paths) if "{" in a and not a.startswith(("[", "{\"")) else a for a in case.argv]
    run = _run_subprocess(case, argv) if case.sub else _run_in_process(case, argv, monkeypatch, capsys)
    code, out, err = run
    shown = out if case.code == 0 else err
    assert code == case.code, f"exit {code}, expected {case.code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert case.fragment in shown, f"{case.fragment!r} not in:\n{shown[-3000:]}"
    assert "Traceback" not in err, err
    if case.preload:
        assert "loading consolidated" not in err, f"the shards were opened before the error:\n{err}"
    if case.code != 0:  # an error is one line (and the hint under it), not a wall of text
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1, err
        assert len(errors[0]) < 1000, f"a {len(errors[0])}-character error line:\n{errors[0]}"


def test_llama_build_refuses_a_damaged_adapter_before_the_weights(paths: dict[str, str], monkeypatch) -> None:
    """The Python API's --lora: the same one line as the commands, before any shard is opened."""
    from llama_offload.checkpoint import load as checkpoint
    from llama_offload.generate import generation

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(generation, "load_model", no_load)
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    for name, fragment in (("adapter_cut", "is truncated"), ("adapter_noise", "header length field"),
                           ("adapter_badconfig", "is not a llama_offload LoRA config")):
        with pytest.raises(ValueError, match=fragment):
            generation.Llama.build(paths["good"], Path(paths["good"]) / "tokenizer.model", device="cpu",
                                   lora=paths[name])
