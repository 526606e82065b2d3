"""Fine-tuning data: chat examples laid out exactly as inference prompts them (golden ids and trained masks for
Llama 2, ChatML and Llama 3), text examples, packing into overlapping rows, and the JSONL reader's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llama_offload.text.chat_format import (
    B_SYS, E_SYS, ChatFormat, ChatMLFormat, Dialog, Llama2ChatFormat, Llama3ChatFormat,
)
from llama_offload.text.tokenizer import HFTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer
from llama_offload.train.data import IGNORE_INDEX, Example, pack, read_examples, render_chat, render_text
from test_tokenizer_json import write_tiny_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """The tiny byte-level BPE of test_tokenizer_json.py: ChatML tags, no BOS, SmolLM2's chat template."""
    t = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("chatml_data")))
    assert isinstance(t, HFTokenizer)
    return t


def mask(ex: Example) -> str:
    return "".join("1" if f else "0" for f in ex.trained)


def trained_ids(ex: Example) -> list[int]:
    return [t for t, f in zip(ex.tokens, ex.trained) if f]


# --- chat rendering: golden ids -------------------------------------------------------------------------------

LLAMA2_DIALOG: Dialog = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": " Bye? "},
    {"role": "assistant", "content": "  Bye.  "},
]


def test_llama2_golden(sp_tokenizer: Tokenizer) -> None:
    fmt = Llama2ChatFormat(sp_tokenizer)
    ex = render_chat(LLAMA2_DIALOG, sp_tokenizer, fmt)

    # Meta's layout by hand: one BOS...EOS sequence per exchange, the system prompt folded into the first user
    # message; the answer is what follows the encoded "[INST] user [/INST]" head, the EOS included.
    enc = sp_tokenizer.encode
    tokens: list[int] = []
    trained: list[bool] = []
    for user, answer in [(B_SYS + "Be brief." + E_SYS + "Hi?", "Hello."), ("Bye?", "Bye.")]:
        pair = enc(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)
        head = enc(f"[INST] {user.strip()} [/INST]", bos=True, eos=False)
        assert pair[: len(head)] == head  # SentencePiece splits at the space before the answer
        tokens += pair
        trained += [False] * len(head) + [True] * (len(pair) - len(head))
    assert ex.tokens == tokens
    assert ex.trained == trained

    # Observed from the deterministic 512-token test tokenizer: "▁", "Hello." ..., "▁", EOS per answer.
    assert trained_ids(ex) == [439, 490, 314, 449, 444, 461, 439, 2, 439, 479, 458, 440, 461, 439, 2]
    assert mask(ex) == "0" * 46 + "1" * 8 + "0" * 21 + "1" * 7
    assert sp_tokenizer.decode(ex.tokens[46:53]) == "Hello. "  # Meta's pair ends with a space
    assert ex.tokens[53] == sp_tokenizer.eos_id


def test_chatml_golden(bpe: HFTokenizer) -> None:
    fmt = ChatMLFormat(bpe)
    dialog: Dialog = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "The cat is."}]
    ex = render_chat(dialog, bpe, fmt)

    enc = lambda s: bpe.encode(s, bos=False, eos=False)  # noqa: E731
    S, E = fmt.im_start_id, fmt.im_end_id
    nl = enc("\n")
    system = [S, *enc(f"system\n{SMOL_SYSTEM}"), E, *nl]  # the template's default system turn
    user = [S, *enc("user\nIs it?"), E, *nl]
    header = [S, *enc("assistant\n")]
    reply = enc("The cat is.")
    assert ex.tokens == system + user + header + reply + [E] + nl
    assert ex.trained == [False] * len(system + user + header) + [True] * (len(reply) + 1) + [False] * len(nl)

    # 275 "The", 264 "Ġcat", 266 "Ġis", 49 ".", 2 <|im_end|>; the "\n" (13) after it is not trained.
    assert trained_ids(ex) == [275, 264, 266, 49, 2]
    assert ex.tokens[-2:] == [2, 13] and ex.trained[-2:] == [True, False]
    assert (S, E) == (1, 2) and bpe.add_bos is False


