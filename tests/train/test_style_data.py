"""scripts/tools/make_style_data.py: the shipped data/style_*.jsonl are exactly what it writes, in the style it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "tools" / "make_style_data.py"
FILES = ("style_train.jsonl", "style_eval.jsonl")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("style")
    subprocess.run([sys.executable, str(SCRIPT), "--out_dir", str(out)], check=True, capture_output=True, timeout=60)
    return out


def _examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", FILES)
def test_shipped_files_are_what_the_script_writes(generated: Path, name: str) -> None:
    assert (generated / name).read_bytes() == (ROOT / "data" / name).read_bytes(), (
        f"data/{name} differs from what scripts/tools/make_style_data.py writes: run python3 scripts/tools/make_style_data.py")


@pytest.mark.parametrize("name", FILES)
def test_every_line_is_a_chat_example_in_the_style(generated: Path, name: str) -> None:
    text = (generated / name).read_text(encoding="utf-8")
    assert text.endswith("\n") and "\n\n" not in text
    examples = _examples(generated / name)
    assert len(examples) >= (250 if name == "style_train.jsonl" else 30)
    for example in examples:
        assert list(example) == ["messages"]
        user, assistant = example["messages"]
        assert user.keys() == assistant.keys() == {"role", "content"}
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        question, reply = user["content"], assistant["content"]
        assert question.endswith("?") and question == question.strip() and "\n" not in question
        assert reply.startswith("Aye, ") and reply.endswith(". Fair winds!"), reply
        fact = reply[len("Aye, "):-len(". Fair winds!")]
        assert fact and "." not in fact and "\n" not in fact, reply  # one short sentence
        assert len(reply) < 100


def test_eval_questions_and_facts_are_not_in_training(generated: Path) -> None:
    train = _examples(generated / "style_train.jsonl")
    held_out = _examples(generated / "style_eval.jsonl")
    train_questions = {e["messages"][0]["content"] for e in train}
    train_answers = {e["messages"][1]["content"] for e in train}
    assert len(train_questions) == len(train)
    for e in held_out:
        assert e["messages"][0]["content"] not in train_questions
        assert e["messages"][1]["content"] not in train_answers


def test_arithmetic_answers_are_right(generated: Path) -> None:
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for name in FILES:
        for e in _examples(generated / name):
            words = e["messages"][1]["content"][len("Aye, "):-len(". Fair winds!")].split()
            if len(words) == 5 and words[1] in ops and words[3] == "is":
                assert ops[words[1]](int(words[0]), int(words[2])) == int(words[4]), words
                checked += 1
    assert checked > 100
