"""A fully fine-tuned model written as a Meta checkpoint, with the trainer state beside it for ``--resume``.

    OUT/consolidated.NN.pth   the trained weights, in the source's dtype and model-parallel shard count
    OUT/params.json           the source's, as it was
    OUT/tokenizer.model|json  the source's tokenizer
    OUT/llama_offload.json    the source's record, with the training added ("finetuned")
    OUT/trainer_state.pt      fp32 master weights, AdamW moments, step and loss history (one per rank:
                              trainer_state.rankR.pt, each rank's share of the optimizer state)

Every save is written into a temporary sibling and swapped in whole (output_dir.py): an interrupted save leaves
the previous one in place. The directory runs, quantizes and merges like any other checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from llama_offload.checkpoint.load import expected_shapes, save_checkpoint
from llama_offload.checkpoint.meta import write_derived_meta
from llama_offload.model.args import ModelArgs, param_counts


def state_file(rank: int, world: int) -> str:
    return "trainer_state.pt" if world == 1 else f"trainer_state.rank{rank}.pt"


def write_trained(tmp: Path, state_dict: dict[str, torch.Tensor], args: ModelArgs, *, source_dir: Path,
                  source_meta: dict[str, Any], num_shards: int, dtype_name: str, tokenizer_files: dict[str, Path],
                  tokenizer_name: str, training: dict[str, Any]) -> None:
    """Write the checkpoint's files into the (empty) temporary directory ``tmp`` of a save.

    One shard is written straight from the tensors given, views of the trainer's flat buffers: torch.save writes
    each buffer once (a block's page holds exactly its tensors, 256-byte aligned), so a save of an 8B model needs
    no 16 GB copy on a host that the master weights and moments already fill. Several shards are cut and
    compacted one shard at a time (load.save_checkpoint)."""
    if num_shards == 1:
        expected = expected_shapes(args)
        wrong = sorted(k for k in expected if k not in state_dict or tuple(state_dict[k].shape) != tuple(expected[k]))
        assert not wrong and len(state_dict) == len(expected), wrong[:4]
        torch.save({k: state_dict[k].detach() for k in expected}, tmp / "consolidated.00.pth")
    else:
        save_checkpoint(state_dict, args, tmp, num_shards=num_shards)
    shutil.copyfile(source_dir / "params.json", tmp / "params.json")  # the user's own fields stay
    for name, src in tokenizer_files.items():
        shutil.copyfile(src, tmp / name)
    earlier = list(source_meta.get("finetuned") or [])  # a model fine-tuned before keeps that record
    write_derived_meta(tmp, source_meta, source_dir=source_dir, num_shards=num_shards, dtype=dtype_name,
                       tokenizer=tokenizer_name, finetuned=[*earlier, training])


def checkpoint_bytes(params: ModelArgs, itemsize: int) -> int:
    """The weights' bytes in a checkpoint of ``itemsize``-byte elements."""
    return param_counts(params)["held"] * itemsize

