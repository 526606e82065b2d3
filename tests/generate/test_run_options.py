"""One object carries the run flags: what ``llama-offload complete|chat|info``, both example scripts and
``Llama.build`` make of a set of flags is the same ``RunOptions``, every field is a flag with its help, and
bad values are refused in one line before anything is loaded.

The command-line runs go through the real entry points (``cli.main()``, the scripts run as ``__main__``,
fire included) in this process, with ``Llama.build`` and the path resolution replaced by recorders, so they
load nothing. The help screens are read the same way, one of them also from a real process (as a user sees
it); the API round trip builds the tiny checkpoint for real.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import llama_offload.cli.main as cli
import llama_offload.cli.options as options_module
from llama_offload.model.args import ModelArgs
from llama_offload.generate.generation import Llama
from llama_offload.cli.options import build_llama, run_options_command
from llama_offload.generate.run_options import RunOptions

from conftest import run_in_process

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"text script": REPO / "scripts" / "example_text_completion.py",
           "chat script": REPO / "scripts" / "example_chat_completion.py"}
ENTRIES = ("complete", "chat", "info", "text script", "chat script")

# What each entry point sets itself: its own defaults, and chat's batch of one (not a flag there).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "complete": dict(max_seq_len=128, max_batch_size=4),
    "chat": dict(max_seq_len=512, max_batch_size=1),
    "info": {},
    "text script": dict(max_seq_len=128, max_batch_size=4),
    "chat script": dict(max_seq_len=512, max_batch_size=4),
}
NOT_FLAGS: dict[str, tuple[str, ...]] = {
    "complete": (), "chat": ("max_batch_size",), "info": cli.INFO_IGNORES, "text script": (), "chat script": (),
}

# Two sets of flags that between them give every field a value other than its default (num_slices and
# gpu_memory_gb exclude each other). The paths are filled in by the fixture; ADAPTER by a LoRA adapter made for
# the tiny checkpoint.
ADAPTER = "<a LoRA adapter for tiny_ckpt>"
FLAG_SETS: dict[str, dict[str, Any]] = {
    "slices": dict(max_seq_len=256, max_batch_size=3, offload=False, num_slices=2, device="cpu", dtype="bfloat16",
                   seed=7, chat_format="llama2", cuda_graphs=False, prefill_chunk=16,
                   allow_long_context=True, draft="ngram", num_draft_tokens=6, cpu_blocks=0),
    "budget": dict(max_seq_len=200, max_batch_size=2, gpu_memory_gb=1.5, dtype="float16", seed=0,
                   chat_format="llama2", prefill_chunk=64, quantize="int4", group_size=32, quantize_embeddings=True,
                   cpu_blocks=2, cpu_threads=1, lora=ADAPTER),
}


class Built(Exception):
    """Raised by the stand-in for Llama.build: the options reached the model loader."""

    def __init__(self, ckpt_dir: Any, tokenizer_path: Any, options: RunOptions, rest: dict[str, Any]):
        super().__init__("built")
        self.ckpt_dir, self.tokenizer_path, self.options, self.rest = ckpt_dir, tokenizer_path, options, rest


class Planned(Exception):
    """Raised by the stand-in for plan_run (info): the checkpoint, tokenizer and options it was asked to plan."""

    def __init__(self, ckpt: Any, tokenizer_path: Any, options: RunOptions):
        super().__init__("planned")
        self.ckpt, self.tokenizer_path, self.options = ckpt, tokenizer_path, options


@pytest.fixture
def recorders(monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path) -> list[tuple[Any, Any]]:
    """Llama.build and plan_offload raise what they were given; the default model is ``tiny_ckpt``.
    Returns the list of resolve_paths calls (none must happen before the flags are checked)."""
    resolved: list[tuple[Any, Any]] = []

    def resolve_paths(ckpt_dir: Any, tokenizer_path: Any) -> tuple[Path, Path]:
        resolved.append((ckpt_dir, tokenizer_path))
        ckpt = tiny_ckpt if ckpt_dir is None else Path(ckpt_dir)
        return ckpt, Path(tokenizer_path) if tokenizer_path is not None else ckpt.parent / "tokenizer.model"

    def build(ckpt_dir: Any, tokenizer_path: Any, max_seq_len: Any = None, max_batch_size: Any = None, *,
              options: Optional[RunOptions] = None, **rest: Any) -> Llama:
        assert options is not None, "build_llama must hand Llama.build the RunOptions"
        raise Built(ckpt_dir, tokenizer_path, options, dict(rest, max_seq_len=max_seq_len,
                                                             max_batch_size=max_batch_size))

    def plan_run(ckpt: Any, tokenizer_path: Any, options: RunOptions, **kwargs: Any) -> Any:
        raise Planned(ckpt, tokenizer_path, options)

    monkeypatch.setattr(Llama, "build", staticmethod(build))
    monkeypatch.setattr(options_module, "resolve_paths", resolve_paths)
    monkeypatch.setattr(cli, "resolve_paths", resolve_paths)
    monkeypatch.setattr(cli, "plan_run", plan_run)
    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return resolved


def invoke(monkeypatch: pytest.MonkeyPatch, entry: str, *argv: str) -> None:
    """Run one entry point as the shell would, in this process."""
    if entry in SCRIPTS:
        monkeypatch.setattr(sys, "argv", [str(SCRIPTS[entry]), *argv])
        runpy.run_path(str(SCRIPTS[entry]), run_name="__main__")
    else:
        monkeypatch.setattr(sys, "argv", ["llama-offload", entry, *(["a prompt"] if entry == "complete" else []),
                                          *argv])
        cli.main()


def as_argv(flags: dict[str, Any]) -> list[str]:
    return [f"--{name}={value}" for name, value in flags.items()]


def flags_for(entry: str, flags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if k not in NOT_FLAGS[entry]}


def expected(entry: str, flags: dict[str, Any], ckpt: Path, tok: Path) -> RunOptions:
    """The RunOptions built directly: the command's defaults, the flags it takes, the resolved paths."""
    return RunOptions(**{**COMMAND_DEFAULTS[entry], **flags_for(entry, flags),
                         "ckpt_dir": str(ckpt), "tokenizer_path": str(tok)})


