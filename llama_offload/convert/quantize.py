"""``llama-offload quantize``: a Meta checkpoint (16-bit or fp32, any number of shards) to a quantized one.

The seven matrices of every block (``quant.LINEAR_NAMES``) are quantized with ``quant.quantize_tensor``: int8
per output channel, or int4 in groups of 32, 64 or 128 with fp16 scales and minimums. The token embedding and
the output head become int8 per channel with ``spec.embeddings``, else they keep the checkpoint's dtype, as
the norms always do. The result is one ``consolidated.00.pth`` in quant.py's layout (``L.weight`` int8 or
uint8, ``L.scales``, ``L.mins``), the input's ``params.json``, its tokenizer, and ``llama_offload.json``
carrying the input's record over with ``"quantization": spec.to_json()`` added.

Shards are memory-mapped and merged one tensor at a time (checkpoint/load.py's table and checks), and a matrix is
quantized in row chunks, so the process holds the quantized output, one merged 16-bit tensor and one chunk in
fp32, never the whole model in fp32. Everything that can be checked without quantizing (the input, the group
size against every matrix, the output directory, the disk space) is checked before the first matrix is read;
the output appears all at once, or not at all (checkpoint.output_dir).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.model import quant
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import (
    compact_tensor, describe_quantization_record, expected_shapes, find_shards, open_float_shards,
)
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta, write_derived_meta
from llama_offload.checkpoint.output_dir import check_out_dir, is_inside, output_dir
from llama_offload.model.dtypes import dtype_name
from llama_offload.convert.default_model import resolve_paths
from llama_offload.model.quant import EMBEDDING_NAMES, GROUP_SIZES, LINEAR_NAMES, QuantSpec
from llama_offload.text.tokenizer import check_vocab_size, load_tokenizer, tokenizer_copy_files

__all__ = ["estimated_bytes", "quantize_checkpoint", "quantized_keys", "spec_from_flags"]


def _say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def _fmt_mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def spec_from_flags(bits: Any, group_size: Any = None, embeddings: Any = False) -> QuantSpec:
    """The ``QuantSpec`` of ``--bits 8|4 [--group_size G] [--quantize_embeddings]``; one-line errors."""
    names = {"8": 8, "int8": 8, "4": 4, "int4": 4}
    value = None if bits is None or isinstance(bits, bool) else names.get(str(bits).strip().lower())
    if value is None:
        raise ValueError(f"--bits must be 8 or 4, found {'nothing' if bits is None else repr(bits)}. "
                         "Pass --bits 8 (int8 per output channel) or --bits 4 (int4 in groups, default 64).")
    return _check_spec(QuantSpec(value, group_size, bool(embeddings)))


def _check_spec(spec: QuantSpec) -> QuantSpec:
    """The spec with int4's default group size filled in; refused when the quantizer does not write it."""
    if spec.bits not in (8, 4):
        raise ValueError(f"--bits must be 8 or 4, found {spec.bits!r}.")
    if spec.bits == 8:
        if spec.group_size is not None:
            raise ValueError(f"--group_size applies to --bits 4 only (int8 is scaled per output channel); found "
                             f"--group_size {spec.group_size!r} with --bits 8. Drop --group_size.")
        return spec
    size = quant.DEFAULT_GROUP_SIZE if spec.group_size is None else spec.group_size
    if isinstance(size, bool) or size not in GROUP_SIZES:
        raise ValueError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))} for --bits 4, found "
                         f"{spec.group_size!r}.")
    return dataclasses.replace(spec, group_size=int(size))


