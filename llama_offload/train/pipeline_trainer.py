"""Training across GPUs and hosts: pipeline stages on ``torch.distributed.pipelining``, data parallel beside them.

    torchrun [--nnodes N --rdzv_endpoint HOST:PORT] --nproc_per_node G scripts/finetune.py ... --pp S
    world = D x S ranks on a 2-D DeviceMesh ("dp", "pp"): rank r runs stage r % S of replica r // S
    each stage: its blocks built on the meta device and only its tensors read (stages.py); the embedding on the
                first stage, the final norm and the head on the last
    per step:   every replica takes its share of the step's rows (schedule.step_rows, by its dp index); each
                micro-batch of --batch_size rows is split into --microbatches and run through the schedule
                (GPipe or 1F1B); the last stage's loss is the chunked cross-entropy summed over
                the step's trained tokens (so microbatches, micro-batches and replicas add up to one mean); the
                trainable gradients are summed over the dp group, clipped by the global norm over every stage,
                and each stage's AdamW steps its own parameters
    saving:     rank 0 consolidates the adapter (or, with --full, the weights) from every stage and writes what a
                single process writes; each stage's optimizer state goes beside it

Only the first stage needs the token ids and only the last the targets; the other stages run the schedule
without data (finetune.py reads the data file on those two only).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from llama_offload.checkpoint import adapter as adapter_files
from llama_offload.checkpoint.load import expected_shapes
from llama_offload.checkpoint.output_dir import output_dir
from llama_offload.checkpoint.trained import write_trained
from llama_offload.model import lora
from llama_offload.train import budget
from llama_offload.train.loss import chunked_cross_entropy
from llama_offload.train.schedule import step_rows
from llama_offload.train.stages import build_stage, stage_keys, stage_layers

# One stage per rank. The multi-stage schedules (interleaved 1F1B, zero bubble) need several stages a rank.
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
STATE_VERSION = 1


def check_pipeline(pp: int, world: int, n_layers: int, schedule: str, microbatches: int, batch_size: int,
                   stages_per_rank: int = 1) -> None:
    """The refusals a pipeline run gets on every rank before any weight is read."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, found {schedule!r}.")
    if world % pp:
        raise ValueError(f"--pp {pp} must divide the number of processes ({world}): the processes form "
                         f"{world} / {pp} data-parallel replicas of {pp} stages. Launch a multiple of {pp} processes "
                         "(torchrun --nproc_per_node) or choose another --pp.")
    if pp * stages_per_rank > n_layers:
        raise ValueError(f"--pp {pp} asks for {pp * stages_per_rank} pipeline stages, more than the model's "
                         f"{n_layers} layers. Use fewer stages.")
    if batch_size % microbatches:
        raise ValueError(f"--microbatches {microbatches} must divide --batch_size {batch_size}: each pass's rows are "
                         "split into microbatches of equal size (stages need static shapes).")
    if schedule != "gpipe" and microbatches < pp:
        raise ValueError(f"--schedule {schedule} needs at least as many microbatches as stages: --microbatches "
                         f"{microbatches} < --pp {pp}. Raise --microbatches (and --batch_size with it), or use "
                         "--schedule gpipe.")


