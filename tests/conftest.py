from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llama_offload.args import ModelArgs
from llama_offload.checkpoint import random_state_dict, save_checkpoint
from llama_offload.tokenizer import BUNDLED_CORPUS_PATH, Tokenizer, load_tokenizer, train_sentencepiece


# --- tokenizer fixtures -------------------------------------------------------
# Training takes well under a second, but once per session is enough: every test
# only reads the model.


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("sp_tokenizer")
    return train_sentencepiece(BUNDLED_CORPUS_PATH, out_dir / "tokenizer", 512)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(sp_tokenizer_path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_path: Path) -> Path:
    """A tiny random checkpoint in Meta's download layout: the tokenizer beside the model folder."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(sp_tokenizer_path, root / "tokenizer.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    save_checkpoint(random_state_dict(args, seed=0), args, root / "tiny")
    return root / "tiny"
