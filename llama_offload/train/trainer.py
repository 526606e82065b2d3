"""What every fine-tuning run shares: the step over micro-batches and ranks, the loss and the evaluation.

``LoraTrainer`` (lora_trainer.py) trains adapters on a frozen base; ``FullTrainer`` (full_trainer.py) trains every
weight with the optimizer on the host. Both run the model's blocks through paged.BlockRunner.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from llama_offload.model.transformer import Transformer
from llama_offload.train import budget, paged
from llama_offload.train.loss import chunked_cross_entropy
from llama_offload.train.schedule import step_rows, world


class Trainer:
    """The model, its block runner and the step; subclasses add what trains and how it is saved."""

    runner: paged.BlockRunner

    def __init__(self, prep: Any, model: Transformer):
        self.prep, self.model = prep, model
        self.rank, self.world = world()
        self.history: list[dict] = list(prep.state["history"]) if prep.state is not None else []
        self.freqs_cis = paged.rope_table(model, prep.opts.seq_len, prep.device)
        self.chunk = budget.loss_chunk_tokens(prep.params.vocab_size)
        self.grad_norm: Optional[float] = None  # the last step's, when it was clipped

    def loss_fn(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        return chunked_cross_entropy(h, weight, targets, chunk_tokens=self.chunk, reduction=reduction)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def before_micro(self, micro: int) -> None:
        """Hook: a micro-batch is about to run."""

    def optimizer_step(self) -> Optional[float]:
        """After the step's micro-batches: update the weights; returns the gradient norm if it was clipped."""
        raise NotImplementedError

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns its mean loss over every rank's trained tokens, and its input tokens."""
        opts, prep, device = self.prep.opts, self.prep, self.prep.device
        rows = step_rows(step, opts.batch_size * opts.grad_accum * self.world, prep.inputs.shape[0], opts.seed)
        mine = rows.view(self.world, -1)[self.rank]  # (batch_size * grad_accum,) this rank's rows
        inputs, targets = prep.inputs[mine].to(device), prep.targets[mine].to(device)  # (rows, seq_len)
        # Every micro-batch and rank divides by the step's trained tokens, so the summed gradients are one mean.
        count = self._all_reduce((targets != -100).sum().to(torch.float64)).item()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(opts.grad_accum):
            self.before_micro(micro)
            part = slice(micro * opts.batch_size, (micro + 1) * opts.batch_size)
            total += paged.paged_loss_and_backward(self.model, self.runner, inputs[part], targets[part],
                                                   self.freqs_cis, max(count, 1.0), self.loss_fn).double()
        self.grad_norm = self.optimizer_step()
        loss = self._all_reduce(total).item() / max(count, 1.0)
        return loss, inputs.numel() * self.world

    def eval_loss(self) -> Optional[float]:
        prep = self.prep
        if prep.eval_inputs is None:
            return None
        rows = torch.arange(prep.eval_inputs.shape[0])[self.rank :: self.world]
        total = torch.zeros((), dtype=torch.float64, device=prep.device)
        count = torch.zeros((), dtype=torch.float64, device=prep.device)
        for part in rows.split(prep.opts.batch_size):
            tokens, targets = prep.eval_inputs[part].to(prep.device), prep.eval_targets[part].to(prep.device)
            total += paged.paged_eval_loss(self.model, self.runner, tokens, targets, self.freqs_cis, self.loss_fn).double()
            count += (targets != -100).sum()
        return (self._all_reduce(total) / self._all_reduce(count).clamp(min=1)).item()

    def save(self, step: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the run holds beyond its memory (the optimizer's worker thread)."""
