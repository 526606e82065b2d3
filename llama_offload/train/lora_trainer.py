"""LoRA: adapters trained on a frozen base model whose blocks are paged through a GPU budget.

    base model loaded (16-bit or quantized, frozen), adapter attached (LoRA pairs resident)
    -> per step: each micro-batch forward and backward through paged.py; LoRA gradients summed over ranks
       (data parallel); optional clipping by global norm; AdamW (torch's, on the device)
    -> the adapter and the trainer state are saved atomically (checkpoint/adapter.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from llama_offload.checkpoint import adapter
from llama_offload.model import lora
from llama_offload.model.transformer import Transformer
from llama_offload.train import budget, paged
from llama_offload.train.trainer import Trainer

STATE_VERSION = 1


def lora_parameter_count(config: lora.LoRAConfig, n_layers: int) -> int:
    return sum(r * (i + o) for r, (o, i) in ((config.rank, config.shape.matrix(t)) for t in config.targets)) * n_layers


def stored_bytes(params: Any, dtype: torch.dtype) -> tuple[int, int]:
    """(one block, embedding + norm + head) in the training dtype, from the shapes: quantized blocks count less
    on the GPU, so this errs towards fewer resident blocks."""
    item = dtype.itemsize
    block = sum(o * i for o, i in (lora.ModelShape.of(params).matrix(t) for t in lora.TARGETS)) + 2 * params.dim
    return block * item, (2 * params.vocab_size * params.dim + params.dim) * item


class LoraTrainer(Trainer):
    def __init__(self, prep: Any, model: Transformer):
        super().__init__(prep, model)
        opts, device = prep.opts, prep.device
        self.plan = prep.plan
        torch.manual_seed(opts.seed)  # every rank draws the same initial adapter
        self.adapter = lora.LoRAAdapter(prep.config, device)
        lora.attach(model, self.adapter)
        for module in (model.tok_embeddings, model.norm, model.output):
            module.to(device)
        self.runner = paged.BlockRunner(model.layers, device,
                                        resident=self.plan.resident_layers if device.type == "cuda" else None,
                                        offload_activations=prep.offload_activations,
                                        autocast_dtype=torch.bfloat16 if prep.dtype == torch.bfloat16 else None,
                                        ffn_chunk=budget.FFN_CHUNK_TOKENS)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        if prep.state is not None:
            self.adapter.load_tensors(prep.state["adapter"], str(opts.out))
            self.optimizer.load_state_dict(prep.state["optimizer"])

    def optimizer_step(self) -> Optional[float]:
        self._sum_gradients()
        norm = None
        if self.prep.opts.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(list(self.adapter.parameters()), self.prep.opts.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _sum_gradients(self) -> None:
        """Data parallel: every rank adds the others' LoRA gradients, in one flat all-reduce."""
        if self.world == 1:
            return
        params = [p for p in self.adapter.parameters()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for p in params:
            p.grad = flat[at : at + p.numel()].view_as(p).clone()
            at += p.numel()

    def save(self, step: int) -> Path:
        prep = self.prep
        state = {"version": STATE_VERSION, "step": step, "identity": prep.opts.identity(), "world_size": self.world,
                 "data_sha256": prep.data_sha256, "optimizer": self.optimizer.state_dict(),
                 "adapter": self.adapter.tensors(), "history": self.history}
        return adapter.save_adapter(self.adapter, Path(prep.opts.out).expanduser(), state)
