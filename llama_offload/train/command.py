"""The ``llama-offload finetune`` command (also ``scripts/finetune.py`` under torchrun): fire flags -> finetune()."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from llama_offload.files.cleanup import exit_on_signal
from llama_offload.generate.run_options import flag_parameters, with_flag_help
from llama_offload.train.finetune import FinetuneOptions, finetune


def finetune_command(*args: Any, **kwargs: Any) -> None:
    """Train a LoRA adapter on a frozen base model, or every weight (--full), with its blocks paged through a GPU
    budget."""
    bound = _SIGNATURE.bind(*args, **kwargs)  # a name that is no field: TypeError, as for any function
    bound.apply_defaults()
    flags = bound.arguments
    opts = FinetuneOptions(**{**flags, **{k: bool(flags[k]) for k in ("resume", "allow_long_context", "full", "force", "dry_run")}})
    with exit_on_signal("llama-offload finetune"):
        done = finetune(opts)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        if opts.dry_run:
            print("dry run: the plan above; run again without --dry_run to train")
        elif opts.full:
            print(f"fine-tuned checkpoint written to {done}")
            print(f"use it with: llama-offload chat --ckpt_dir {done}")
        else:
            print(f"adapter written to {done}")
            print(f"use it with: llama-offload chat --lora {done}" + (f" --ckpt_dir {flags['ckpt_dir']}" if flags["ckpt_dir"] else ""))


# The flags are FinetuneOptions' fields, written once there: fire (through inspect.signature) and Python callers see
# one parameter per field, with its default and type, and the help lists each with its metadata["help"].
_FIELDS = [f.name for f in dataclasses.fields(FinetuneOptions)]
_SIGNATURE = inspect.Signature(flag_parameters(FinetuneOptions, _FIELDS, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD),
                               return_annotation=None)
finetune_command.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
finetune_command.__doc__ = with_flag_help(finetune_command.__doc__ or "", FinetuneOptions, _FIELDS)
