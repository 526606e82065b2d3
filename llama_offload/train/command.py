"""The ``llama-offload finetune`` command (also ``scripts/finetune.py`` under torchrun): fire flags -> finetune()."""

from __future__ import annotations

from typing import Optional

from llama_offload.files.cleanup import exit_on_signal
from llama_offload.train.finetune import FinetuneOptions, finetune


def finetune_command(
    data: Optional[str] = None,
    out: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    lr: float = 1e-4,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3",
    seq_len: int = 1024,
    batch_size: int = 1,
    grad_accum: int = 1,
    gpu_memory_gb: Optional[float] = None,
    seed: int = 1,
    eval_data: Optional[str] = None,
    eval_every: int = 100,
    save_every: int = 100,
    resume: bool = False,
    offload_activations: Optional[bool] = None,
    weight_decay: float = 0.0,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    chat_format: Optional[str] = None,
    allow_long_context: bool = False,
) -> None:
    """Train a LoRA adapter on a frozen base model whose blocks are paged through a GPU budget.

    Args:
        data: a JSONL file, one {"text": ...} or {"messages": [{"role": ..., "content": ...}, ...]} per line; chat
            examples are rendered in the checkpoint's chat format and only the assistant replies are learned.
        out: the adapter directory to write (adapter_config.json, adapter.safetensors, trainer_state.pt); must be
            new or empty unless --resume.
        ckpt_dir: the base checkpoint (default: the default model); 16-bit or quantized (a quantized base trains
            QLoRA-style).
        tokenizer_path: its tokenizer (default: the one found in or beside ckpt_dir).
        steps: optimizer steps to run in all (not with --epochs).
        epochs: passes over the packed data (default 1; not with --steps).
        lr: AdamW learning rate (constant).
        lora_rank: the rank r of every update B @ A.
        lora_alpha: updates are scaled by alpha / r.
        lora_targets: which matrices of every block get an adapter, comma-separated, among wq,wk,wv,wo,w1,w2,w3.
        seq_len: tokens per packed row (examples are concatenated and cut into rows).
        batch_size: rows per forward pass (per process).
        grad_accum: forward passes per optimizer step.
        gpu_memory_gb: GPU budget in GiB: as many blocks as fit stay resident, the rest are paged from pinned memory
            in the forward and again in the backward pass (default: every block paged, the least memory).
        seed: seeds the adapter's initialisation and the data order.
        eval_data: a JSONL file like --data whose mean loss is reported every --eval_every steps and at the end.
        eval_every: steps between evaluations.
        save_every: steps between saves of the adapter and the trainer state (and always at the end, and on Ctrl-C).
        resume: continue the run saved in --out, at the step it saved (same data and flags; --steps may grow).
        offload_activations: keep each block's checkpointed input in pinned CPU memory instead of on the GPU
            (default: on with a GPU).
        weight_decay: AdamW weight decay.
        device: cuda, cuda:N or cpu (default: cuda if available).
        dtype: bfloat16, float16 or float32: the base weights' and autocast's dtype (default: bf16 on a GPU, fp32
            on the CPU); the LoRA weights are always fp32.
        chat_format: llama2, llama3 or chatml: overrides the checkpoint's.
        allow_long_context: allow --seq_len above the context the model was trained for.
    """
    opts = FinetuneOptions(
        data=data, out=out, ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, steps=steps, epochs=epochs, lr=lr,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, seq_len=seq_len,
        batch_size=batch_size, grad_accum=grad_accum, gpu_memory_gb=gpu_memory_gb, seed=seed, eval_data=eval_data,
        eval_every=eval_every, save_every=save_every, resume=bool(resume), offload_activations=offload_activations,
        weight_decay=weight_decay, device=device, dtype=dtype, chat_format=chat_format,
        allow_long_context=bool(allow_long_context))
    with exit_on_signal("llama-offload finetune"):
        done = finetune(opts)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"adapter written to {done}")
        print(f"use it with: llama-offload chat --lora {done}" + (f" --ckpt_dir {ckpt_dir}" if ckpt_dir else ""))