def test_chatml_multi_turn_with_system(bpe: HFTokenizer) -> None:
    fmt = ChatMLFormat(bpe)
    dialog: Dialog = [
        {"role": "system", "content": "Be the cat."},
        {"role": "user", "content": "Is it?"},
        {"role": "assistant", "content": " The cat."},  # kept as given: ChatML does not strip
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "is"},
    ]
    ex = render_chat(dialog, bpe, fmt)
    enc = lambda s: bpe.encode(s, bos=False, eos=False)  # noqa: E731
    S, E = fmt.im_start_id, fmt.im_end_id
    turn = lambda role, text: [S, *enc(f"{role}\n{text}"), E, *enc("\n")]  # noqa: E731
    prefix = turn("system", "Be the cat.") + turn("user", "Is it?") + [S, *enc("assistant\n")]
    middle = [*enc("\n"), *turn("user", "the cat?"), S, *enc("assistant\n")]
    expected = prefix + enc(" The cat.") + [E] + middle + enc("is") + [E] + enc("\n")
    assert ex.tokens == expected
    trained_expected = enc(" The cat.") + [E] + enc("is") + [E]
    assert trained_ids(ex) == trained_expected
    assert mask(ex).count("1") == len(trained_expected)
    assert SMOL_SYSTEM not in bpe.decode(ex.tokens)  # an explicit system message replaces the default


def test_llama3_golden(tiny_tik: TiktokenTokenizer) -> None:  # noqa: F811
    fmt = Llama3ChatFormat(tiny_tik)
    n = tiny_tik.bos_id  # the first special id: <|begin_of_text|>; +6 start_header, +7 end_header, +9 eot
    dialog: Dialog = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " world "}]
    ex = render_chat(dialog, tiny_tik, fmt)
    enc = lambda s: tiny_tik.encode(s, bos=False, eos=False)  # noqa: E731
    prompt = [n, n + 6, *enc("user"), n + 7, *enc("\n\n"), *enc("hello"), n + 9, n + 6, *enc("assistant"), n + 7,
              *enc("\n\n")]  # fmt: skip
    assert ex.tokens == prompt + enc("world") + [n + 9]
    assert ex.trained == [False] * len(prompt) + [True] * (len(enc("world")) + 1)
    # 119 "w", 261 "or", 263 "ld": the content stripped and encoded alone, as Meta does; 277 <|eot_id|>.
    assert trained_ids(ex) == [119, 261, 263, 277]
    assert n + 9 == fmt.eot_id == 277


def test_llama3_multi_turn_with_system(tiny_tik: TiktokenTokenizer) -> None:  # noqa: F811
    fmt = Llama3ChatFormat(tiny_tik)
    dialog: Dialog = [
        {"role": "system", "content": "hello"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "123"},
        {"role": "assistant", "content": "hello 123"},
    ]
    ex = render_chat(dialog, tiny_tik, fmt)
    expected = [fmt.begin_of_text_id] + [t for m in dialog for t in fmt.encode_message(m)]
    assert ex.tokens == expected
    enc = lambda s: tiny_tik.encode(s, bos=False, eos=False)  # noqa: E731
    assert trained_ids(ex) == enc("world") + [fmt.eot_id] + enc("hello 123") + [fmt.eot_id]
    # Only the two assistant turns after their headers are trained.
    header = fmt.encode_header("assistant")
    first = len([fmt.begin_of_text_id] + fmt.encode_message(dialog[0]) + fmt.encode_message(dialog[1]) + header)
    assert ex.trained.index(True) == first


# --- chat rendering: consistency with encode_dialog_prompt, for every format ----------------------------------

DIALOGS: list[Dialog] = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
    [{"role": "system", "content": "the cat"}, {"role": "user", "content": "is it?"},
     {"role": "assistant", "content": "The cat is."}],
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the cat"},
     {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
     {"role": "user", "content": " 2024 "}, {"role": "assistant", "content": "the cat is 123"}],
]  # fmt: skip


