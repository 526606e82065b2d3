"""SentencePiece-vocabulary GGUFs (``tokenizer.ggml.model`` "llama": Llama 2, Code Llama) -> tokenizer.model.

A small Llama-2-style SentencePiece BPE model is trained here; its pieces, scores and types go into a GGUF the
way llama.cpp's converter writes them (``_create_vocab_sentencepiece``), with a tiny random llama model.
The conversion must give back a tokenizer.model whose ids are the trained model's on every line of a corpus
(whitespace runs, digits, text that needs byte fallback), and the model's logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer  # noqa: E402

from llama_offload.model.args import ModelArgs  # noqa: E402
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta  # noqa: E402
from llama_offload.convert.gguf import convert_gguf  # noqa: E402
from llama_offload.convert.gguf_spm import sentencepiece_chat_format, sentencepiece_model_from_gguf  # noqa: E402
from llama_offload.model.transformer import Transformer  # noqa: E402
from llama_offload.text.tokenizer import BUNDLED_CORPUS_PATH, SentencePieceTokenizer, load_tokenizer  # noqa: E402
from test_convert_gguf import add_model_fields, gguf_tensors_from_meta, load, logits  # noqa: E402
from tiny import tiny_args, tiny_model  # noqa: E402

VOCAB_SIZE = 400
USER_DEFINED = ["<|im_start|>", "<|im_end|>"]  # llama.cpp types added tokens user-defined (4)
CONTROL = ["<ctrl>"]
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + "
                   "eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"

# Beyond the corpus: what a Llama tokenizer must get right.
EXTRA_LINES = [
    "", " ", "   ", "  leading spaces", "trailing spaces   ", "inner    runs   of  spaces", "tabs\tand\t\ttabs",
    "line\nbreaks\n\nhere", "digits 0123456789 and 3.14159, 2024-01-31", "Ünïcödé café naïve façade",
    "日本語のテキストと中文", "emoji 🦙🚀 and ✓", "Ελληνικά кириллица עברית", "<s> and </s> typed as text",
    "<|im_start|>user\nhi<|im_end|>", "<ctrl> stays text", "<0x41> is not a byte here", "\u2581 the meta symbol",
    "zero\u200bwidth", "a" * 300, "\u00a0non-breaking\u00a0space", "The cat is on the mat.",
]


def corpus_lines() -> list[str]:
    return BUNDLED_CORPUS_PATH.read_text(encoding="utf-8").splitlines() + EXTRA_LINES


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style SentencePiece BPE model (identity normalizer, byte fallback), plus added tokens."""
    prefix = tmp_path_factory.mktemp("spm") / "sp"
    SentencePieceTrainer.Train(
        input=str(BUNDLED_CORPUS_PATH), model_prefix=str(prefix), vocab_size=VOCAB_SIZE, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        user_defined_symbols=USER_DEFINED, control_symbols=CONTROL,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return prefix.with_name("sp.model")


@pytest.fixture(scope="module")
def sp(sp_path: Path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(sp_path))


def gguf_vocab(sp: SentencePieceProcessor, *, chat_template: Optional[str] = LLAMA2_TEMPLATE) -> dict[str, Any]:
    """The tokenizer metadata llama.cpp's converter writes for this SentencePiece model, as plain values."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_unused(i):
            kind = 5
        elif sp.is_byte(i):
            kind = 6
        elif piece in USER_DEFINED:
            kind = 4
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(kind)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,  # as many Llama 2 GGUFs have it: <unk>
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    if chat_template is not None:
        fields["tokenizer.chat_template"] = chat_template
    return fields


def write_spm_gguf(path: Path, args: ModelArgs, tensors: dict[str, np.ndarray], fields: dict[str, Any]) -> Path:
    """A llama GGUF with a SentencePiece vocabulary, keys as llama.cpp writes them; F32 tensors."""
    w = gguf.GGUFWriter(path, "llama")
    add_model_fields(w, args, "tiny spm test model", len(fields["tokenizer.ggml.tokens"]), file_type=0)
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in fields:
        w.add_token_scores(fields["tokenizer.ggml.scores"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    w.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(fields["tokenizer.ggml.add_eos_token"])
    w.add_add_space_prefix(fields["tokenizer.ggml.add_space_prefix"])
    if "tokenizer.chat_template" in fields:
        w.add_chat_template(fields["tokenizer.chat_template"])
    for name, t in tensors.items():
        w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def source() -> tuple[ModelArgs, Transformer]:
    args = tiny_args(vocab_size=VOCAB_SIZE, n_layers=2)
    return args, tiny_model(args, seed=7)


def rebuilt(fields: dict[str, Any], **kw: Any) -> SentencePieceProcessor:
    out = SentencePieceProcessor()
    out.LoadFromSerializedProto(sentencepiece_model_from_gguf(fields, **kw))
    return out


def test_the_vocabulary_has_every_kind_of_piece(sp: SentencePieceProcessor) -> None:
    types = gguf_vocab(sp)["tokenizer.ggml.token_type"]
    assert len(types) == VOCAB_SIZE and {t: types.count(t) for t in (2, 3, 4, 6)} == {2: 1, 3: 3, 4: 2, 6: 256}


def test_converted_gguf_gives_the_same_ids_and_logits(sp: SentencePieceProcessor, source: tuple[ModelArgs, Transformer],
                                                      tmp_path: Path) -> None:
    args, model = source
    path = write_spm_gguf(tmp_path / "llama2.gguf", args, gguf_tensors_from_meta(model, args), gguf_vocab(sp))
    out = convert_gguf(path, tmp_path / "ckpt", dtype=torch.float32)

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["consolidated.00.pth", "params.json", "tokenizer.model", META_FILENAME])
    meta = read_checkpoint_meta(out)
    assert meta["tokenizer"] == "tokenizer.model" and meta["chat_format"] == "llama2"
    assert meta["add_bos"] is True and meta["source"]["format"] == "gguf"

    tok = load_tokenizer(out)  # the file named in llama_offload.json, read by the SentencePiece backend
    assert isinstance(tok, SentencePieceTokenizer) and tok.n_words == VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, -1)
    lines = corpus_lines()
    assert len(lines) > 200
    byte_fallback = 0
    for line in lines:
        want = sp.encode(line)
        assert tok.encode(line, bos=False, eos=False) == want, line
        assert tok.encode(line, bos=True, eos=True) == [1, *want, 2], line
        assert tok.decode(want) == sp.decode(want), line
        if "\u2581" not in line:  # SentencePiece itself decodes a literal U+2581 as a space
            assert tok.decode(want) == line, line
        byte_fallback += any(sp.is_byte(i) for i in want)
    assert byte_fallback >= 5  # the non-ASCII lines really went through byte fallback
    im_start = sp.piece_to_id("<|im_start|>")  # user-defined: one token wherever it appears in the text
    assert tok.encode("<|im_start|>user", bos=False, eos=False)[1:] == [im_start, *sp.encode("user")[1:]]
    for i in range(VOCAB_SIZE):  # piece for piece the trained model
        assert (tok.sp_model.id_to_piece(i), tok.sp_model.get_score(i)) == (sp.id_to_piece(i), sp.get_score(i)), i
        assert [f(i) for f in (tok.sp_model.is_unknown, tok.sp_model.is_control, tok.sp_model.is_byte)] == \
            [f(i) for f in (sp.is_unknown, sp.is_control, sp.is_byte)], i

    converted = load(out)
    tokens = torch.tensor([tok.encode(lines[2], bos=True, eos=False)[:12], tok.encode(EXTRA_LINES[10], bos=True, eos=False)[:12]])
    torch.testing.assert_close(logits(converted, tokens), logits(model, tokens), rtol=0, atol=0)


def test_converted_checkpoint_chats_with_llama2_format(sp: SentencePieceProcessor, source: tuple[ModelArgs, Transformer],
                                                        tmp_path: Path) -> None:
    from llama_offload.generate.generation import Llama

    args, model = source
    path = write_spm_gguf(tmp_path / "m.gguf", dataclasses.replace(args, max_seq_len=128),
                          gguf_tensors_from_meta(model, args), gguf_vocab(sp))
    out = convert_gguf(path, tmp_path / "c", dtype=torch.float32)
    llama = Llama.build(out, out / read_checkpoint_meta(out)["tokenizer"], max_seq_len=128, max_batch_size=1,
                        device="cpu")
    assert llama.chat_format.name == "llama2"
    prompt = llama.chat_format.encode_dialog_prompt([{"role": "user", "content": "the sun"}])
    assert prompt == [1, *sp.encode("[INST] the sun [/INST]")]
    result = llama.chat_completion([[{"role": "user", "content": "the sun"}]], temperature=0, max_gen_len=4)
    assert isinstance(result[0]["generation"]["content"], str)


def test_no_chat_template_records_null(sp: SentencePieceProcessor, source: tuple[ModelArgs, Transformer],
                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args, model = source
    path = write_spm_gguf(tmp_path / "base.gguf", args, gguf_tensors_from_meta(model, args),
                          gguf_vocab(sp, chat_template=None))
    out = convert_gguf(path, tmp_path / "c")
    meta = read_checkpoint_meta(out)
    assert meta["chat_format"] is None and meta["tokenizer"] == "tokenizer.model"
    assert "no known chat template" in capsys.readouterr().err


def test_chat_formats_a_sentencepiece_tokenizer_cannot_build_are_not_recorded() -> None:
    notes: list[str] = []
    assert sentencepiece_chat_format("llama2", say=notes.append) == "llama2"
    assert sentencepiece_chat_format(None, say=notes.append) is None
    assert notes == []
    assert sentencepiece_chat_format("chatml", say=notes.append) is None
    assert len(notes) == 1 and "'chatml'" in notes[0] and "null" in notes[0]


def test_wire_format_matches_sentencepiece_model_pb2(sp: SentencePieceProcessor) -> None:
    # Needs protobuf (a test dependency only: the conversion writes the bytes itself).
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    data = sentencepiece_model_from_gguf(gguf_vocab(sp))
    ours, original = pb.ModelProto(), pb.ModelProto()
    ours.ParseFromString(data)
    original.ParseFromString(sp.serialized_model_proto())
    assert [(p.piece, p.score, p.type) for p in ours.pieces] == [(p.piece, p.score, p.type) for p in original.pieces]
    assert ours.trainer_spec.model_type == pb.TrainerSpec.BPE and ours.trainer_spec.byte_fallback
    assert (ours.trainer_spec.unk_id, ours.trainer_spec.bos_id, ours.trainer_spec.eos_id, ours.trainer_spec.pad_id) == \
        (0, 1, 2, -1)
    assert (ours.trainer_spec.unk_piece, ours.trainer_spec.bos_piece, ours.trainer_spec.eos_piece) == ("<unk>", "<s>", "</s>")
    n = ours.normalizer_spec
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == ("identity", True, False, True)
    assert ours.SerializeToString() == data  # field for field what protobuf itself writes


def test_padded_vocabulary_and_unused_tokens(sp: SentencePieceProcessor) -> None:
    # llama.cpp pads a vocabulary shorter than the model's with [PAD<id>] tokens of type unused.
    fields = gguf_vocab(sp)
    extra = [f"[PAD{i}]" for i in range(VOCAB_SIZE, VOCAB_SIZE + 4)]
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + extra
    fields["tokenizer.ggml.scores"] = fields["tokenizer.ggml.scores"] + [-1000.0] * 4
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [5] * 4
    model = rebuilt(fields)
    assert model.get_piece_size() == VOCAB_SIZE + 4 and all(model.is_unused(i) for i in range(VOCAB_SIZE, VOCAB_SIZE + 4))
    for line in corpus_lines()[:60] + EXTRA_LINES + extra:
        assert model.encode(line) == sp.encode(line), line


def test_special_ids(sp: SentencePieceProcessor) -> None:
    fields = gguf_vocab(sp)
    ctrl = sp.piece_to_id("<ctrl>")
    assert rebuilt({**fields, "tokenizer.ggml.padding_token_id": ctrl}).pad_id() == ctrl  # a control token of its own
    assert rebuilt({**fields, "tokenizer.ggml.padding_token_id": 2}).pad_id() == -1  # EOS: no padding token
    assert rebuilt({**fields, "tokenizer.ggml.eos_token_id": ctrl}).eos_id() == ctrl
    # Keys absent: llama.cpp's defaults for SentencePiece vocabularies (unk 0, bos 1, eos 2, no padding).
    bare = {k: v for k, v in fields.items() if not k.endswith("_token_id")}
    model = rebuilt(bare)
    assert (model.unk_id(), model.bos_id(), model.eos_id(), model.pad_id()) == (0, 1, 2, -1)
    # A user-defined EOS (a fine-tune's added token) is made a control token, and said so.
    types = list(fields["tokenizer.ggml.token_type"])
    im_end = sp.piece_to_id("<|im_end|>")
    notes: list[str] = []
    model = rebuilt({**fields, "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": im_end},
                    say=notes.append)
    assert model.eos_id() == im_end and model.is_control(im_end)
    assert len(notes) == 1 and "'<|im_end|>'" in notes[0] and "control" in notes[0]
    assert types[im_end] == 4  # the caller's fields are left alone


def test_settings_sentencepiece_cannot_express_are_reported(sp: SentencePieceProcessor) -> None:
    notes: list[str] = []
    rebuilt({**gguf_vocab(sp), "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True},
            say=notes.append)
    assert len(notes) == 2 and "add_bos_token false" in notes[0] and "add_eos_token true" in notes[1]
    rebuilt(gguf_vocab(sp), say=notes.append)
    assert len(notes) == 2  # Llama 2's own settings: nothing to say


def test_add_space_prefix_false(sp: SentencePieceProcessor) -> None:
    with_prefix = rebuilt(gguf_vocab(sp))
    without = rebuilt({**gguf_vocab(sp), "tokenizer.ggml.add_space_prefix": False})
    assert with_prefix.encode("The Sun", out_type=str)[0].startswith("\u2581")
    assert not without.encode("The Sun", out_type=str)[0].startswith("\u2581")
    assert without.encode(" The Sun") == with_prefix.encode("The Sun")


BYTE_0 = 6  # <unk> <s> </s> <ctrl> <|im_start|> <|im_end|>, then <0x00>...


def _malformed(fields: dict[str, Any], case: str) -> dict[str, Any]:
    f = {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}
    assert f["tokenizer.ggml.tokens"][BYTE_0] == "<0x00>"
    types = f["tokenizer.ggml.token_type"]
    if case == "no scores":
        del f["tokenizer.ggml.scores"]
    elif case == "no types":
        del f["tokenizer.ggml.token_type"]
    elif case == "short scores":
        f["tokenizer.ggml.scores"] = f["tokenizer.ggml.scores"][:-1]
    elif case == "type 7":
        types[300] = 7
    elif case == "type 0":
        types[BYTE_0 + 2] = 0
    elif case == "duplicate":
        f["tokenizer.ggml.tokens"][350] = f["tokenizer.ggml.tokens"][349]
    elif case == "no unknown":
        types[0] = 3
    elif case == "two unknowns":
        types[300] = 2
    elif case == "missing byte":
        types[BYTE_0 + 0x41] = 1
    elif case == "bad byte name":
        f["tokenizer.ggml.tokens"][BYTE_0 + 0x41] = "<0x4g>"
    elif case == "bos out of range":
        f["tokenizer.ggml.bos_token_id"] = 4000
    elif case == "eos is a byte":
        f["tokenizer.ggml.eos_token_id"] = BYTE_0
    elif case == "unk id disagrees":
        f["tokenizer.ggml.unknown_token_id"] = 1
    elif case == "empty token":
        f["tokenizer.ggml.tokens"][300] = ""
    elif case == "nan score":
        f["tokenizer.ggml.scores"][300] = float("nan")
    elif case == "no tokens":
        f["tokenizer.ggml.tokens"] = []
    return f


MALFORMED = {
    "no scores": r"without tokenizer\.ggml\.scores.*one score per token",
    "no types": r"without tokenizer\.ggml\.token_type",
    "short scores": r"differ in length: 400 tokenizer\.ggml\.tokens, 399 tokenizer\.ggml\.scores and 400 "
                    r"tokenizer\.ggml\.token_type",
    "type 7": r"token 300 \(.*\) has token type 7.*Expected one of: 1 normal, 2 unknown, 3 control, 4 user-defined, "
              r"5 unused, 6 byte",
    "type 0": r"token 8 \('<0x02>'\) has token type 0",
    "duplicate": r"appears twice \(ids 349 and 350\)",
    "no unknown": r"exactly one token of type unknown \(2\), this one has none",
    "two unknowns": r"exactly one token of type unknown \(2\), this one has 2 \(ids \[0, 300\]\)",
    "missing byte": r"has 255 byte tokens; byte fallback needs all 256.*missing: <0x41>",
    "bad byte name": r"token 71 \('<0x4g>'\) is typed byte \(6\), but byte tokens are named <0x00> to <0xFF>",
    "bos out of range": r"bos_token_id is 4000, which is not a token id \(the vocabulary has ids 0\.\.399\)",
    "eos is a byte": r"EOS token \(tokenizer\.ggml\.eos_token_id 6, '<0x00>'\) is typed byte; it should be a control",
    "unk id disagrees": r"unknown_token_id is 1, but the token of type unknown is 0",
    "empty token": r"token 300 is ''; SentencePiece needs a non-empty text",
    "nan score": r"token 300 \(.*\) has the score nan; expected a number",
    "no tokens": r"has no tokenizer\.ggml\.tokens",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_vocabulary_is_refused_clearly(sp: SentencePieceProcessor, case: str) -> None:
    with pytest.raises(ValueError, match=MALFORMED[case]) as exc:
        sentencepiece_model_from_gguf(_malformed(gguf_vocab(sp), case), source="m.gguf")
    msg = str(exc.value)
    assert msg.startswith("m.gguf")  # the file, what was expected and found, and what to do
    if case != "no tokens":
        assert "Meta's download or its Hugging Face directory" in msg


def test_malformed_gguf_file_fails_before_writing(sp: SentencePieceProcessor, source: tuple[ModelArgs, Transformer],
                                                  tmp_path: Path) -> None:
    args, model = source
    fields = _malformed(gguf_vocab(sp), "type 7")
    path = write_spm_gguf(tmp_path / "bad.gguf", args, gguf_tensors_from_meta(model, args), fields)
    with pytest.raises(ValueError, match=rf"^{path}: token 300 .* has token type 7"):
        convert_gguf(path, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    fields = _malformed(gguf_vocab(sp), "no scores")
    path = write_spm_gguf(tmp_path / "noscores.gguf", args, gguf_tensors_from_meta(model, args), fields)
    with pytest.raises(ValueError, match="without tokenizer.ggml.scores"):
        convert_gguf(path, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "noscores.gguf"]