def options_of(monkeypatch: pytest.MonkeyPatch, entry: str, *argv: str) -> RunOptions:
    """The RunOptions an entry point hands on: to Llama.build, or for info the plan it asks for."""
    with pytest.raises((Built, Planned)) as caught:
        invoke(monkeypatch, entry, *argv)
    got = caught.value
    if isinstance(got, Built):
        # The positional paths and the options agree, and nothing else is passed beside the options.
        assert (str(got.ckpt_dir), str(got.tokenizer_path)) == (got.options.ckpt_dir, got.options.tokenizer_path)
        assert all(v is None for v in got.rest.values()), got.rest
        return got.options
    # info plans the run it describes: the record of the resolved checkpoint, its tokenizer, the same options.
    assert (str(got.ckpt.path), str(got.tokenizer_path)) == (got.options.ckpt_dir, got.options.tokenizer_path)
    return got.options


# --- the flags round-trip ----------------------------------------------------------------------------


def test_flag_sets_cover_every_field() -> None:
    defaults = RunOptions()
    covered = {name for flags in FLAG_SETS.values() for name, v in flags.items() if getattr(defaults, name) != v}
    missing = sorted(set(RunOptions.names()) - covered - {"ckpt_dir", "tokenizer_path"})
    assert not missing, f"give {missing} a non-default value in FLAG_SETS, so the round trip covers them"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_ckpt: Path) -> Path:
    """A LoRA adapter (as finetune saves one) shaped for tiny_ckpt: --lora's config is read when flags are checked."""
    from llama_offload.model.lora import LoRAAdapter, LoRAConfig, ModelShape
    from llama_offload.checkpoint.adapter import save_adapter

    args = ModelArgs.from_json(tiny_ckpt / "params.json")
    return save_adapter(LoRAAdapter(LoRAConfig(2, 4.0, ("wq", "wv"), ModelShape.of(args))), tiny_ckpt.parent / "lora")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("flag_set", sorted(FLAG_SETS))
def test_flags_round_trip(recorders: list, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, tiny_adapter: Path,
                          entry: str, flag_set: str) -> None:
    tok = tiny_ckpt.parent / "tokenizer.model"
    flags = {k: str(tiny_adapter) if v == ADAPTER else v for k, v in FLAG_SETS[flag_set].items()}
    flags.update(ckpt_dir=str(tiny_ckpt), tokenizer_path=str(tok))
    got = options_of(monkeypatch, entry, *as_argv(flags_for(entry, flags)))
    want = expected(entry, flags, tiny_ckpt, tok)
    for field in dataclasses.fields(RunOptions):
        assert getattr(got, field.name) == getattr(want, field.name), field.name
    assert got == want