@pytest.fixture(params=["llama2", "chatml", "llama3"])
def any_format(
    request: pytest.FixtureRequest, sp_tokenizer: Tokenizer, bpe: HFTokenizer, tiny_tik: TiktokenTokenizer  # noqa: F811
) -> tuple[Tokenizer, ChatFormat]:
    if request.param == "llama2":
        return sp_tokenizer, Llama2ChatFormat(sp_tokenizer)
    if request.param == "chatml":
        return bpe, ChatMLFormat(bpe)
    return tiny_tik, Llama3ChatFormat(tiny_tik)


@pytest.mark.parametrize("dialog", DIALOGS, ids=["one-turn", "system", "three-turns"])
def test_prompt_part_is_encode_dialog_prompt(any_format: tuple[Tokenizer, ChatFormat], dialog: Dialog) -> None:
    tok, fmt = any_format
    ex = render_chat(dialog, tok, fmt)
    replies = [k for k, m in enumerate(dialog) if m["role"] == "assistant"]
    trained_before = 0
    for k in replies:
        prompt = fmt.encode_dialog_prompt(dialog[:k])
        # Training sees exactly the ids inference prompts with, and the reply is trained from right after them.
        assert ex.tokens[: len(prompt)] == prompt
        assert ex.trained[: len(prompt)].count(True) == trained_before
        assert ex.trained[len(prompt)] is True
        run = ex.trained[len(prompt) :]
        reply_len = run.index(False) if False in run else len(run)
        trained_before += reply_len
        # The trained run is the reply's content and the end of turn, which is a stop token of the format.
        assert ex.tokens[len(prompt) + reply_len - 1] in fmt.stop_ids
        content = tok.decode(ex.tokens[len(prompt) : len(prompt) + reply_len - 1])
        assert content.strip() == dialog[k]["content"].strip()
    assert mask(ex).count("1") == trained_before
    # The whole example is the format's own rendering of the finished conversation.
    follow_up = fmt.encode_dialog_prompt([*dialog, {"role": "user", "content": "the cat"}])
    assert follow_up[: len(ex.tokens)] == ex.tokens


def test_reply_merging_with_the_prompt_is_refused(bpe: HFTokenizer) -> None:
    # "assistant\n" + "\n The cat": byte-level BPE merges the two newlines into one token (ĊĊ), so the ids the
    # model is prompted with ("...assistant", "\n") are not a prefix of the conversation's.
    dialog = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "\n The cat"}]
    with pytest.raises(ValueError, match=r"Message 1 \(assistant\).*Leading whitespace"):
        render_chat(dialog, bpe, ChatMLFormat(bpe))


def test_unknown_chat_format_is_refused(sp_tokenizer: Tokenizer) -> None:
    class Other:
        name = "other"

        def encode_dialog_prompt(self, dialog: Any) -> list[int]:
            return [1]

    dialog = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="'other'"):
        render_chat(dialog, sp_tokenizer, Other())  # type: ignore[arg-type]


# --- text examples --------------------------------------------------------------------------------------------


def test_text_with_bos(sp_tokenizer: Tokenizer) -> None:
    ex = render_text("The capital of France is Paris.", sp_tokenizer)
    assert ex.tokens == sp_tokenizer.encode("The capital of France is Paris.", bos=True, eos=True)
    assert ex.tokens[0] == sp_tokenizer.bos_id and ex.tokens[-1] == sp_tokenizer.eos_id
    # The BOS is given, never predicted; every other token, the EOS included, is trained.
    assert ex.trained == [False] + [True] * (len(ex.tokens) - 1)


def test_text_without_bos(bpe: HFTokenizer) -> None:
    ex = render_text("the cat", bpe)
    assert ex.tokens == [119, 260, 264, bpe.eos_id]  # t, he, Ġcat, <|im_end|>: no BOS for this model
    assert ex.trained == [True] * 4


