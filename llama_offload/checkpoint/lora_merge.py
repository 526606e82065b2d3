"""A LoRA adapter merged into Meta-named state dicts: the load-time merge of ``--lora`` (checkpoint.load.load_model) and
the per-shard merge of ``llama-offload merge`` (convert/merge.py) share it, so both give the same weights.

Each target matrix gets ``scale * B @ A`` (computed in fp32 on the CPU) added and the sum rounded once to the
checkpoint's own dtype, as ``lora.merge_into`` does to a model. Quantized checkpoints and split (model-parallel)
weights are refused with what to do instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from llama_offload.checkpoint.adapter import read_config
from llama_offload.checkpoint.quant_load import read_quantization
from llama_offload.model.args import ModelArgs
from llama_offload.model.lora import ModelShape, check_shape

__all__ = ["check_lora", "describe", "lora_deltas", "merge_state_dict", "model_parallel_lora_message",
           "quantized_lora_message"]


def say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def quantized_lora_message(ckpt_dir: str | Path, flag: str = "--lora") -> str:
    return (f"{flag} needs 16-bit (or float32) weights to merge the adapter into, but {ckpt_dir} is quantized (its "
            "llama_offload.json records a quantization: written by llama-offload quantize, or converted from a GGUF "
            "whose quantized blocks were kept). Merge the adapter into the unquantized checkpoint instead: "
            "llama-offload merge --ckpt_dir UNQUANTIZED --lora ADAPTER --out MERGED, then quantize that "
            "(llama-offload quantize --ckpt_dir MERGED ..., or run it with --quantize). From a GGUF, an unquantized "
            "checkpoint is llama-offload convert model.gguf --out DIR --dtype bfloat16.")


def model_parallel_lora_message() -> str:
    return ("--lora is not supported with several processes (model parallelism): each rank holds a slice of every "
            "matrix, and merging into split weights is not supported. Merge the adapter once with llama-offload "
            "merge --ckpt_dir CKPT --lora ADAPTER --out MERGED, then run MERGED (with as many processes as before).")


def check_lora(lora_dir: str | Path, ckpt_dir: str | Path, args: ModelArgs, *, model_parallel_size: int = 1,
               flag: str = "--lora", merging: bool = True) -> Any:
    """The adapter's config (``model.lora.LoRAConfig``), checked against the checkpoint without reading a weight:
    the config itself, the model shape it was trained on, one process, and (``merging``) an unquantized
    checkpoint. A run (``merging=False``) attaches the adapter beside a quantized checkpoint's codes instead."""
    config = read_config(lora_dir)
    check_shape(config.shape, ModelShape.of(args), f"{flag} {lora_dir}")
    if merging and read_quantization(ckpt_dir) is not None:
        raise ValueError(quantized_lora_message(ckpt_dir, flag))
    if model_parallel_size > 1:
        raise ValueError(model_parallel_lora_message())
    return config


def describe(config: Any) -> str:
    """One line about an adapter, as ``info`` and the loaders print it."""
    return (f"LoRA rank {config.rank}, alpha {config.alpha:g} (scale {config.scale:g}), targets "
            f"{','.join(config.targets)} in all {config.shape.n_layers} blocks")


def lora_deltas(adapter: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, the dense fp32 update ``scale * B @ A``) for each target matrix of the adapter, in layer
    order; the same numbers ``LoRAPair.delta`` gives."""
    tensors = adapter.tensors()
    scale = adapter.config.scale
    names = sorted({k.rsplit(".", 1)[0] for k in tensors}, key=lambda n: (int(n.split(".")[1]), n))
    for name in names:
        a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        yield f"{name}.weight", (b @ a) * scale


def merged_weight(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # A new tensor (never written into a memory-mapped shard), rounded once to the weight's dtype.
    return (w.float() + delta).to(w.dtype)


def merge_state_dict(state_dict: dict[str, torch.Tensor], adapter: Any, *,
                     show_progress: bool = False) -> dict[str, torch.Tensor]:
    """``state_dict`` (whole Meta-named 16-bit or fp32 tensors) with the adapter merged into its target matrices;
    the other tensors are the same objects. Raises ValueError for a quantized or mis-shaped target."""
    start = time.perf_counter()
    out = dict(state_dict)
    n = 0
    for key, delta in lora_deltas(adapter):
        w = out.get(key)
        if f"{key.removesuffix('.weight')}.scales" in out or (w is not None and not w.is_floating_point()):
            raise ValueError(quantized_lora_message("the checkpoint"))
        if w is None:
            raise ValueError(f"The adapter updates {key}, which the checkpoint does not have: the adapter was "
                             "trained on another model.")
        if tuple(w.shape) != tuple(delta.shape):
            raise ValueError(f"The adapter's update of {key} is {tuple(delta.shape)}, the checkpoint's matrix "
                             f"{tuple(w.shape)}: the adapter was trained on another model.")
        out[key] = merged_weight(w, delta)
        n += 1
    if show_progress:
        say(f"merged the LoRA adapter into {n} matrices ({describe(adapter.config)}) in "
             f"{time.perf_counter() - start:.2f} s")
    return out
