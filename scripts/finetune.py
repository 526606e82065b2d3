"""Fine-tune a LoRA adapter on a Meta-format checkpoint, its frozen blocks paged through a GPU budget.

    python scripts/finetune.py --data train.jsonl --out adapters/mine          # the default model
    torchrun --nproc_per_node 1 scripts/finetune.py --ckpt_dir checkpoints/llama-2-7b/ \
        --data train.jsonl --out adapters/7b --seq_len 4096 --gpu_memory_gb 16

Several GPUs (data parallel): each of N processes pages its own copy of the frozen weights and trains on its
share of every step's rows; the LoRA gradients are summed over the processes before each optimizer step.

    torchrun --nproc_per_node 2 scripts/finetune.py --ckpt_dir checkpoints/llama-2-7b/ --data train.jsonl --out adapters/7b

The flags are those of `llama-offload finetune` (`python scripts/finetune.py -- --help` lists them).
"""

from __future__ import annotations

from llama_offload.cli.options import fire_main
from llama_offload.train.command import finetune_command

if __name__ == "__main__":
    fire_main(finetune_command, name="finetune.py")
