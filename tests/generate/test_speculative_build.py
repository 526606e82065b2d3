"""``--draft`` through Llama.build and the commands, on a tiny checkpoint on the CPU: greedy output equals the run
without a draft for each draft source; a draft whose tokenizer differs is refused before its weights are read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict, save_checkpoint
from llama_offload.generate.generation import Llama
from llama_offload.generate.speculative import SpeculativeDecoder
from llama_offload.text.tokenizer import BUNDLED_CORPUS_PATH, train_sentencepiece

PROMPTS = ["Once upon a time there was a planet. Once upon a time", "The Sun sits at the centre of the solar system"]


def completions(ckpt: Path, **flags) -> tuple[list[str], Llama]:
    llama = Llama.build(ckpt, ckpt.parent / "tokenizer.model", max_seq_len=96, max_batch_size=2, device="cpu", **flags)
    out = llama.text_completion(PROMPTS, temperature=0, max_gen_len=24)
    return [r["generation"] for r in out], llama


@pytest.fixture(scope="module")
def plain(tiny_ckpt: Path) -> list[str]:
    return completions(tiny_ckpt)[0]


@pytest.mark.parametrize("draft", ["ngram", "int8", "int4", "itself"])
def test_greedy_with_a_draft_equals_greedy_without(tiny_ckpt: Path, plain: list[str], draft: str) -> None:
    got, llama = completions(tiny_ckpt, draft=str(tiny_ckpt) if draft == "itself" else draft, num_draft_tokens=3)
    assert got == plain
    assert isinstance(llama.decoder(temperature=0), SpeculativeDecoder)
    stats = llama.last_stats
    assert stats.tokens_per_pass is not None and stats.tokens_per_pass >= 1.0
    assert "tokens per pass" in stats.summary()
    if draft == "itself":
        assert stats.tokens_per_pass > 3  # the same weights draft: every drafted token is kept


def test_a_draft_with_another_tokenizer_is_refused_before_loading(tiny_ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    tok = train_sentencepiece(BUNDLED_CORPUS_PATH, tmp_path / "tok", 400)
    other.mkdir()
    shutil.copy(tok, other / "tokenizer.model")
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32)
    save_checkpoint(random_state_dict(args, seed=0), args, other)
    (other / "consolidated.00.pth").write_bytes(b"not read: the tokenizer check comes first")
    with pytest.raises(ValueError, match="its tokenizer .* is not the model's: n_words is 400"):
        completions(tiny_ckpt, draft=str(other))


def test_draft_flags_are_checked(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither auto, ngram, int4, int8 nor an existing directory"):
        completions(tiny_ckpt, draft=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--num_draft_tokens applies to --draft"):
        completions(tiny_ckpt, num_draft_tokens=4)
    with pytest.raises(ValueError, match="--num_draft_tokens must be a positive integer"):
        completions(tiny_ckpt, draft="ngram", num_draft_tokens=0)


def test_complete_command_with_a_draft(tiny_ckpt: Path, run_cli) -> None:
    base = ["complete", PROMPTS[0], "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path",
            str(tiny_ckpt.parent / "tokenizer.model"), "--max_gen_len", "12", "--temperature", "0", "--device", "cpu"]
    without = run_cli(*base)
    with_draft = run_cli(*base, "--draft", "ngram")
    assert without.returncode == 0 and with_draft.returncode == 0, with_draft.stderr
    text = lambda p: [x for x in p.stdout.splitlines() if "tokens/s" not in x]  # noqa: E731  (timings differ)
    assert text(with_draft) == text(without) and text(without)
    assert "tokens per pass" in with_draft.stderr + with_draft.stdout
    bad = run_cli(*base, "--draft", "int3")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--draft 'int3'" in bad.stderr


@pytest.mark.parametrize("draft", ["int8", "int4", "itself"])
def test_the_draft_memory_estimate_matches_the_built_draft(tiny_ckpt: Path, draft: str) -> None:
    """The run plan takes a model draft's GPU bytes out of the budget before loading: the estimate from params.json
    must be what the draft then holds (weights and KV caches; the dequantization scratch comes on top)."""
    from llama_offload.checkpoint.load import load_model
    from llama_offload.generate.drafts import build_draft, draft_gpu_bytes
    from llama_offload.generate.run_options import RunOptions
    from llama_offload.text.tokenizer import load_tokenizer

    name = str(tiny_ckpt) if draft == "itself" else draft
    opts = RunOptions(max_seq_len=96, max_batch_size=2, draft=name, num_draft_tokens=3).checked()
    tokenizer = load_tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = load_model(tiny_ckpt, max_seq_len=96, max_batch_size=2, show_progress=False).params
    built, _ = build_draft(opts, tiny_ckpt, tokenizer, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in [*built.model.parameters(), *built.model.buffers()])
    held += sum(c.k.nbytes + c.v.nbytes for c in built.caches)
    from llama_offload.offload.plan import weight_bytes
    from llama_offload.generate.drafts import SELF_DRAFT_SPECS

    scratch = weight_bytes(args, torch.float32, 1, SELF_DRAFT_SPECS.get(draft)).scratch
    estimate = draft_gpu_bytes(opts, tiny_ckpt, args, torch.float32)
    assert abs(estimate - scratch - held) <= 0.02 * held, (estimate - scratch, held)
