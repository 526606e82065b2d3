"""Meta-format checkpoints: ``params.json`` + ``consolidated.NN.pth``.

Meta saves a model-parallel checkpoint as one file per rank; each file holds every key, with the
partitioned matrices cut along the dimension that rank owned. Loading merges them back with a table
(``SHARD_DIMS``) and checks the result against the shapes ``params.json`` implies, so a wrong or
incomplete download fails here, with the file and the key named, instead of deep inside a matmul.

Shards are opened with ``torch.load(mmap=True)``: a single-shard checkpoint is returned as
file-backed tensors (the page cache holds the bytes, the process holds no second copy), and a
multi-shard one is concatenated key by key from those mappings.

Under model parallelism (N ranks, see model/parallel.py) each rank builds only its own slice of every split
tensor: the merged length L along the rank split dim is cut into N equal parts, and rank r assembles
[r*L/N, (r+1)*L/N) from the pieces of the M shards that overlap it. Any N that divides the heads works
with any M: N == M reads exactly shard r (a view of its mapping, no copy), N < M joins neighbouring
shards, N > M cuts a shard. Only the bytes a rank needs are read. Replicated tensors (the norms) come
from shard 00.

How N ranks split the embedding (``vocab_parallel_embedding``): along the vocabulary (Llama 3's
VocabParallelEmbedding) or along the embedding dim (Llama 2's ParallelEmbedding). Both are exact (an
embedding is a lookup); the choice only decides which bytes each rank reads and whether the lookup ends in
an all-reduce or an all-gather. Unless the caller says, it follows the checkpoint: a multi-shard one shows
its layout in its shard shapes, and a single-shard one (whose layout cannot be seen) is split by vocabulary
when vocab_size >= 128000 (Llama 3's 128256 tokens), along the embedding dim otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from llama_offload.model import parallel
from llama_offload.model.args import ModelArgs
from llama_offload.files.cleanup import deferred_signals, new_temp_dir, remove_tree
from llama_offload.model.transformer import Transformer, check_model_parallel_sizes
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.record import (  # noqa: F401  (find_shards, DROPPED_KEYS: re-exported)
    DROPPED_KEYS, CheckpointInfo, as_checkpoint, context_length, find_shards, fmt_bytes, open_shard,
)
from llama_offload.checkpoint.quant_load import (
    check_quantized_state_dict, dequantize_embeddings, quantize_state_dict, read_quantization, slice_for_rank,
    swap_quantized_modules,
)
from llama_offload.checkpoint.lora_merge import describe, merge_state_dict, model_parallel_lora_message, say
from llama_offload.model.lora import ModelShape, attach, check_shape
from llama_offload.checkpoint.adapter import load_adapter

# How a key is split across model-parallel shards:
#   int            concatenate along this dim;
#   tuple of ints  candidates, tried in order: the one that makes the merged shape equal the shape
#                  params.json implies wins (saving uses the first);
#   None           replicated: every shard holds the whole tensor, shard 00's copy is used.
ShardDim = Union[int, tuple[int, ...], None]

SHARD_DIMS: list[tuple[str, ShardDim]] = [
    # Llama 2 shards the embedding along dim 1 (ParallelEmbedding), Llama 3 along dim 0
    # (VocabParallelEmbedding); the shard shapes tell which one a checkpoint used.
    (r"^tok_embeddings\.weight$", (1, 0)),
    (r"^layers\.\d+\.attention\.w[qkv]\.weight$", 0),  # ColumnParallelLinear: output features
    (r"^layers\.\d+\.feed_forward\.w[13]\.weight$", 0),
    (r"^output\.weight$", 0),
    (r"^layers\.\d+\.attention\.wo\.weight$", 1),  # RowParallelLinear: input features
    (r"^layers\.\d+\.feed_forward\.w2\.weight$", 1),
    (r"^(layers\.\d+\.(attention_norm|ffn_norm)|norm)\.weight$", None),
]

# A single-shard checkpoint cannot show how its embedding was split; from this vocabulary size on it is
# taken to be a Llama 3 model, whose reference code splits the embedding by token.
VOCAB_PARALLEL_MIN_VOCAB = 128_000



def _shard_dim(key: str) -> ShardDim:
    for pattern, dim in SHARD_DIMS:
        if re.match(pattern, key):
            return dim
    # Every key of Transformer(args) must be in the table; a miss is a bug in the table, not in the file.
    raise AssertionError(f"SHARD_DIMS has no entry for {key!r}")


def _candidates(dim: ShardDim) -> tuple[int, ...]:
    if dim is None:
        return ()
    return dim if isinstance(dim, tuple) else (dim,)


def _log(show: bool, msg: str) -> None:
    if show:
        print(msg, file=sys.stderr, flush=True)


def expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """The state-dict shapes of the whole ``Transformer(args)``, computed on the meta device (no memory used).
    Always the whole model, also under model parallelism: checkpoints hold whole tensors."""
    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    return {k: v.shape for k, v in model.state_dict().items()}


def rank_split_dim(key: str, vocab_parallel_embedding: bool) -> Optional[int]:
    """The dim along which model parallelism cuts ``key`` at run time (the layers model/transformer.py builds); None:
    every rank holds all of it."""
    if re.match(r"^tok_embeddings\.weight$", key):
        return 0 if vocab_parallel_embedding else 1
    cands = _candidates(_shard_dim(key))
    return cands[0] if cands else None


def local_shapes(args: ModelArgs, world_size: int = 1, vocab_parallel_embedding: bool = False) -> dict[str, torch.Size]:
    """The state-dict shapes of one rank's part when the model is split over ``world_size`` ranks."""
    check_model_parallel_sizes(args, world_size)
    out = {}
    for key, shape in expected_shapes(args).items():
        d = rank_split_dim(key, vocab_parallel_embedding) if world_size > 1 else None
        out[key] = shape if d is None else torch.Size(s // world_size if i == d else s for i, s in enumerate(shape))
    return out


def _fmt_keys(keys: set[str] | list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _check_keys(shards: list[dict[str, torch.Tensor]], paths: list[Path], expected: dict[str, torch.Size]) -> None:
    first, name0 = shards[0], paths[0].name
    missing = set(expected) - set(first)
    if missing:
        raise RuntimeError(
            f"{paths[0]} lacks key(s) {_fmt_keys(missing)} that a model with these params.json has. "
            "The checkpoint is incomplete or belongs to a different model: re-download or re-convert it."
        )
    unexpected = set(first) - set(expected)
    if unexpected:
        raise RuntimeError(
            f"{paths[0]} has key(s) {_fmt_keys(unexpected)} that a model with these params.json does not have. "
            "The checkpoint is for another architecture, or params.json does not belong to it "
            "(check n_layers)."
        )
    for sd, path in zip(shards[1:], paths[1:]):
        if set(sd) != set(first):
            lacks, extra = set(first) - set(sd), set(sd) - set(first)
            parts = [f"lacks {_fmt_keys(lacks)}" if lacks else "", f"has extra {_fmt_keys(extra)}" if extra else ""]
            raise RuntimeError(
                f"{path} does not hold the same keys as {name0}: it {' and '.join(p for p in parts if p)}. "
                "All shards of one checkpoint hold the same keys: the shards come from different checkpoints, "
                "or this one is damaged. Re-download or re-convert it."
            )


def open_float_shards(paths: list[Path], args: ModelArgs, *, quantized: Callable[[str], Exception],
                      hint: str) -> tuple[list[dict[str, torch.Tensor]], dict[str, Optional[int]], torch.dtype]:
    """A 16-bit or fp32 checkpoint's shards, memory-mapped and checked (keys, shapes, split dims) for a tool that
    rewrites them shard by shard: (shards, each key's concat dim, the stored dtype). ``quantized`` makes the error
    for a quantized checkpoint from a description of it; ``hint`` ends the error for integer weights."""
    shards = [open_shard(p) for p in paths]  # memory-mapped: only the index is read
    scaled = sorted(k for k in shards[0] if k.endswith(".scales"))
    if scaled:
        raise quantized(f"{paths[0]} holds quantized tensors ({scaled[0]} and {len(scaled) - 1} more)")
    expected = expected_shapes(args)
    _check_keys(shards, paths, expected)
    cat_dims: dict[str, Optional[int]] = {}
    count_confirmed = False
    for key in expected:
        cat_dims[key] = _merge_dim(key, [sd[key] for sd in shards], paths, expected[key], count_confirmed)
        count_confirmed = count_confirmed or _shard_dim(key) is not None
    in_dtype = shards[0]["tok_embeddings.weight"].dtype
    if not in_dtype.is_floating_point:
        raise ValueError(f"{paths[0]} stores tok_embeddings.weight as {in_dtype}; expected a float16, bfloat16 or "
                         f"float32 checkpoint. {hint}")
    return shards, cat_dims, in_dtype


def _merge_dim(
    key: str, parts: list[torch.Tensor], paths: list[Path], want: torch.Size, count_confirmed: bool
) -> Optional[int]:
    """Check that the shards of ``key`` merge to ``want``; the dim they join along (None: shard 00 as is)."""
    n = len(parts)
    for t, path in zip(parts[1:], paths[1:]):
        if t.dtype != parts[0].dtype:
            raise RuntimeError(
                f"{path} stores {key!r} as {t.dtype}, {paths[0].name} as {parts[0].dtype}. "
                "All shards of one checkpoint share a dtype: they come from different conversions. "
                "Re-download or re-convert the checkpoint."
            )
        if t.shape != parts[0].shape:
            raise RuntimeError(
                f"{key!r} has shape {tuple(t.shape)} in {path} but {tuple(parts[0].shape)} in {paths[0].name}; "
                "model-parallel shards are cut into equal parts. The shards come from different checkpoints."
            )
    shard_shape = parts[0].shape
    cands = _candidates(_shard_dim(key))

    if n == 1 or not cands:
        merged_shape, cat_dim = shard_shape, None
    else:
        cat_dim = cands[0]
        for d in cands:
            if d < len(shard_shape) and torch.Size(s * n if i == d else s for i, s in enumerate(shard_shape)) == want:
                cat_dim = d
                break
        if cat_dim >= len(shard_shape):
            merged_shape = shard_shape  # wrong rank: reported below
        else:
            merged_shape = torch.Size(s * n if i == cat_dim else s for i, s in enumerate(shard_shape))

    if merged_shape != want:
        files = paths[0].name if n == 1 else f"{paths[0].name}..{paths[-1].name}"
        msg = (
            f"{key!r} merged from {files} has shape {tuple(merged_shape)}, but params.json implies "
            f"{tuple(want)}."
        )
        # A shard-count problem shows as the split dim being a whole fraction of the full size; once a
        # split key has merged to its full shape the count is known to be right, so blame params.json.
        for d in cands:
            if (
                not count_confirmed
                and d < len(shard_shape)
                and len(shard_shape) == len(want)
                and all(s == w for i, (s, w) in enumerate(zip(shard_shape, want)) if i != d)
                and want[d] % shard_shape[d] == 0
                and want[d] // shard_shape[d] != n
            ):
                need = want[d] // shard_shape[d]
                msg += (
                    f" Found {n} shard(s); a complete checkpoint for these params needs {need} "
                    f"(consolidated.00.pth .. consolidated.{need - 1:02d}.pth): re-download the missing shards."
                )
                break
        else:
            msg += " params.json does not match the weights: use the params.json that came with this checkpoint."
        raise RuntimeError(msg)
    return cat_dim


def _rank_part(
    key: str, parts: list[torch.Tensor], cat_dim: Optional[int], split_dim: Optional[int], rank: int, world_size: int
) -> torch.Tensor:
    """Rank ``rank``'s 1/world_size of cat(parts, cat_dim) along ``split_dim``, cut from the parts it overlaps.

    Pieces are views of the mmap'd shards; bytes are copied only where pieces are joined, or where a cut
    along a later dim leaves a strided view, so a rank reads what it needs and no more.
    """
    if split_dim is None:
        return parts[0]  # replicated: every shard holds it, shard 00's copy is used
    if cat_dim is None:  # a single shard
        cat_dim, parts = split_dim, parts[:1]
    if cat_dim == split_dim:
        size = parts[0].shape[split_dim]  # each shard's length along the split
        total = size * len(parts)
    else:
        size = total = parts[0].shape[split_dim]  # every shard spans the whole split dim
    if total % world_size:
        raise ValueError(
            f"Cannot split {key!r} ({total} along dim {split_dim}) evenly over {world_size} ranks. "
            "Run torchrun --nproc_per_node with a number that divides the model's heads."
        )
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    pieces = []
    for j, t in enumerate(parts):
        start = j * size if cat_dim == split_dim else 0  # where shard j begins along the split dim
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            pieces.append(t.narrow(split_dim, a - start, b - a))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=cat_dim)
    return out if out.is_contiguous() else out.contiguous()


def load_state_dict(
    ckpt_dir: CheckpointInfo | str | Path,
    args: ModelArgs,
    *,
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    vocab_parallel_embedding: Optional[bool] = None,
    only: Optional[Callable[[str], bool]] = None,
) -> dict[str, torch.Tensor]:
    """Load, merge and validate the shards of ``ckpt_dir`` against the shapes ``args`` implies; with ``only``,
    just the keys it accepts (a pipeline stage's: the other tensors' bytes are never read).

    Tensors keep the checkpoint's dtype. With one shard they are mmap-backed views of the file.
    With ``world_size`` N > 1, only rank ``rank``'s part of each split tensor is built (see the module
    docstring; ``vocab_parallel_embedding`` None follows the checkpoint's layout). Needs no process group.
    """
    return _load_state_dict(ckpt_dir, args, show_progress, rank, world_size, vocab_parallel_embedding, only)[0]


def _load_state_dict(
    ckpt_dir: CheckpointInfo | str | Path,
    args: ModelArgs,
    show_progress: bool,
    rank: int,
    world_size: int,
    vocab_parallel_embedding: Optional[bool],
    only: Optional[Callable[[str], bool]] = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """``load_state_dict``, and the embedding layout it used. ``only``: merge just the keys it accepts (a pipeline
    stage's); the others are checked from the shards' headers and never read."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, found {world_size!r}.")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), found {rank!r}.")
    check_model_parallel_sizes(args, world_size)  # before reading gigabytes
    start = time.perf_counter()
    ckpt = as_checkpoint(ckpt_dir)
    paths = ckpt.shards
    expected = expected_shapes(args)

    shards = []
    for i, path in enumerate(paths):
        _log(show_progress, f"loading {path.name} ({i + 1}/{len(paths)}, {fmt_bytes(path.stat().st_size)})")
        shards.append(ckpt.take_shard(len(shards)))
    _check_keys(shards, paths, expected)

    # Validate every key's shards and find how they join; the embedding's join shows the checkpoint's layout.
    count_confirmed = False  # has a split key merged to its full shape with this many shards?
    cat_dims: dict[str, Optional[int]] = {}
    for key in expected:  # model order, so the result iterates like model.state_dict()
        cat_dims[key] = _merge_dim(key, [sd[key] for sd in shards], paths, expected[key], count_confirmed)
        count_confirmed = count_confirmed or _shard_dim(key) is not None
    if vocab_parallel_embedding is None:
        embedding_dim = cat_dims["tok_embeddings.weight"]
        vocab_parallel_embedding = (embedding_dim == 0 if embedding_dim is not None
                                    else args.vocab_size >= VOCAB_PARALLEL_MIN_VOCAB)
    local = local_shapes(args, world_size, vocab_parallel_embedding) if world_size > 1 else expected

    merged: dict[str, torch.Tensor] = {}
    for key in expected:
        if only is not None and not only(key):
            for sd in shards:
                del sd[key]
            continue
        parts = [sd[key] for sd in shards]
        if world_size == 1:
            merged[key] = parts[0] if cat_dims[key] is None else torch.cat(parts, dim=cat_dims[key])
        else:
            merged[key] = _rank_part(key, parts, cat_dims[key], rank_split_dim(key, vocab_parallel_embedding),
                                     rank, world_size)
            assert merged[key].shape == local[key], (key, merged[key].shape, local[key])
        # Release each shard's reference as soon as it is merged, so the mappings can go early.
        for sd in shards:
            del sd[key]

    nbytes = sum(t.numel() * t.element_size() for t in merged.values())
    what = f"{len(merged)} tensors" if world_size == 1 else f"rank {rank}'s part of {len(merged)} tensors"
    _log(show_progress, f"loaded {what}, {fmt_bytes(nbytes)} in {time.perf_counter() - start:.2f} s")
    return merged, vocab_parallel_embedding


def load_model(
    ckpt_dir: str | Path,
    *,
    max_seq_len: int,
    max_batch_size: int,
    dtype: Optional[torch.dtype] = None,
    vocab_size: Optional[int] = None,
    show_progress: bool = True,
    model_parallel_size: Optional[int] = None,
    vocab_parallel_embedding: Optional[bool] = None,
    quantize: Optional[QuantSpec] = None,
    quantize_device: Optional[torch.device | str] = None,
    lora: Optional[object] = None,
) -> Transformer:
    """Build a CPU ``Transformer`` from a Meta checkpoint directory, in eval mode, caches not set up.

    ``vocab_size`` is the tokenizer's: it fills params.json's ``-1`` and is checked against any other value.
    ``dtype`` converts the weights; ``None`` keeps the checkpoint's (file-backed when there is one shard).
    ``model_parallel_size`` None follows model/parallel.py: under torchrun with N > 1 processes this rank's part
    of the model (FairScale's parallel layers), else the whole model; 1 loads the whole model regardless.
    ``vocab_parallel_embedding`` None: the embedding layout the checkpoint shows (see the module docstring).
    A quantized checkpoint (quant_load.py) loads its codes as they are; ``quantize`` quantizes a 16-bit one as
    it loads, on ``quantize_device`` (default the CPU; the codes are the same on a GPU, only faster). Under model
    parallelism an int8 embedding and head are dequantized (they are split as plain matrices); every rank keeps
    whole groups of the blocks' matrices.
    ``lora`` (a ``model.lora.LoRAAdapter``, or its directory): merged into the 16-bit weights as they are loaded,
    rounded once to the checkpoint's dtype, before ``quantize`` and ``dtype`` (checkpoint/lora_merge.py); a quantized
    checkpoint keeps its codes and gets the adapter attached beside them (model/lora.py); refused under model
    parallelism.
    """
    ckpt = as_checkpoint(ckpt_dir)
    ckpt_dir = ckpt.path
    args = ckpt.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if args.vocab_size == -1:
        if vocab_size is None:
            raise ValueError(
                f"{ckpt_dir / 'params.json'} has vocab_size -1, which means 'take it from the tokenizer', "
                "but no tokenizer vocab_size was given. Pass vocab_size=tokenizer.n_words."
            )
        args = dataclasses.replace(args, vocab_size=vocab_size)
    elif vocab_size is not None and vocab_size != args.vocab_size:
        raise ValueError(
            f"{ckpt_dir / 'params.json'} has vocab_size {args.vocab_size} but the tokenizer has {vocab_size} "
            "tokens. The tokenizer does not belong to this checkpoint: use the tokenizer.model shipped with it."
        )

    n = parallel.model_parallel_world_size() if model_parallel_size is None else model_parallel_size
    rank = parallel.model_parallel_rank() if n > 1 else 0
    stored_quantization = read_quantization(ckpt)
    if stored_quantization is not None and quantize is not None:
        raise ValueError(already_quantized_message(ckpt_dir, quantize))
    if lora is not None:
        if n > 1:
            raise ValueError(model_parallel_lora_message())
        adapter = lora if isinstance(lora, torch.nn.Module) else load_adapter(lora, "cpu")  # type: ignore[arg-type]
        check_shape(adapter.config.shape, ModelShape.of(args), "the LoRA adapter")
    if stored_quantization is not None:
        state_dict, vocab_parallel = _load_quantized(ckpt, args, show_progress, rank, n, vocab_parallel_embedding)
    else:
        state_dict, vocab_parallel = _load_state_dict(ckpt, args, show_progress, rank, n, vocab_parallel_embedding)
        if lora is not None:  # into the weights as stored: what llama-offload merge writes, then quantized
            state_dict = merge_state_dict(state_dict, adapter, show_progress=show_progress)
        if quantize is not None:
            state_dict = quantize_state_dict(state_dict, args, quantize if n == 1 else _plain_embeddings(quantize),
                                             show_progress=show_progress, device=quantize_device)
            if torch.device(quantize_device or "cpu").type == "cuda":
                torch.cuda.empty_cache()  # the quantizer's temporaries: back to the budget the plan hands out
    if dtype is not None:
        # Codes and their scales stay as stored: only the 16/32-bit weights change dtype.
        state_dict = {k: v if v.dtype == dtype or not v.is_floating_point() or k.endswith((".scales", ".mins"))
                      else v.to(dtype) for k, v in state_dict.items()}
    model_dtype = state_dict["norm.weight"].dtype

    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=n, vocab_parallel_embedding=vocab_parallel)
    swap_quantized_modules(model, state_dict, model_dtype)
    if n > 1:
        # The slicing table and the layers must agree on every rank-local shape.
        built = {k: v.shape for k, v in model.state_dict().items()}
        wrong = {k: (tuple(v.shape), tuple(built[k])) for k, v in state_dict.items() if built.get(k) != v.shape}
        assert not wrong and set(built) == set(state_dict), f"rank {rank}: sliced vs built shapes {wrong}"
    model.load_state_dict(state_dict, assign=True, strict=True)
    if lora is not None and stored_quantization is not None:
        # Codes cannot take a dense update: the adapter runs beside them (QLoRA's layout), in the model's dtype;
        # offload() keeps its pairs resident on the device.
        attach(model, adapter.to(model_dtype))
        if show_progress:
            say(f"attached the LoRA adapter beside the quantized matrices ({describe(adapter.config)})")
    # Inference only: no gradients means no autograd bookkeeping when blocks run outside inference_mode.
    model.requires_grad_(False)
    return model.eval()


# Bits a weight of each GGUF block type takes (codes and the block's scale / minimum), per ggml's layouts.
# Only the types kept in this package's layout with fp16 scales (quant.py); the K-quants' fp32 scales differ.
GGUF_BITS = {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0, "F32": 32.0}


def describe_quantization_record(record: Any) -> str:
    """A llama_offload.json "quantization" record in a few words, for messages and ``info``: "int4 in groups of 64,
    embedding and head 16-bit", or a GGUF's kept blocks "Q4_1 blocks (5.0 bits/weight) in 210 matrices, Q8_0
    (8.5 bits/weight) in 1 (the token embedding)" instead of the record itself (one entry per matrix)."""
    if not isinstance(record, dict):
        return f"an unreadable record ({type(record).__name__})"
    types = record.get("tensor_types")
    if isinstance(types, dict) and types:
        counts: dict[str, int] = {}
        for kind in types.values():
            counts[str(kind)] = counts.get(str(kind), 0) + 1
        parts = []
        for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            bits = f" ({GGUF_BITS[kind]:g} bits/weight)" if kind in GGUF_BITS else ""
            names = [str(k) for k, v in types.items() if str(v) == kind]
            which = f" ({', '.join(names)})" if not any(k.startswith("layers.") for k in names) else ""
            parts.append(f"{kind}{bits} in {n} matri{'x' if n == 1 else 'ces'}{which}")
        return "GGUF blocks kept as stored: " + ", ".join(parts)
    bits = record.get("bits")
    if bits == 4:
        return (f"int4 in groups of {record.get('group_size', '?')} (about {4 + 32 / int(record.get('group_size') or 64):g} "
                f"bits/weight with its fp16 scales and offsets), embedding and head {record.get('embeddings', '16-bit')}")
    if bits == 8:
        return f"int8 per output channel (about 8 bits/weight), embedding and head {record.get('embeddings', '16-bit')}"
    return f"an unknown format (bits {bits!r})"


def already_quantized_message(ckpt_dir: str | Path, spec: QuantSpec) -> str:
    return (f"--quantize {'int8' if spec.bits == 8 else 'int4'} was given, but {ckpt_dir} is already quantized "
            "(its llama_offload.json records a quantization). Drop --quantize to run it as it is, or quantize the "
            "16-bit original instead.")


def _plain_embeddings(spec: QuantSpec) -> QuantSpec:
    return dataclasses.replace(spec, embeddings=False)


def _load_quantized(ckpt: CheckpointInfo, args: ModelArgs, show_progress: bool, rank: int, world_size: int,
                    vocab_parallel_embedding: Optional[bool]) -> tuple[dict[str, torch.Tensor], bool]:
    """A quantized checkpoint's one shard, checked, and this rank's part of it."""
    check_model_parallel_sizes(args, world_size)
    start = time.perf_counter()
    paths, ckpt_dir = ckpt.shards, ckpt.path
    if len(paths) != 1:
        raise RuntimeError(f"{ckpt_dir} is quantized but has {len(paths)} shards; a quantized checkpoint is one "
                           "consolidated.00.pth. Re-quantize the original with llama-offload quantize.")
    _log(show_progress, f"loading {paths[0].name} (quantized, {fmt_bytes(paths[0].stat().st_size)})")
    state_dict = ckpt.take_shard(0)
    check_quantized_state_dict(state_dict, expected_shapes(args), str(paths[0]))
    vocab_parallel = (args.vocab_size >= VOCAB_PARALLEL_MIN_VOCAB if vocab_parallel_embedding is None
                      else vocab_parallel_embedding)
    if world_size > 1:
        norm_dtype = state_dict["norm.weight"].dtype
        state_dict = dequantize_embeddings(state_dict, norm_dtype)
        dims = {k: rank_split_dim(k, vocab_parallel) for k in expected_shapes(args)}
        state_dict = slice_for_rank(state_dict, dims, rank, world_size, str(paths[0]))
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    _log(show_progress, f"loaded {len(state_dict)} tensors, {fmt_bytes(nbytes)} in {time.perf_counter() - start:.2f} s")
    return state_dict, vocab_parallel


def compact_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, owning exactly its bytes: ready for torch.save, which writes a view's whole storage."""
    # Copy unless the tensor already owns exactly its bytes.
    t = t.detach().cpu()
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match Transformer(args): missing {_fmt_keys(missing) or 'nothing'}, "
            f"unexpected {_fmt_keys(unexpected) or 'nothing'}. Pass Meta-named weights for these args."
        )
    for key, want in expected.items():
        if state_dict[key].shape != want:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(state_dict[key].shape)}, args imply {tuple(want)}."
            )


