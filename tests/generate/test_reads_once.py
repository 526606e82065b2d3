"""One build reads its checkpoint directory once: every file of it (and the tokenizer) is opened at most once.

The planner, the loader, the draft and the chat format all take the record checkpoint/record.py reads, and a
shard's mapping is shared by the planner's look at its headers and the loader. Opens are counted with Python's
audit hook, which sees every open() and os.open() of the process (torch.load opens a shard through Python's
open, and the tokenizer's bytes are read once and handed to its backend).
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_offload.convert.quantize import quantize_checkpoint
from llama_offload.generate.generation import Llama
from llama_offload.model.quant import QuantSpec

_COUNTING: list[collections.Counter] = []  # the counter of the build being watched, if any


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _COUNTING and isinstance(args[0], (str, bytes, os.PathLike)):
        _COUNTING[-1][os.path.realpath(os.fsdecode(args[0]))] += 1


sys.addaudithook(_audit)  # hooks cannot be removed: it counts only while a build is watched


def opens_of_build(ckpt: Path, tokenizer: Path, **flags: Any) -> dict[str, int]:
    """{file: times opened} for the files of ``ckpt`` and the tokenizer, over one Llama.build."""
    counter: collections.Counter = collections.Counter()
    _COUNTING.append(counter)
    try:
        Llama.build(ckpt, tokenizer, max_seq_len=32, max_batch_size=1, device="cpu", **flags)
    finally:
        _COUNTING.pop()
    watched = (os.path.realpath(ckpt), os.path.realpath(tokenizer))
    return {path: n for path, n in counter.items()
            if os.path.dirname(path) == watched[0] or path == watched[1]}


@pytest.fixture(scope="module")
def int8_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-q8", QuantSpec(8, None))


def test_a_meta_checkpoint_is_read_once(tiny_ckpt: Path) -> None:
    tokenizer = tiny_ckpt.parent / "tokenizer.model"
    opens = opens_of_build(tiny_ckpt, tokenizer)
    names = {Path(p).name: n for p, n in opens.items()}
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= set(names), opens
    assert all(n == 1 for n in opens.values()), opens


def test_a_quantized_checkpoint_with_its_metadata_is_read_once(int8_ckpt: Path) -> None:
    tokenizer = int8_ckpt / "tokenizer.model"
    opens = opens_of_build(int8_ckpt, tokenizer, chat_format="llama2")
    names = {Path(p).name: n for p, n in opens.items()}
    # llama_offload.json holds the quantization record, read by the planner, the loader and the draft choice.
    assert {"params.json", "llama_offload.json", "consolidated.00.pth", "tokenizer.model"} <= set(names), opens
    assert all(n == 1 for n in opens.values()), opens
