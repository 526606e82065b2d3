"""Full fine-tuning: every weight trains (blocks, embedding, final norm, output head), the optimizer on the host.

    base model loaded in the working dtype (bf16 on a GPU, fp32 on the CPU); every parameter requires grad
    -> units laid out (host_update.py): the blocks' pinned pages, homes for the embedding and the head
    -> per step: each micro-batch forward and backward through paged.py; each unit's gradient leaves the GPU as the
       backward finishes it, is reduced to its owner rank, and the host optimizer (host_adamw.py) steps it while
       the GPU goes on; clipping by global norm moves the updates behind the next forward (host_update.py)
    -> saved atomically as a Meta checkpoint in the source's dtype and shard count, with the master weights and
       moments beside it (checkpoint/trained.py)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from llama_offload.checkpoint.output_dir import output_dir
from llama_offload.checkpoint.trained import state_file, write_trained
from llama_offload.model.transformer import Transformer
from llama_offload.train import budget, paged
from llama_offload.train.host_update import HostUpdate, Unit, paged_unit, resident_unit
from llama_offload.train.trainer import Trainer

STATE_VERSION = 1


class FullTrainer(Trainer):
    def __init__(self, prep: Any, model: Transformer):
        super().__init__(prep, model)
        opts, device = prep.opts, prep.device
        self.plan = prep.plan
        for p in model.parameters():
            p.requires_grad_(True)
        for module in (model.tok_embeddings, model.norm, model.output):
            module.to(device)
        self.runner = paged.BlockRunner(model.layers, device,
                                        resident=self.plan.gpu.resident_layers if device.type == "cuda" else None,
                                        offload_activations=self.plan.checkpoints_on_host,
                                        autocast_dtype=torch.bfloat16 if prep.dtype == torch.bfloat16 else None,
                                        ffn_chunk=budget.FFN_CHUNK_TOKENS)
        units: list[Unit] = [resident_unit("tok_embeddings", [model.tok_embeddings.weight], device)]
        resident = self.runner.resident
        for i, block in enumerate(model.layers):
            if i < resident:
                units.append(resident_unit(f"layers.{i}", list(block.parameters()), device))
            else:
                units.append(paged_unit(f"layers.{i}", self.runner.pager.pages.pages[i - resident]))
        units.append(resident_unit("norm+output", [model.norm.weight, model.output.weight], device))
        parts: dict[Any, int] = {"embedding": 0, "head": len(units) - 1, **{i: i + 1 for i in range(len(model.layers))}}
        self.update = HostUpdate(units, parts, device, lr=opts.lr, weight_decay=opts.weight_decay,
                                 optim_state=opts.optim_state, grad_accum=opts.grad_accum,
                                 max_grad_norm=opts.max_grad_norm)
        self.runner.weights = self.update
        self.names = {id(p): name for name, p in model.named_parameters()}
        self._saved = False
        if prep.state is not None:
            self.update.load_state_dict(prep.state["optimizer"])

    def before_micro(self, micro: int) -> None:
        self.update.begin_micro(micro)

    def optimizer_step(self) -> Optional[float]:
        return self.update.end_step()

    # --- saving ----------------------------------------------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        prep = self.prep
        return {"version": STATE_VERSION, "kind": "full", "step": step, "identity": prep.opts.identity(),
                "world_size": self.world, "data_sha256": prep.data_sha256, "history": self.history,
                "optimizer": self.update.state_dict()}

    def weights(self) -> dict[str, torch.Tensor]:
        """Meta-named weights in the source's dtype: the 16-bit working copies when that is the source's dtype
        (they are the masters rounded to it), else the masters (every rank's share gathered in rank order)."""
        out_dtype = self.prep.source_dtype
        sd: dict[str, torch.Tensor] = {}
        for u, unit in enumerate(self.update.units):
            same = all(v.dtype == out_dtype for v in unit.views)
            master = self.update.masters.get(u)
            if not same and self.world > 1:
                master = self._gather_master(u)
            for p, view, at in zip(unit.params, unit.views, unit.offsets):
                if same or master is None:
                    t = view.to(out_dtype)
                else:
                    t = master[at : at + p.numel()].view(view.shape).to(out_dtype)
                sd[self.names[id(p)]] = t
        return sd

    def _gather_master(self, u: int) -> Optional[torch.Tensor]:
        owner = u % self.world
        flat = self.update.masters.get(u)
        if flat is None:
            flat = torch.empty(self.update.units[u].numel, dtype=torch.float32)
        if dist.get_backend() == "nccl":
            on = flat.to(self.prep.device)
            dist.broadcast(on, src=owner)
            flat = on.cpu()
        else:
            dist.broadcast(flat, src=owner)
        return flat

    def save(self, step: int) -> Path:
        prep, opts = self.prep, self.prep.opts
        out = Path(opts.out).expanduser()
        self.update.settle()
        start = time.perf_counter()
        weights = self.weights()
        state = self.state(step)
        name = state_file(self.rank, self.world)
        training = {"kind": "full", "steps": step, "data": str(Path(opts.data).expanduser().resolve()),
                    "data_sha256": prep.data_sha256, "seq_len": opts.seq_len, "lr": opts.lr,
                    "optim_state": opts.optim_state, "processes": self.world}
        # A save replaces this run's previous one (and, with --force or --resume, what --out held before).
        force = self._saved or bool(opts.resume) or bool(opts.force)
        if self.rank == 0:
            with output_dir(out, force=force, sources=prep.sources) as tmp:
                write_trained(tmp, weights, prep.params, source_dir=prep.ckpt_dir, source_meta=prep.source_meta,
                              num_shards=prep.num_shards, dtype_name=prep.source_dtype_name,
                              tokenizer_files=prep.tokenizer_files, tokenizer_name=prep.tokenizer_name,
                              training=training)
                torch.save(state, tmp / name)
                if self.world > 1:  # every rank writes its share of the optimizer state into the same directory
                    dist.broadcast_object_list([str(tmp)], src=0)
                    dist.barrier()
        else:
            where = [None]
            dist.broadcast_object_list(where, src=0)
            torch.save(state, Path(where[0]) / name)
            dist.barrier()
        self._saved = True
        self.save_s = time.perf_counter() - start
        return out

    def close(self) -> None:
        self.update.close()