def quantized_keys(args: ModelArgs, spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """The matrices ``spec`` quantizes (``L.weight`` keys), with their (out, in) shapes."""
    keys = {f"layers.{i}.{name}.weight" for i in range(args.n_layers) for name in LINEAR_NAMES}
    if spec.embeddings:
        keys |= {f"{name}.weight" for name in EMBEDDING_NAMES}
    return {k: (int(s[0]), int(s[1])) for k, s in expected_shapes(args).items() if k in keys}


def _quantized_nbytes(shape: tuple[int, int], bits: int, group_size: Optional[int]) -> int:
    rows, cols = shape
    if bits == 8:  # int8 codes, one fp16 scale a row
        return rows * cols + rows * 2
    return rows * cols // 2 + 2 * rows * (cols // group_size) * 2  # nibbles, fp16 scale and min per group


def estimated_bytes(args: ModelArgs, spec: QuantSpec, itemsize: int) -> int:
    """The tensor bytes of the quantized checkpoint (fp16 scales; fp32 only where fp16 would overflow)."""
    spec = _check_spec(spec)
    linear = set(quantized_keys(args, dataclasses.replace(spec, embeddings=False)))
    total = 0
    for key, shape in expected_shapes(args).items():
        if key in linear:
            total += _quantized_nbytes((shape[0], shape[1]), spec.bits, spec.group_size)
        elif spec.embeddings and key in {f"{n}.weight" for n in EMBEDDING_NAMES}:
            total += _quantized_nbytes((shape[0], shape[1]), 8, None)
        else:
            total += shape.numel() * itemsize
    return total


class _Progress:
    """One line on stderr, rewritten in place (``\\r``) on a terminal; otherwise a line at each
    10% that comes 5 s or more after the last one."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.nbytes = total, 0, 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.decile = 0

    def line(self) -> str:
        return (f"llama_offload: quantizing: {self.done}/{self.total} tensors, {self.nbytes / 1e6:.1f} MB out, "
                f"{time.perf_counter() - self.start:.1f} s")

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.tty:
            if now - self.last >= 0.1 or self.done == self.total:
                self.last = now
                print(f"\r{self.line()}", end="", file=sys.stderr, flush=True)
        elif self.done * 10 // self.total > self.decile and now - self.last >= 5:  # a log: quiet when quick
            self.decile, self.last = self.done * 10 // self.total, now
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr, flush=True)


def _already_quantized(where: str) -> ValueError:
    return ValueError(
        f"{where}: this checkpoint is already quantized. Expected a 16-bit (or float32) checkpoint; quantizing "
        "quantized weights again only adds error. Quantize the 16-bit original instead."
    )


def quantize_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, spec: QuantSpec, *,
                        tokenizer_path: Optional[str | Path] = None, force: bool = False) -> Path:
    """Write a quantized copy of the Meta checkpoint ``ckpt_dir`` to ``out_dir``; return ``out_dir``.

    ``spec``: bits 8 or 4 for the blocks' matrices, int4's group size (default 64), and whether the embedding
    and output head become int8 too. ``tokenizer_path`` None: the tokenizer the rest of the package finds
    (``llama_offload.json``'s, ``tokenizer.model`` or ``tokenizer.json`` in ``ckpt_dir``, ``tokenizer.model``
    beside it). ``force`` replaces an existing ``out_dir`` holding a checkpoint this tool wrote, as ``convert``
    does. Raises ValueError, OSError or RuntimeError with a one-line explanation before any matrix is read.
    """
    start = time.perf_counter()
    spec = _check_spec(spec)
    ckpt = Path(ckpt_dir).expanduser()
    out = Path(out_dir).expanduser()

    # --- the input ---------------------------------------------------------------------------------------
    paths = find_shards(ckpt)  # names the directory and explains the layout when it is missing or empty
    params_path = ckpt / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: a Meta checkpoint directory holds params.json next to "
                                "its consolidated.NN.pth shards. Restore it from the model's download.")
    if out.absolute() == ckpt.absolute() or is_inside(out, ckpt):
        raise ValueError(f"--out {out} is {'the' if out.resolve() == ckpt.resolve() else 'inside the'} checkpoint "
                         f"being quantized ({ckpt}); the quantized checkpoint is a directory of its own. Choose "
                         f"an --out outside it, e.g. {ckpt.name}-{spec.name.replace(' ', '-')} beside it.")
    meta = read_checkpoint_meta(ckpt)
    if "quantization" in meta:
        raise _already_quantized(f"{ckpt / META_FILENAME} records a quantization, "
                                 f"{describe_quantization_record(meta['quantization'])}")
    args = ModelArgs.from_json(params_path)
    _, tok = resolve_paths(ckpt, tokenizer_path)
    tokenizer = load_tokenizer(tok)
    if args.vocab_size == -1:  # Meta's "take it from the tokenizer"
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    else:
        check_vocab_size(tokenizer, args.vocab_size, source=str(params_path))
    shapes = quantized_keys(args, spec)
    try:
        spec.check_shapes({k: s for k, s in shapes.items() if k.split(".")[0] not in EMBEDDING_NAMES})
    except ValueError as e:  # quant.py names the run commands' flag
        msg = str(e)
        msg = (msg.replace("none (use --quantize int8).", "none: use --bits 8.") if "--quantize int8" in msg
               else f"{msg} Pass one of them with --group_size, or use --bits 8.")
        raise ValueError(msg) from None

    expected = expected_shapes(args)
    shards, cat_dims, in_dtype = open_float_shards(paths, args, quantized=_already_quantized,
                                                   hint="Quantize the 16-bit original.")

    # --- the output: checked before any matrix is read --------------------------------------------------
    out_name, tok_files = tokenizer_copy_files(tok)
    extra_bytes = sum(p.stat().st_size for p in tok_files.values()) + params_path.stat().st_size + (64 << 10)
    needed = estimated_bytes(args, spec, in_dtype.itemsize) + extra_bytes
    sources = [ckpt, *tok_files.values()]
    check_out_dir(out, force=force, sources=sources, needed_bytes=needed)

    in_bytes = sum(p.stat().st_size for p in paths)
    _say(f"quantizing {ckpt} ({len(paths)} shard(s), {dtype_name(in_dtype)}, {args.n_layers} layers, dim "
         f"{args.dim}) to {spec.name}, embedding and head {'int8' if spec.embeddings else dtype_name(in_dtype)}")
    with output_dir(out, force=force, sources=sources, needed_bytes=needed) as tmp:
        state: dict[str, torch.Tensor] = {}
        progress = _Progress(len(expected))
        weights = {"blocks": 0, "all": 0}
        qbytes = {"blocks": 0, "all": 0}
        try:
            for key in expected:
                parts = [sd[key] for sd in shards]
                t = parts[0] if cat_dims[key] is None else torch.cat(parts, dim=cat_dims[key])
                for sd in shards:  # release the shards' references as we go
                    del sd[key]
                n = t.numel()
                if key in shapes:
                    is_emb = key.split(".")[0] in EMBEDDING_NAMES
                    q = quant.quantize_matrix(t, 8, None) if is_emb else quant.quantize_matrix(t, spec.bits, spec.group_size)
                    prefix = key.removesuffix(".weight")
                    nbytes = quant.quantized_nbytes(q)
                    for name, v in q.items():
                        state[f"{prefix}.{name}"] = compact_tensor(v)
                    if not is_emb:
                        weights["blocks"] += n
                        qbytes["blocks"] += nbytes
                else:
                    state[key] = compact_tensor(t)
                    nbytes = n * t.element_size()
                del t
                weights["all"] += n
                qbytes["all"] += nbytes
                progress.update(nbytes)
        finally:
            progress.close()
        shards.clear()
        _say(f"saving consolidated.00.pth ({_fmt_mb(qbytes['all'])})")
        torch.save(state, tmp / "consolidated.00.pth")
        state.clear()
        shutil.copyfile(params_path, tmp / "params.json")
        for name, src in tok_files.items():
            shutil.copyfile(src, tmp / name)
        write_derived_meta(tmp, meta, source_dir=ckpt, num_shards=len(paths), dtype=dtype_name(in_dtype),
                           tokenizer=out_name, quantization=spec.to_json())
        out_bytes = (tmp / "consolidated.00.pth").stat().st_size

    bpw_blocks = 8 * qbytes["blocks"] / weights["blocks"] if weights["blocks"] else float("nan")
    bpw_all = 8 * qbytes["all"] / weights["all"] if weights["all"] else float("nan")
    _say(f"{spec.name}: {bpw_blocks:.2f} bits per weight in the blocks' matrices, {bpw_all:.2f} over the whole "
         f"checkpoint (embedding and head {'int8' if spec.embeddings else dtype_name(in_dtype)}); weights "
         f"{_fmt_mb(in_bytes)} -> {_fmt_mb(out_bytes)} ({100 * out_bytes / max(in_bytes, 1):.0f}%)")
    _say(f"wrote {out} in {time.perf_counter() - start:.1f} s (tokenizer: {out_name})")
    return out
