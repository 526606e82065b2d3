"""A LoRA adapter merged into a Meta checkpoint's weights: at load time (``--lora``) or once, on disk
(``llama-offload merge``).

Both add ``scale * B @ A`` (computed in fp32 on the CPU) to each target matrix and round the sum once to the
checkpoint's own dtype, as ``model.lora.merge_into`` does to a model: so a run with ``--lora DIR`` computes with
exactly the weights that ``llama-offload merge`` writes, and the merged checkpoint keeps the input's dtype.
``--lora`` merges right after the 16-bit weights are read, before ``--quantize`` and before offloading.

Refused, with what to do instead: a quantized checkpoint (written by ``llama-offload quantize``, or a GGUF
conversion that kept quantized blocks: its ``llama_offload.json`` records a ``quantization``), whose codes
cannot take a dense update; and ``--lora`` under model parallelism, where each rank holds a slice of every
matrix. ``llama-offload merge`` writes a checkpoint with the input's shards (a 2-shard 13B stays 2 shards, each
shard merged with its part of the update, never the whole model in memory), which runs like any other,
model-parallel included.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.dtypes import dtype_name
from llama_offload.checkpoint.adapter import load_adapter
from llama_offload.checkpoint.load import compact_tensor, expected_shapes, find_shards, open_float_shards
from llama_offload.checkpoint.lora_merge import (
    merged_weight, say, check_lora, describe, lora_deltas, quantized_lora_message,
)
from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta, write_derived_meta
from llama_offload.checkpoint.output_dir import check_out_dir, is_inside, output_dir
from llama_offload.text.tokenizer import check_vocab_size, load_tokenizer, tokenizer_copy_files
from llama_offload.convert.default_model import resolve_paths

__all__ = ["merge_checkpoint"]


def merge_checkpoint(ckpt_dir: str | Path, lora_dir: str | Path, out_dir: str | Path, *,
                     tokenizer_path: Optional[str | Path] = None, force: bool = False) -> Path:
    """Write ``ckpt_dir`` with the adapter of ``lora_dir`` merged into its weights to ``out_dir``; return it.

    The output has the input's dtype, shards (each merged with its part of the update) and ``params.json``, its
    tokenizer, and ``llama_offload.json``: the input's record carried over, with the adapter added. It is written
    into a temporary sibling and renamed into place when complete; an existing non-empty ``out_dir`` is replaced
    only with ``force`` and only when it holds a checkpoint llama_offload wrote (checkpoint.output_dir). Everything
    is checked before a weight is read."""
    start = time.perf_counter()
    ckpt = Path(ckpt_dir).expanduser()
    out = Path(out_dir).expanduser()
    adapter_dir = Path(lora_dir).expanduser()

    # --- the inputs ----------------------------------------------------------------------------------------
    paths = find_shards(ckpt)
    params_path = ckpt / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: a Meta checkpoint directory holds params.json next to "
                                "its consolidated.NN.pth shards. Restore it from the model's download.")
    if out.absolute() == ckpt.absolute() or is_inside(out, ckpt) or is_inside(ckpt, out):
        raise ValueError(f"--out {out} and --ckpt_dir {ckpt} must be different directories, neither inside the "
                         f"other: the merged checkpoint is a directory of its own. Choose an --out such as "
                         f"{ckpt.name}-{adapter_dir.name} beside it.")
    if is_inside(adapter_dir, out):
        raise ValueError(f"--lora {adapter_dir} lies inside --out {out}; choose an --out outside the adapter.")
    meta = read_checkpoint_meta(ckpt)
    args = ModelArgs.from_json(params_path)
    _, tok = resolve_paths(ckpt, tokenizer_path)
    tokenizer = load_tokenizer(tok)
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
    else:
        check_vocab_size(tokenizer, args.vocab_size, source=str(params_path))
    config = check_lora(adapter_dir, ckpt, args, flag="--lora")  # a quantized input is refused here

    expected = expected_shapes(args)
    shards, cat_dims, in_dtype = open_float_shards(paths, args, quantized=lambda _: ValueError(quantized_lora_message(ckpt)),
                                                   hint="Merge into the 16-bit original.")

    # --- the output: checked before any weight is read ------------------------------------------------------
    out_name, tok_files = tokenizer_copy_files(tok)
    needed = (sum(p.stat().st_size for p in paths) + sum(p.stat().st_size for p in tok_files.values())
              + params_path.stat().st_size + (64 << 10))
    sources = [ckpt, adapter_dir, *tok_files.values()]
    check_out_dir(out, force=force, sources=sources, needed_bytes=needed)
    adapter = load_adapter(adapter_dir, "cpu")  # its tensors must fit its own config
    deltas = dict(lora_deltas(adapter))
    say(f"merging {adapter_dir} ({describe(config)}) into {ckpt} ({len(paths)} shard(s), {dtype_name(in_dtype)})")
    with output_dir(out, force=force, sources=sources, needed_bytes=needed) as tmp:
        for i, (path, sd) in enumerate(zip(paths, shards)):
            shard: dict[str, torch.Tensor] = {}
            for key in expected:
                t = sd.pop(key)
                if key in deltas:
                    d = deltas[key]
                    if len(paths) > 1:  # this shard's part of the update, cut as the shards cut the matrix
                        assert cat_dims[key] is not None, key
                        d = d.chunk(len(paths), dim=cat_dims[key])[i]
                    t = merged_weight(t, d)
                shard[key] = compact_tensor(t)
            torch.save(shard, tmp / path.name)
            del shard
        shards.clear()
        shutil.copyfile(params_path, tmp / "params.json")
        for name, src in tok_files.items():
            shutil.copyfile(src, tmp / name)
        merged = list(meta.get("lora_merged") or [])  # an earlier merge into the input stays recorded
        merged.append({"path": str(adapter_dir.resolve()), "rank": config.rank, "alpha": config.alpha,
                       "targets": list(config.targets)})
        write_derived_meta(tmp, meta, source_dir=ckpt, num_shards=len(paths), dtype=dtype_name(in_dtype),
                           tokenizer=out_name, lora_merged=merged)
    say(f"wrote {out} in {time.perf_counter() - start:.1f} s ({META_FILENAME} records the adapter)")
    return out