def save_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, ckpt_dir: str | Path, *, num_shards: int = 1) -> None:
    """Write ``state_dict`` as a Meta checkpoint of ``num_shards`` model-parallel shards plus params.json.

    Never overwrites: a directory that already holds params.json or shards is refused. The files are
    written to a temporary sibling first, so an interrupted save never leaves a complete-looking checkpoint.
    """
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards <= 0:
        raise ValueError(f"num_shards must be a positive integer, found {num_shards!r}.")
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise FileExistsError(f"{ckpt_dir} exists and is a file; choose a directory path for the checkpoint.")
    if ckpt_dir.is_dir():
        taken = sorted(p.name for p in ckpt_dir.iterdir() if p.name == "params.json" or p.match("consolidated.*.pth"))
        if taken:
            raise FileExistsError(
                f"{ckpt_dir} already holds {taken}; refusing to overwrite a checkpoint. "
                "Choose another directory or delete this one first."
            )

    expected = expected_shapes(args)
    _check_state_dict(state_dict, expected)

    # Pick each key's split dim once, and check divisibility before writing anything.
    split: dict[str, Optional[int]] = {}
    for key, shape in expected.items():
        cands = _candidates(_shard_dim(key))
        d = cands[0] if cands and num_shards > 1 else None
        if d is not None and shape[d] % num_shards:
            raise ValueError(
                f"Cannot split {key!r} of shape {tuple(shape)} into {num_shards} shards along dim {d}: "
                f"{shape[d]} is not divisible by {num_shards}. Choose a num_shards that divides it."
            )
        split[key] = d

    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named after this process: a kill's leftover is removed by the next run (cleanup.py).
    tmp = new_temp_dir(ckpt_dir.parent, ckpt_dir.name)
    try:
        for i in range(num_shards):
            shard = {}
            for key, t in state_dict.items():
                d = split[key]
                shard[key] = compact_tensor(t if d is None else t.chunk(num_shards, dim=d)[i])
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
            del shard
        (tmp / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")

        with deferred_signals():  # a Ctrl-C or SIGTERM waits for the files to be in place
            if not ckpt_dir.exists() or not any(ckpt_dir.iterdir()):
                # rename(2) replaces an empty directory atomically; the checkpoint appears all at once.
                os.replace(tmp, ckpt_dir)
            else:
                # The directory holds other files (a tokenizer, a README): move ours in, params.json last,
                # since loading starts from params.json.
                for f in sorted(tmp.iterdir(), key=lambda p: p.name == "params.json"):
                    os.replace(f, ckpt_dir / f.name)
                tmp.rmdir()
    finally:
        remove_tree(tmp)  # gone already when the files were moved into place


def random_state_dict(
    args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Meta-named CPU weights drawn from N(0, std); norm weights from 1 + N(0, std) so they are not all ones.

    Each tensor is drawn in fp32 and cast on its own, so peak memory is the result plus one fp32 tensor
    (a 7B-shaped fp16 model needs ~13.5 GB, not the 27 GB a whole fp32 model would). ``device="cuda"``
    draws them on the GPU, which is many times faster for real shapes (the numbers differ from the CPU's).
    """
    gen = torch.Generator(device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(args).items():
        t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        if key == "norm.weight" or key.endswith("_norm.weight"):
            t += 1.0
        out[key] = t.to(dtype).cpu()
        del t
    return out


__all__ = [
    "SHARD_DIMS",
    "DROPPED_KEYS",
    "VOCAB_PARALLEL_MIN_VOCAB",
    "expected_shapes",
    "local_shapes",
    "rank_split_dim",
    "find_shards",
    "load_state_dict",
    "load_model",
    "save_checkpoint",
    "random_state_dict",
]


# --- checks that need no weights: file sizes and the recorded context ------------------------------------

def expected_shard_elements(args: ModelArgs, num_shards: int) -> int:
    """Elements one of ``num_shards`` shards holds for ``args`` (vocab_size filled): its part of every split
    tensor, the whole of every replicated one."""
    total = 0
    for key, shape in expected_shapes(args).items():
        n = shape.numel()
        total += n if _shard_dim(key) is None else n // num_shards
    return total


def _shard_data_bytes(ckpt: CheckpointInfo, index: int) -> int:
    """The tensor bytes shard ``index`` holds, from its memory-mapped index (no weight is read; the mapping is the
    one the loader reads from next). A file torch cannot open is examined by its zip directory, to say why."""
    path = ckpt.shards[index]
    try:
        state_dict = ckpt.shard(index)
    except RuntimeError:
        _zip_problem(path)
        raise
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_dict.values()}
    return sum(storages.values())


def _zip_problem(path: Path) -> None:
    """Raise what is wrong with a shard's zip directory, if anything is (a truncated download, mostly)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(
            f"Could not read shard {path} ({fmt_bytes(size)}): it is not a complete torch zip checkpoint ({e}). "
            "The file is truncated or corrupt: re-download or re-convert it."
        ) from None
    if any(i.header_offset + i.compress_size > size for i in infos):
        raise ValueError(f"Could not read shard {path} ({fmt_bytes(size)}): its zip directory points past its end. "
                         "The file is truncated: re-download or re-convert it.")


def check_shard_sizes(ckpt_dir: CheckpointInfo | str | Path, args: ModelArgs) -> int:
    """Compare the tensor bytes each shard holds (from its memory-mapped index, not its weights) with what
    params.json implies; return the bytes per element it was stored with (2: float16 or bfloat16, 4:
    float32). A truncated download, a wrong params.json or a file from another model is refused, sizes named."""
    ckpt = as_checkpoint(ckpt_dir)
    paths = ckpt.shards
    elements = expected_shard_elements(args, len(paths))
    slack = 64 * 1024 + elements // 100  # keys the loader drops (Llama 1/2's rope.freqs)
    found: Optional[int] = None
    for index, path in enumerate(paths):
        data = _shard_data_bytes(ckpt, index)
        fits = [b for b in (2, 4) if elements * b <= data <= elements * b + slack]
        if not fits:
            raise ValueError(
                f"{path} holds {fmt_bytes(data)} of tensors, but params.json implies {elements:,} weights per "
                f"shard: {fmt_bytes(elements * 2)} in float16/bfloat16 or {fmt_bytes(elements * 4)} in float32. "
                "The file is truncated, or params.json does not belong to it: re-download or re-convert it."
            )
        if found is not None and fits[0] != found:
            raise ValueError(f"{path} holds {fits[0]}-byte weights, {paths[0].name} {found}-byte ones: the shards "
                             "come from different conversions. Re-download or re-convert the checkpoint.")
        found = fits[0]
    assert found is not None
    return found


def checkpoint_context_length(ckpt_dir: CheckpointInfo | str | Path, args: ModelArgs) -> tuple[Optional[int], str]:
    """The context length the model was trained for and where that comes from (record.context_length)."""
    return context_length(as_checkpoint(ckpt_dir), args)


__all__ += ["check_shard_sizes", "checkpoint_context_length", "compact_tensor", "describe_quantization_record",
            "expected_shard_elements"]