@pytest.mark.parametrize("entry", ENTRIES)
def test_defaults_and_the_default_model(recorders: list, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path,
                                        entry: str) -> None:
    got = options_of(monkeypatch, entry)
    want = expected(entry, {}, tiny_ckpt, tiny_ckpt.parent / "tokenizer.model")
    assert got == want
    assert recorders == [(None, None)]  # no --ckpt_dir: the default model, resolved once


def test_loose_spellings(recorders: list, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path) -> None:
    """fire leaves `false` as a word, reads `--nooffload` as offload=False, and `--dtype bf16` is bfloat16."""
    got = options_of(monkeypatch, "complete", "--cuda_graphs", "false", "--nooffload", "--dtype", "bf16",
                     "--gpu_memory_gb", "2", "--seed", "3")
    assert (got.cuda_graphs, got.offload, got.dtype, got.gpu_memory_gb, got.seed) == (False, False, "bfloat16", 2.0, 3)
    got = options_of(monkeypatch, "text script", "--cuda_graphs=0", "--offload", "--dtype=torch.float32")
    assert (got.cuda_graphs, got.offload, got.dtype) == (False, True, "float32")


def test_chat_runs_one_conversation(recorders: list, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    assert options_of(monkeypatch, "chat").max_batch_size == 1
    err = first_error_line(monkeypatch, capsys, "chat", "--max_batch_size", "2")  # not a flag of chat
    assert "--max_batch_size is not a flag of llama-offload chat" in err


def test_info_leaves_out_what_does_not_change_the_plan(recorders: list, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert set(cli.INFO_IGNORES) < set(RunOptions.names())
    for name in cli.INFO_IGNORES:
        assert f"--{name}" in cli.info.__doc__  # it says so in its help
        assert f"--{name} is not a flag of llama-offload info" in first_error_line(monkeypatch, capsys, "info",
                                                                                 f"--{name}=x")


@pytest.mark.parametrize("entry", ENTRIES)
def test_misspelt_flags_fail_before_running(recorders: list, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture, entry: str) -> None:
    """fire would call the command first and complain about the flag it could not use afterwards."""
    err = first_error_line(monkeypatch, capsys, entry, "--max_seq_length", "64")
    assert "--max_seq_length is not a flag" in err and "(did you mean --max_seq_len?)" in err
    err = first_error_line(monkeypatch, capsys, entry, "--prefill-chunks=3")
    assert "--prefill_chunks is not a flag" in err and "--prefill_chunk?" in err
    assert recorders == []


# --- the API -------------------------------------------------------------------------------------------


def test_api_round_trip(tiny_ckpt: Path) -> None:
    tok = tiny_ckpt.parent / "tokenizer.model"
    want = RunOptions(ckpt_dir=str(tiny_ckpt), tokenizer_path=str(tok), max_seq_len=64, max_batch_size=2,
                      num_slices=2, device="cpu", dtype="bfloat16", seed=5, chat_format="llama2", cuda_graphs=False,
                      prefill_chunk=16)
    # The old keywords, a torch dtype among them.
    llama = Llama.build(tiny_ckpt, tok, 64, 2, num_slices=2, device="cpu", dtype=torch.bfloat16, seed=5,
                        chat_format="llama2", cuda_graphs=False, prefill_chunk=16)
    assert llama.options == want
    assert (llama.max_seq_len, llama.max_batch_size) == (64, 2)
    # The object itself, and the object with keywords on top.
    assert Llama.build(tiny_ckpt, tok, options=want).options == want
    assert Llama.build(tiny_ckpt, tok, options=want.replace(seed=1), seed=5).options == want
    # build_llama: the options a command hands on, paths resolved (here given).
    assert build_llama(want).options == want


def test_cpu_default_dtype_is_float32(tiny_ckpt: Path) -> None:
    llama = Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", 32, 1, device="cpu")
    assert llama.options.dtype is None  # the default, which on the CPU means float32
    assert next(llama.model.parameters()).dtype == torch.float32


def test_replace_and_from_flags_check() -> None:
    base = RunOptions(max_seq_len=64)
    assert base.replace(seed=3) == RunOptions(max_seq_len=64, seed=3)
    with pytest.raises(ValueError, match="Unknown run option"):
        RunOptions.from_flags({"max_seq_length": 3})
    with pytest.raises(ValueError, match="not both"):
        base.replace(num_slices=2, gpu_memory_gb=3)
    assert RunOptions.from_flags({"ckpt_dir": Path("/x"), "gpu_memory_gb": 4}) == RunOptions(ckpt_dir="/x",
                                                                                            gpu_memory_gb=4.0)


# --- bad values: one line, before anything is loaded ------------------------------------------------------


BAD = [
    (["--prefill_chunk", "0"], "--prefill_chunk must be a positive integer"),
    (["--cuda_graphs", "maybe"], "--cuda_graphs must be True or False"),
    (["--offload=2"], "--offload must be True or False"),
    (["--dtype", "bogus"], "Unknown --dtype 'bogus'"),
    (["--gpu_memory_gb", "4", "--num_slices", "2"], "Give either --gpu_memory_gb or --num_slices, not both"),
    (["--gpu_memory_gb", "-1"], "--gpu_memory_gb must be a positive number"),
    (["--max_seq_len", "0"], "--max_seq_len must be a positive integer"),
    (["--seed", "one"], "--seed must be an integer"),
]
SAMPLING_BAD = [
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top_p", "2"], "--top_p must be a number in (0, 1]"),
    (["--max_gen_len", "0"], "--max_gen_len must be a positive integer"),
]


def first_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, entry: str,
                     *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        invoke(monkeypatch, entry, *argv)
    err = capsys.readouterr().err
    assert e.value.code == (2 if "is not a flag of" in err else 1)  # unknown flags are usage errors
    assert "Traceback" not in err
    name = SCRIPTS[entry].name if entry in SCRIPTS else "llama-offload"
    first = err.splitlines()[0]
    assert first.startswith(f"{name}: error: "), err
    return first


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_values_fail_before_loading(recorders: list, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture, entry: str) -> None:
    cases = BAD + (SAMPLING_BAD if entry != "info" else [])
    for argv, message in cases:
        if any(a.lstrip("-").split("=")[0] in NOT_FLAGS[entry] for a in argv):
            continue
        assert message in first_error_line(monkeypatch, capsys, entry, "--ckpt_dir", "/no/such/model", *argv)
    assert recorders == []  # refused before even the paths were looked at


def test_bad_value_in_a_subprocess(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LLAMA_OFFLOAD_TRACEBACK", None)
    p = subprocess.run([sys.executable, str(SCRIPTS["text script"]), "--prefill_chunk", "0"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines()[0] == ("example_text_completion.py: error: --prefill_chunk must be a positive "
                                        "integer, found 0.")


# --- help: every field is a flag, with its help ----------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Each entry point's ``-- --help``, as fire_main prints it to a pipe: on stdout, without a pager (fire pages
    only when stdin, stdout and stderr are all terminals; PAGER=cat in case). Read in this process
    (conftest.run_in_process); one real process, started first, shows that a user sees the same screen."""
    env = dict(os.environ, PAGER="cat", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "llama_offload.cli.main", "complete", "--", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env, cwd=REPO)
    out = {}
    for entry in ENTRIES:
        argv = ["--", "--help"] if entry in SCRIPTS else [entry, "--", "--help"]
        ran = run_in_process(*argv, env={"PAGER": "cat"}, script=SCRIPTS.get(entry))
        assert ran.returncode == 0 and "FLAGS" in ran.stdout, f"{entry}: {ran.stdout}{ran.stderr}"  # help is output
        out[entry] = ran.stdout
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stdout == out["complete"], stderr
    return out


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_lists_every_field(helps: dict[str, str], entry: str) -> None:
    text = helps[entry]
    for name in RunOptions.names():
        shown = f"--{name}=" in text
        assert shown is (name not in NOT_FLAGS[entry]), name
    # Each flag's help is RunOptions' own, whole, unless the command words it for itself.
    main = runpy.run_path(str(SCRIPTS[entry]))["main"] if entry in SCRIPTS else getattr(cli, entry)
    own_doc = main.__wrapped__.__doc__
    flat = _normalise(text)
    for name, help_text in RunOptions.help().items():
        if name not in NOT_FLAGS[entry] and f"{name}:" not in own_doc:
            assert _normalise(help_text) in flat, name
    if entry != "info":
        assert "float32 on the CPU" in flat and "CUDA graphs" in flat


def test_help_loses_no_words() -> None:
    """fire reads a continuation line with a colon in it as a new entry and drops the rest of the line."""
    commands = {name: getattr(cli, name) for name in ("complete", "chat", "info", "convert", "tokenize")}
    commands.update({entry: runpy.run_path(str(path))["main"] for entry, path in SCRIPTS.items()})
    for name, command in commands.items():
        lines = inspect.getdoc(command).splitlines()
        args = lines[lines.index("Args:") + 1:]
        entry_indent = len(args[0]) - len(args[0].lstrip())
        for line in args:
            if len(line) - len(line.lstrip()) > entry_indent:
                assert ":" not in line, f"{name}: {line.strip()!r}"


@pytest.mark.parametrize("entry", ["text script", "chat script"])
def test_meta_flags_keep_their_place(entry: str) -> None:
    """Meta's script flags: the same names, order and defaults as Meta's scripts (and positions work)."""
    main = runpy.run_path(str(SCRIPTS[entry]))["main"]
    params = list(inspect.signature(main).parameters.values())
    last = "prompts" if entry == "text script" else "dialogs"
    seq, gen = (128, 64) if entry == "text script" else (512, None)
    assert [(p.name, p.default) for p in params[:8]] == [
        ("ckpt_dir", None), ("tokenizer_path", None), ("temperature", 0.6), ("top_p", 0.9), ("max_seq_len", seq),
        ("max_batch_size", 4), ("max_gen_len", gen), (last, None)]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert [p.name for p in params[8:]] == [n for n in RunOptions.names() if n not in {p.name for p in params[:8]}]


# --- the decorator itself -------------------------------------------------------------------------------


def test_decorator_adds_every_field_with_its_help() -> None:
    seen: list[Any] = []

    @run_options_command(defaults=dict(seed=9), fixed=dict(max_batch_size=1), exclude=("device",))
    def command(word: str = "x", *, options: RunOptions) -> str:
        """Say a word.

        Args:
            word: the word.
            seed: this command's own wording.

        Returns:
            the word.
        """
        seen.append(options)
        return word

    params = inspect.signature(command).parameters
    flags = [n for n in RunOptions.names() if n not in ("max_batch_size", "device")]
    assert list(params) == ["word", *flags]
    assert params["seed"].default == 9 and "options" not in params
    doc = command.__doc__
    assert doc.index("Args:") < doc.index("Returns:")
    args_section = doc[doc.index("Args:"):doc.index("Returns:")]
    assert "seed: this command's own wording." in args_section and "sampling seed" not in args_section
    for name in flags:
        assert f"\n    {name}: " in args_section, name
    assert "\n    device: " not in args_section and "\n    max_batch_size: " not in args_section

    assert command("y", max_seq_len=7) == "y"
    assert seen[-1] == RunOptions(max_seq_len=7, max_batch_size=1, seed=9)
    with pytest.raises(TypeError):
        command(device="cpu")  # excluded: not a parameter
    with pytest.raises(ValueError, match="--prefill_chunk"):
        command(prefill_chunk=-3)
    assert len(seen) == 1


def test_decorator_refuses_a_bad_setup() -> None:
    with pytest.raises(TypeError, match="not RunOptions fields"):
        run_options_command(defaults=dict(max_seq_length=3))
    with pytest.raises(TypeError, match="`options`"):
        run_options_command()(lambda x=1: x)
    with pytest.raises(TypeError, match="come in through `options`"):
        def clash(seed: int = 1, *, options: RunOptions) -> None: ...
        run_options_command()(clash)


# --- fire: only its public entry point; FinetuneOptions' fields written once -------------------------------


def test_only_fire_public_entry_point_is_used() -> None:
    """fire's private functions change between releases: the flag handling calls ``fire.Fire`` and nothing else."""
    import re

    source = Path(options_module.__file__).read_text()
    assert set(re.findall(r"\bfire\.\w+(?:\.\w+)*", source)) <= {"fire.Fire"}, source
    assert "fire.helptext" not in source and "fire.core" not in source


def test_help_is_not_paged_and_leaves_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """On a terminal fire hands help to $PAGER: the screen comes back as output, and PAGER is the user's again."""
    import signal

    from fire.console import console_io

    monkeypatch.setattr(console_io, "IsInteractive", lambda *a, **k: True)  # as on a terminal
    monkeypatch.setenv("PAGER", "false")
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["llama-offload", "complete", "--", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert e.value.code == 0 and "NAME" in out and "--prefill_chunk" in out and "NAME" not in err
    assert os.environ["PAGER"] == "false" and signal.getsignal(signal.SIGINT) == handler


def test_finetune_flags_are_finetune_options_fields() -> None:
    from llama_offload.train.command import finetune_command
    from llama_offload.train.finetune import FinetuneOptions

    fields = dataclasses.fields(FinetuneOptions)
    params = inspect.signature(finetune_command).parameters
    assert [(p.name, p.default) for p in params.values()] == [(f.name, f.default) for f in fields]
    doc = _normalise(finetune_command.__doc__)
    for f in fields:
        assert f"{f.name}: {_normalise(f.metadata['help'])}" in doc, f.name
    with pytest.raises(TypeError):
        finetune_command(dta="x")
