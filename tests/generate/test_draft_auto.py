"""``--draft auto`` picks the draft that measured fastest for the kind of run, and says what it picked; an explicit
draft on the CPU, where drafts measured slower than plain decoding, runs with a note saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_offload.generate.drafts import choose_draft
from llama_offload.model.quant import QuantSpec
from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.generate.run_options import RunOptions

CUDA = torch.device("cuda")  # choose_draft only reads the device's type: these cases need no GPU


def options(**flags: object) -> RunOptions:
    return RunOptions.from_flags(dict(max_seq_len=32, max_batch_size=2, **flags))


@pytest.fixture(scope="module")
def int8_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-int8", QuantSpec(8))


@pytest.mark.parametrize("device, flags, chosen, said", [
    (torch.device("cpu"), {}, None, "plain decoding: on the CPU drafts measured slower"),
    (CUDA, {"offload": False}, None, "plain decoding: with every block resident"),
    (CUDA, {}, "int8", "int8: the model's own int8 copy"),
    (CUDA, {"gpu_memory_gb": 0.0001}, "ngram", "ngram: the int8 self-draft would take"),
])
def test_auto_picks_by_the_kind_of_run(tiny_ckpt: Path, capsys: pytest.CaptureFixture, device: torch.device,
                                       flags: dict, chosen: str | None, said: str) -> None:
    opts = choose_draft(options(draft="auto", num_draft_tokens=4, **flags), tiny_ckpt, device)
    assert opts.draft == chosen
    # Drafted tokens apply only where something drafts: resolved to none, the flag goes with it.
    assert opts.num_draft_tokens == (4 if chosen else None)
    err = capsys.readouterr().err
    assert err.count("--draft auto chose") == 1 and said in err, err


def test_auto_on_a_quantized_checkpoint_drafts_by_ngram(int8_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert choose_draft(options(draft="auto"), int8_ckpt, CUDA).draft == "ngram"
    assert "already quantized" in capsys.readouterr().err


def test_an_explicit_draft_on_the_cpu_runs_with_one_note(tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert choose_draft(options(draft="ngram"), tiny_ckpt, torch.device("cpu")).draft == "ngram"
    err = capsys.readouterr().err
    assert err.count("note: --draft ngram on the CPU, drafts measured slower") == 1, err
    assert choose_draft(options(draft="ngram"), tiny_ckpt, CUDA).draft == "ngram"
    assert choose_draft(options(), tiny_ckpt, torch.device("cpu")).draft is None
    assert capsys.readouterr().err == ""


def test_a_cpu_run_with_auto_decodes_plainly(tiny_ckpt: Path) -> None:
    from llama_offload.generate.generation import Llama

    tok = tiny_ckpt.parent / "tokenizer.model"
    auto = Llama.build(tiny_ckpt, tok, 32, 1, device="cpu", draft="auto")
    plain = Llama.build(tiny_ckpt, tok, 32, 1, device="cpu")
    assert auto.draft is None
    prompt = [auto.tokenizer.encode("Once upon a time", bos=True, eos=False)]
    assert auto.generate(prompt, 8, temperature=0)[0] == plain.generate(prompt, 8, temperature=0)[0]


def test_auto_is_a_draft_name_and_a_misspelling_is_refused() -> None:
    assert options(draft="auto").checked().draft == "auto"
    with pytest.raises(ValueError, match="neither auto, ngram, int4, int8 nor an existing directory"):
        options(draft="atuo").checked()


@pytest.mark.parametrize("draft", ["int8", "int4"])
def test_a_self_draft_of_a_quantized_checkpoint_is_refused_before_loading(int8_ckpt: Path, tiny_ckpt: Path, draft: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_offload.generate.generation as generation

    monkeypatch.setattr(generation, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ValueError, match=f"--draft {draft}: .* is already quantized"):
        generation.Llama.build(int8_ckpt, tiny_ckpt.parent / "tokenizer.model", 32, 1, device="cpu", draft=draft)