class PipelineTrainer:
    """One rank's stage, its schedule and its optimizer; ``finetune`` drives it like the other trainers."""

    def __init__(self, prep: Any, *, show_progress: bool = False):
        self.prep, opts, device = prep, prep.opts, prep.device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.pp = int(opts.pp)
        self.dp = self.world // self.pp
        mesh = init_device_mesh(device.type, (self.dp, self.pp), mesh_dim_names=("dp", "pp"))
        self.pp_rank, self.dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.spans = stage_layers(prep.params, self.pp, opts.pp_layers)
        start, end = self.spans[self.pp_rank]
        self.first, self.last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        # A resumed full run continues from the weights it saved; LoRA from the base and its saved adapter.
        source = Path(opts.out).expanduser() if opts.full and prep.state is not None else prep.ckpt_dir
        self.loaded = build_stage(source, prep.params, start, end, self.first, self.last,
                                  seq_len=opts.seq_len, dtype=prep.dtype, show_progress=show_progress and self.rank == 0)
        print(f"[rank {self.rank}] stage {self.pp_rank} of {self.pp}, replica {self.dp_rank}: layers {start}-{end - 1}"
              f"{' with the embedding' if self.first else ''}{' with the norm and head' if self.last else ''}; read "
              f"{len(self.loaded.keys)} tensors, {self.loaded.nbytes} bytes", file=sys.stderr)
        module = self.loaded.module.to(device)
        self.module = module
        self.adapter: Optional[lora.LoRAAdapter] = None
        if opts.full:
            module.requires_grad_(True)
            self.trainable = [p for p in module.parameters()]
        else:
            torch.manual_seed(opts.seed)  # every rank draws the same initial adapter, as one process does
            self.adapter = lora.LoRAAdapter(prep.config, device)
            lora.attach_blocks(((int(i), layer) for i, layer in module.layers.items()), self.adapter)
            self.trainable = [p for key, pair in self.adapter.pairs.items() if start <= lora.pair_layer(key) < end
                              for p in pair.parameters()]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=opts.lr, weight_decay=opts.weight_decay)
        self.stage = PipelineStage(module, self.pp_rank, self.pp, device, group=self.pp_group)
        # Every rank passes the loss: a schedule without one runs forward only (only the last stage calls it).
        self.schedule = SCHEDULES[opts.schedule](self.stage, n_microbatches=opts.microbatches, loss_fn=self._loss,
                                                 scale_grads=False)
        self.chunk = budget.loss_chunk_tokens(prep.params.vocab_size)
        self.history: list[dict] = list(prep.state["history"]) if prep.state is not None else []
        self.grad_norm: Optional[float] = None
        self._saved = False
        self._count = 1.0
        # Collectives run on the GPU under NCCL, on the CPU under gloo.
        self._comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        if prep.state is not None:
            self._resume(prep.state)

    def autocast(self):
        if self.prep.dtype != torch.bfloat16:
            return nullcontext()
        return torch.autocast(self.prep.device.type, dtype=torch.bfloat16)

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(h, self.module.output.weight, targets, chunk_tokens=self.chunk,
                                     reduction="sum") / self._count

    # --- a step -------------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[float, int]:
        opts, prep, device = self.prep.opts, self.prep, self.prep.device
        rows = step_rows(step, opts.batch_size * opts.grad_accum * self.dp, prep.n_rows, opts.seed)
        mine = rows.view(self.dp, -1)[self.dp_rank]  # (batch_size * grad_accum,) this replica's rows
        count = torch.zeros((), dtype=torch.float64, device=self._comm)
        if self.last:
            count += (prep.targets[mine] != -100).sum()
            dist.all_reduce(count, group=self.dp_group)  # the last stages of every replica
        self._count = max(float(count), 1.0)
        total = torch.zeros((), dtype=torch.float64, device=self._comm)
        for micro in range(opts.grad_accum):
            part = mine[micro * opts.batch_size : (micro + 1) * opts.batch_size]
            with self.autocast():
                if self.first:
                    self.schedule.step(prep.inputs[part].to(device))
                elif self.last:
                    losses: list[torch.Tensor] = []
                    self.schedule.step(target=prep.targets[part].to(device), losses=losses)
                    total += sum(float(x.detach()) for x in losses) * self._count  # back to the summed loss
                else:
                    self.schedule.step()
        self._sum_gradients()
        self.grad_norm = self._clip() if opts.max_grad_norm is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The loss lives on the last stages: every rank learns it (rank 0 reports it).
        summed = torch.stack([total, count if self.dp_rank == 0 else torch.zeros_like(count)])
        if not self.last:
            summed.zero_()
        dist.all_reduce(summed)
        return float(summed[0]) / max(float(summed[1]), 1.0), opts.batch_size * opts.grad_accum * opts.seq_len * self.dp

    def _sum_gradients(self) -> None:
        """Data parallel: every replica adds the others' gradients of this stage, in one flat all-reduce."""
        if self.dp == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        at = 0
        for p in self.trainable:
            p.grad = flat[at : at + p.numel()].view_as(p).clone()
            at += p.numel()

    def _clip(self) -> float:
        """torch.nn.utils.clip_grad_norm_ over every stage's parameters: the squares of each stage's
        per-parameter norms summed over the pipeline."""
        norms = [torch.linalg.vector_norm(p.grad, 2.0) for p in self.trainable if p.grad is not None]
        squares = (torch.stack(norms).double() ** 2).sum() if norms else torch.zeros((), dtype=torch.float64)
        squares = squares.to(self._comm)
        dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt().float()
        coef = torch.clamp(self.prep.opts.max_grad_norm / (total + 1e-6), max=1.0)
        for p in self.trainable:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
        return float(total)

    def eval_loss(self) -> Optional[float]:
        return None  # evaluation runs in single-process runs (finetune refuses --eval_data with --pp)

    # --- saving and resuming --------------------------------------------------------------------------------------

    def _gather_adapter(self) -> dict[str, torch.Tensor]:
        """Every stage's pairs, on every rank of the pipeline group (broadcast from the stage that trains them)."""
        assert self.adapter is not None
        out = {}
        ranks = dist.get_process_group_ranks(self.pp_group)
        for key, pair in self.adapter.pairs.items():
            owner = next(s for s, (a, b) in enumerate(self.spans) if a <= lora.pair_layer(key) < b)
            for name, t in pair.named_parameters():
                buf = t.detach().clone()
                dist.broadcast(buf, src=ranks[owner], group=self.pp_group)
                out[f"{lora.pair_name(key)}.{name}"] = buf.float().cpu()
        return out

    def _gather_weights(self) -> dict[str, torch.Tensor]:
        """Every stage's weights in Meta's names and the source's dtype, on rank 0 (the others hold none)."""
        prep = self.prep
        ranks = dist.get_process_group_ranks(self.pp_group)
        mine = dict(self.module.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for s, (a, b) in enumerate(self.spans):
            for key in stage_keys(prep.params, a, b, s == 0, s == self.pp - 1):
                if s == self.pp_rank:
                    buf = mine[key].detach().to(self._comm).contiguous()
                else:
                    buf = torch.empty(expected_shapes(prep.params)[key], dtype=prep.dtype, device=self._comm)
                dist.broadcast(buf, src=ranks[s], group=self.pp_group)
                if self.rank == 0:
                    out[key] = buf.to(prep.source_dtype).cpu()
        return out

    def _save_full(self, step: int, out: Path) -> Path:
        """Rank 0 writes the consolidated checkpoint; every stage of the first replica writes its optimizer
        state into the same temporary directory before it is published."""
        prep, opts = self.prep, self.prep.opts
        weights = self._gather_weights() if self.dp_rank == 0 else {}
        state = {"version": STATE_VERSION, "kind": "full", "step": step, "identity": opts.identity(),
                 "world_size": self.world, "data_sha256": prep.data_sha256, "history": self.history,
                 "optimizer": self.optimizer.state_dict(), "pp": self.pp, "spans": self.spans}
        name = f"trainer_state.stage{self.pp_rank}.pt"
        where: list[Any] = [None]
        if self.rank == 0:
            training = {"kind": "full", "steps": step, "data": str(Path(opts.data).expanduser().resolve()),
                        "data_sha256": prep.data_sha256, "seq_len": opts.seq_len, "lr": opts.lr,
                        "processes": self.world, "pipeline_stages": self.pp}
            with output_dir(out, force=self._saved or bool(opts.resume) or bool(opts.force), sources=prep.sources) as tmp:
                write_trained(tmp, weights, prep.params, source_dir=prep.ckpt_dir, source_meta=prep.source_meta,
                              num_shards=prep.num_shards, dtype_name=prep.source_dtype_name,
                              tokenizer_files=prep.tokenizer_files, tokenizer_name=prep.tokenizer_name,
                              training=training)
                where[0] = str(tmp)
                dist.broadcast_object_list(where, src=0)
                torch.save(state, tmp / name)
                dist.barrier()
        else:
            dist.broadcast_object_list(where, src=0)
            if self.dp_rank == 0:
                torch.save(state, Path(where[0]) / name)
            dist.barrier()
        self._saved = True
        return out

    def save(self, step: int) -> Path:
        prep, opts = self.prep, self.prep.opts
        out = Path(opts.out).expanduser()
        if opts.full:
            return self._save_full(step, out)
        tensors = self._gather_adapter()
        states: list[Any] = [None] * self.pp
        mine = {"optimizer": self.optimizer.state_dict(), "stage": self.pp_rank}
        if self.dp_rank == 0:
            dist.all_gather_object(states, mine, group=self.pp_group)
        if self.rank == 0:
            self.adapter.load_tensors(tensors, str(out))  # the consolidated adapter, in rank 0's copy
            state = {"version": STATE_VERSION, "kind": "pipeline", "step": step, "identity": opts.identity(),
                     "world_size": self.world, "data_sha256": prep.data_sha256, "history": self.history,
                     "optimizer": states, "adapter": tensors, "pp": self.pp, "spans": self.spans}
            adapter_files.save_adapter(self.adapter, out, state)
        dist.barrier()
        return out

    def _resume(self, state: dict) -> None:
        # --full: this stage's own file (finetune.prepare read it), its weights loaded from the saved checkpoint
        if state.get("pp") != self.pp or [tuple(s) for s in state.get("spans", [])] != [tuple(s) for s in self.spans]:
            raise ValueError(f"--resume: the run in {self.prep.opts.out} had {state.get('pp')} stages "
                             f"({state.get('spans')}); this one has {self.pp} ({self.spans}). Resume with the saved "
                             "--pp and --pp_layers.")
        if self.prep.opts.full:
            self.optimizer.load_state_dict(state["optimizer"])
            return
        assert self.adapter is not None
        self.adapter.load_tensors(state["adapter"], str(self.prep.opts.out))
        self.optimizer.load_state_dict(state["optimizer"][self.pp_rank]["optimizer"])

    def close(self) -> None:
        pass

