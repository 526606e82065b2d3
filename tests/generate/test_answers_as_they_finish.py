"""Each answer of a batch is reported as soon as it is finished (Llama's ``on_result``), once, equal to what the
call returns; the example scripts print each dialog numbered with its answer at that moment."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_offload.generate.generation import Llama
from llama_offload.cli.options import run_chat_completion, run_text_completion


@pytest.fixture(scope="module")
def llama(tiny_ckpt: Path) -> Llama:
    return Llama.build(tiny_ckpt, tiny_ckpt.parent / "tokenizer.model", 64, 3, device="cpu")


def test_each_prediction_is_reported_once_when_it_finishes(llama: Llama) -> None:
    prompts = ["Once upon a time", "The sun", "A cat sat"]
    tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    free, _ = llama.generate(tokens, 8, temperature=0, stop_ids={-1})  # no stop: every row runs 8 tokens
    # The first row's second token as the stop: that row ends after one token, while the others go on.
    stop = free[0][1]
    assert all(stop not in row[:3] for row in free[1:]), "pick prompts whose rows do not stop as early"
    reported: list[tuple[int, list[int], int]] = []

    def on_done(i: int, toks: list[int], _lps: object) -> None:
        # How far the other rows were at that moment: a row reported when it finished, not at the end.
        reported.append((i, toks, sum(len(s.tokens) for s in llama._decoder.rows if s is not None)))

    out, _ = llama.generate(tokens, 8, temperature=0, stop_ids={stop}, on_done=on_done)
    assert sorted(i for i, _, _ in reported) == [0, 1, 2]  # each once
    assert reported[0][0] == 0 and reported[0][1] == [free[0][0]]
    assert reported[0][2] < reported[-1][2]  # the others had further to go when row 0 was reported
    assert {i: t for i, t, _ in reported} == dict(enumerate(out))
    results = []
    preds = llama.text_completion(prompts, temperature=0, max_gen_len=6, on_result=lambda i, r: results.append((i, r)))
    assert [r for _, r in sorted(results, key=lambda t: t[0])] == preds


def test_the_chat_example_prints_each_answer_numbered(llama: Llama, capsys: pytest.CaptureFixture) -> None:
    dialogs = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Name a colour."}]]
    answers = llama.chat_completion(dialogs, temperature=0, max_gen_len=5)
    run_chat_completion(llama, dialogs, temperature=0, top_p=0.9, max_gen_len=5)
    captured = capsys.readouterr()
    assert "generating answer 1-2 of 2" in captured.err
    for i, (dialog, answer) in enumerate(zip(dialogs, answers)):
        block = f"[{i + 1}/2]\nUser: {dialog[0]['content']}\n\n> Assistant: {answer['generation']['content']}\n"
        assert block in captured.out, captured.out
    assert "tokens in" in captured.out


def test_the_text_example_prints_each_completion_numbered(llama: Llama, capsys: pytest.CaptureFixture) -> None:
    prompts = ["Once upon a time", "The sun"]
    outs = llama.text_completion(prompts, temperature=0, max_gen_len=4)
    run_text_completion(llama, prompts, temperature=0, top_p=0.9, max_gen_len=4)
    out = capsys.readouterr().out
    for i, (p, r) in enumerate(zip(prompts, outs)):
        assert f"[{i + 1}/2] {p}\n> {r['generation']}\n" in out