def test_example_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="3 tokens, 2 flags"):
        Example(tokens=[1, 2, 3], trained=[True, False])


# --- packing --------------------------------------------------------------------------------------------------


def reference_pack(tokens: list[int], trained: list[bool], seq_len: int, pad_id: int) -> tuple[list, list]:
    """The spec, written out: row r covers stream[r*seq_len : r*seq_len + seq_len + 1]."""
    n = -(-(len(tokens) - 1) // seq_len)
    inputs, targets = [], []
    for r in range(n):
        row_in, row_tg = [], []
        for j in range(seq_len):
            i = r * seq_len + j
            row_in.append(tokens[i] if i < len(tokens) else pad_id)
            row_tg.append(tokens[i + 1] if i + 1 < len(tokens) and trained[i + 1] else IGNORE_INDEX)
        inputs.append(row_in)
        targets.append(row_tg)
    return inputs, targets


EXAMPLES = [
    Example(tokens=[1, 10, 11, 12, 2], trained=[False, True, True, True, True]),
    Example(tokens=[20, 21, 22, 23, 24, 25, 26], trained=[False, False, False, True, True, True, False]),
    Example(tokens=[30, 31], trained=[True, True]),
]
STREAM = [t for ex in EXAMPLES for t in ex.tokens]
FLAGS = [f for ex in EXAMPLES for f in ex.trained]


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 5, 7, 13, 14, 100])
def test_pack_matches_the_spec(seq_len: int) -> None:
    inputs, targets = pack(EXAMPLES, seq_len, pad_id=0)
    n = -(-(len(STREAM) - 1) // seq_len)
    assert inputs.shape == targets.shape == (n, seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    ref_in, ref_tg = reference_pack(STREAM, FLAGS, seq_len, pad_id=0)
    assert inputs.tolist() == ref_in
    assert targets.tolist() == ref_tg


def test_pack_layout() -> None:
    # 14 tokens, seq_len 4: targets cover stream[1:14], so 4 rows, the last one padded with 3 positions.
    inputs, targets = pack(EXAMPLES, 4, pad_id=99)
    assert inputs.tolist() == [[1, 10, 11, 12], [2, 20, 21, 22], [23, 24, 25, 26], [30, 31, 99, 99]]
    X = IGNORE_INDEX
    assert targets.tolist() == [[10, 11, 12, 2], [X, X, X, 23], [24, 25, X, 30], [31, X, X, X]]
    # Overlap by one: a row's last target is the next row's first input (where trained).
    for r in range(len(inputs) - 1):
        assert targets[r, -1].item() in (inputs[r + 1, 0].item(), X)
        assert targets[r, :-1][targets[r, :-1] != X].tolist() == inputs[r, 1:][targets[r, :-1] != X].tolist()


def test_pack_ignores_exactly_the_untrained_tokens() -> None:
    inputs, targets = pack(EXAMPLES, 3, pad_id=0)
    flat = targets.flatten().tolist()  # flat[i] is the target for stream[i + 1]
    for i, tok in enumerate(STREAM[1:]):
        assert flat[i] == (tok if FLAGS[i + 1] else IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in flat[len(STREAM) - 1 :])  # the padding
    assert sum(t != IGNORE_INDEX for t in flat) == sum(FLAGS[1:])


@pytest.mark.parametrize("seq_len", [1, 3, 4, 6, 13, 50])
def test_pack_drops_no_token(seq_len: int) -> None:
    inputs, targets = pack(EXAMPLES, seq_len, pad_id=0)
    # Inputs hold the stream up to the last row's end; the final token, if not among them, is the last target.
    flat_in = inputs.flatten().tolist()
    rebuilt = flat_in[: len(STREAM)]
    if len(rebuilt) < len(STREAM):
        assert len(STREAM) - len(rebuilt) == 1
        rebuilt.append(targets.flatten().tolist()[len(STREAM) - 2])
    assert rebuilt == STREAM  # the last token (31) is trained, so it shows in the targets
    # Padding: only after the stream, and no row is padding alone.
    assert flat_in[len(STREAM) :] == [0] * max(0, len(flat_in) - len(STREAM))
    assert len(flat_in) - (len(STREAM) - 1) < seq_len


def test_pack_exact_fit_has_no_padding() -> None:
    ex = Example(tokens=list(range(1, 10)), trained=[True] * 9)  # 9 tokens: 8 targets, two rows of 4
    inputs, targets = pack([ex], 4, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert targets.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]


def test_pack_rendered_examples(sp_tokenizer: Tokenizer) -> None:
    fmt = Llama2ChatFormat(sp_tokenizer)
    examples = [render_text("Hello there.", sp_tokenizer), render_chat(LLAMA2_DIALOG, sp_tokenizer, fmt)]
    inputs, targets = pack(examples, 16, pad_id=sp_tokenizer.eos_id)
    stream = examples[0].tokens + examples[1].tokens
    flags = examples[0].trained + examples[1].trained
    ref_in, ref_tg = reference_pack(stream, flags, 16, sp_tokenizer.eos_id)
    assert (inputs.tolist(), targets.tolist()) == (ref_in, ref_tg)


@pytest.mark.parametrize(
    ("examples", "seq_len", "pad_id", "fragment"),
    [
        pytest.param(EXAMPLES, 0, 0, "seq_len must be at least 1", id="seq-len-0"),
        pytest.param(EXAMPLES, 4, -1, "pad_id must be a token id", id="pad-id--1"),
        pytest.param([], 4, 0, "0 token(s)", id="no-examples"),
        pytest.param([Example([5], [True])], 4, 0, "1 token(s)", id="one-token"),
    ],
)
def test_pack_errors(examples: list[Example], seq_len: int, pad_id: int, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        pack(examples, seq_len, pad_id)
    assert fragment in str(exc.value)


# --- reading a JSONL file --------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_examples(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    fmt = Llama2ChatFormat(sp_tokenizer)
    path = write_lines(tmp_path / "data.jsonl", [
        json.dumps({"text": "Hello there."}),
        "",
        "   ",
        json.dumps({"messages": LLAMA2_DIALOG}),
        json.dumps({"text": "日本 🙂"}, ensure_ascii=False),
    ])  # fmt: skip
    examples = read_examples(path, sp_tokenizer, fmt)
    assert examples == [
        render_text("Hello there.", sp_tokenizer),
        render_chat(LLAMA2_DIALOG, sp_tokenizer, fmt),
        render_text("日本 🙂", sp_tokenizer),
    ]
    assert read_examples(str(path), sp_tokenizer, fmt) == examples  # a str path works too


def test_read_examples_bom_and_crlf(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    fmt = Llama2ChatFormat(sp_tokenizer)
    assert read_examples(path, sp_tokenizer, fmt) == [render_text("a", sp_tokenizer), render_text("b", sp_tokenizer)]


GOOD = json.dumps({"text": "fine"})
U = {"role": "user", "content": "u"}
A = {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}


def msgs(*messages: Any) -> str:
    return json.dumps({"messages": list(messages)})


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        pytest.param('{"text": "a"', ["invalid JSON", "column"], id="invalid-json"),
        pytest.param("not json", ["invalid JSON"], id="not-json"),
        pytest.param('["a"]', ["expected a JSON object", "found a list"], id="list"),
        pytest.param('"a"', ["expected a JSON object", "found a str"], id="string"),
        pytest.param("3", ["expected a JSON object", "found an int"], id="number"),
        pytest.param("{}", ["exactly one of 'text' and 'messages'", "found neither"], id="neither"),
        pytest.param('{"text": "a", "messages": []}', ["found both"], id="both"),
        pytest.param('{"text": "a", "weight": 2}', ["unknown key(s) ['weight']"], id="extra-key"),
        pytest.param('{"prompt": "a"}', ["unknown key(s) ['prompt']"], id="only-unknown-key"),
        pytest.param('{"text": 3}', ["'text' must be a string", "found an int"], id="text-int"),
        pytest.param('{"text": null}', ["'text' must be a string", "found a NoneType"], id="text-null"),
        pytest.param('{"text": ""}', ["'text' is empty"], id="text-empty"),
        pytest.param('{"text": " \\n "}', ["'text' is empty"], id="text-blank"),
        pytest.param('{"text": "\\ud800"}', ["lone surrogate"], id="text-surrogate"),
        pytest.param('{"messages": "hi"}', ["'messages' must be a list", "found a str"], id="messages-str"),
        pytest.param('{"messages": []}', ["'messages' is empty"], id="messages-empty"),
        pytest.param(msgs(U, "a"), ["Message 1", "expected an object", "found a str"], id="message-str"),
        pytest.param(msgs(U, {"role": "assistant"}), ["Message 1", "missing key(s) ['content']"], id="no-content"),
        pytest.param(msgs(U, {**A, "name": "x"}), ["Message 1", "unknown key(s) ['name']"], id="message-extra-key"),
        pytest.param(msgs(U, {"role": "bot", "content": "a"}), ["Message 1", "unknown role 'bot'"], id="bad-role"),
        pytest.param(msgs(U, {"role": "assistant", "content": 1}), ["Message 1", "'content' must be a string"],
                     id="content-int"),
        pytest.param(msgs(U, {"role": "assistant", "content": "\ud800"}), ["lone surrogate"], id="content-surrogate"),
        pytest.param(msgs(U), ["no assistant message"], id="no-assistant"),
        pytest.param(msgs(S, U), ["no assistant message"], id="no-assistant-system"),
        pytest.param(msgs(U, A, U), ["Message 2", "last message must be from 'assistant'", "found 'user'"],
                     id="ends-with-user"),
        pytest.param(msgs(U, U, A), ["Message 1", "expected role 'assistant'", "found 'user'"], id="user-user"),
        pytest.param(msgs(A), ["Message 0", "expected a 'user' message"], id="assistant-only"),
        pytest.param(msgs(A, U, A), ["Message 0", "expected role 'user'", "found 'assistant'"],
                     id="starts-with-assistant"),
        pytest.param(msgs(U, A, S, U, A), ["Message 2", "found 'system'"], id="system-not-first"),
        pytest.param(msgs(S, A), ["Message 0 is a system message"], id="system-then-assistant"),
    ],
)  # fmt: skip
def test_bad_line(tmp_path: Path, sp_tokenizer: Tokenizer, line: str, fragments: list[str]) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(ValueError) as exc:
        read_examples(path, sp_tokenizer, Llama2ChatFormat(sp_tokenizer))
    message = str(exc.value)
    assert f"{str(path)!r} line 3" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_undecodable_line(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError) as exc:
        read_examples(path, sp_tokenizer, Llama2ChatFormat(sp_tokenizer))
    assert f"{str(path)!r} line 2" in str(exc.value) and "not valid UTF-8" in str(exc.value)


def test_reply_merging_with_the_prompt_names_the_line(tmp_path: Path, bpe: HFTokenizer) -> None:
    path = write_lines(tmp_path / "chat.jsonl", [msgs(U, {"role": "assistant", "content": "\n the cat"})])
    with pytest.raises(ValueError) as exc:
        read_examples(path, bpe, ChatMLFormat(bpe))
    assert f"{str(path)!r} line 1: Message 1 (assistant)" in str(exc.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_no_examples(tmp_path: Path, sp_tokenizer: Tokenizer, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as exc:
        read_examples(path, sp_tokenizer, Llama2ChatFormat(sp_tokenizer))
    assert f"{str(path)!r} has no examples" in str(exc.value)


def test_missing_file(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError) as exc:
        read_examples(path, sp_tokenizer, Llama2ChatFormat(sp_tokenizer))
    assert str(path) in str(exc.value)


def test_directory(tmp_path: Path, sp_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        read_examples(tmp_path, sp_tokenizer, Llama2ChatFormat(sp_tokenizer))
