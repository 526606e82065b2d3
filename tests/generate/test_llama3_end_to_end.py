"""A Llama-3-shaped checkpoint with Meta's real Llama 3 tokenizer, through the API, the scripts and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.generate.generation import Llama

REPO = Path(__file__).resolve().parents[2]
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                 ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True)
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("llama3") / "tiny-llama3"
    # std 0.5: a peaked random model, so greedy decoding reaches an end-of-turn token now and then.
    save_checkpoint(random_state_dict(ARGS, seed=1, std=0.5), ARGS, ckpt)
    return ckpt


def test_build_chooses_llama3_and_stops_on_its_tokens(llama3_ckpt: Path, llama3_tokenizer_path: Path) -> None:
    llama = Llama.build(llama3_ckpt, llama3_tokenizer_path, max_seq_len=96, max_batch_size=2, device="cpu")
    assert llama.chat_format.name == "llama3"
    assert llama.chat_format.stop_ids == {128001, 128008, 128009}
    prompt = llama.chat_format.encode_dialog_prompt(DIALOG)
    assert prompt[0] == 128000 and prompt[-4:] == [128006, 78191, 128007, 271]  # ends on the assistant header

    free, _ = llama.generate([prompt], max_gen_len=12, temperature=0, stop_ids={-1})
    stop = free[0][3]
    cut, _ = llama.generate([prompt], max_gen_len=12, temperature=0, stop_ids={stop})
    assert cut[0] == free[0][: free[0].index(stop)]
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=12)[0]["generation"]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)


def test_scripts_and_cli_treat_it_like_any_checkpoint(llama3_ckpt: Path, llama3_tokenizer_path: Path, run_cli) -> None:
    """The scripts and the commands, each through its real entry point, in this process (conftest.run_cli)."""
    common = ["--ckpt_dir", str(llama3_ckpt), "--tokenizer_path", str(llama3_tokenizer_path), "--max_gen_len", "6",
              "--temperature", "0", "--max_seq_len", "96"]
    chat = run_cli(*common, "--dialogs", json.dumps([DIALOG]), script=REPO / "scripts" / "example_chat_completion.py")
    assert chat.returncode == 0, chat.stderr
    assert "What is the capital of France?" in chat.stdout and "tokens/s" in chat.stdout
    text = run_cli(*common, "--prompts", '["Once upon a time"]', script=REPO / "scripts" / "example_text_completion.py")
    assert text.returncode == 0, text.stderr
    info = run_cli("info", "--ckpt_dir", str(llama3_ckpt), "--tokenizer_path", str(llama3_tokenizer_path))
    assert info.returncode == 0, info.stderr
    assert "vocab 128256" in info.stdout and "rope_theta 500000, scaled RoPE" in info.stdout
    ids = run_cli("tokenize", "--tokenizer_path", str(llama3_tokenizer_path), "--text", "Hello, world!")
    assert ids.returncode == 0, ids.stderr
    assert json.loads(ids.stdout) == [128000, 9906, 11, 1917, 0]
