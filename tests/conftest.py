from __future__ import annotations

from pathlib import Path

import pytest

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
