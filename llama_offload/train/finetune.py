"""``llama-offload finetune``: train a LoRA adapter on a frozen base model, paged through a GPU budget.

    flags -> checked (data read and packed, adapter shape, memory plan) before any weight is loaded
          -> base model loaded (16-bit or quantized, frozen), adapter attached (LoRA pairs resident)
          -> per optimizer step: batch_size x grad_accum rows per rank, each micro-batch forward and backward
             through paged.py; LoRA gradients summed over ranks (data parallel); AdamW
          -> adapter and trainer state saved atomically to --out every --save_every steps, at the end, and when
             interrupted; --resume picks the run up at the step it saved

The rows of every step come from a fixed order: epoch e is a permutation of the packed rows drawn from
``--seed`` + e, and step s takes rows s x G .. (s + 1) x G - 1 of the epochs laid end to end (G = rows per
step over every rank). So the data position is the step number, and a resumed run sees the rows the
uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from llama_offload.model.args import ModelArgs
from llama_offload.text.chat_format import chat_format_name, get_chat_format
from llama_offload.checkpoint.load import checkpoint_context_length, load_model
from llama_offload.checkpoint.meta import read_checkpoint_meta
from llama_offload.checkpoint.output_dir import existing_ancestor
from llama_offload.files.cleanup import new_temp_dir, remove_tree
from llama_offload.convert.default_model import resolve_paths
from llama_offload.generate.run_options import flag
from llama_offload.model.dtypes import parse_dtype
from llama_offload.text.tokenizer import check_vocab_size, load_tokenizer
from llama_offload.train import budget, data, paged
from llama_offload.checkpoint import adapter
from llama_offload.model import lora
from llama_offload.train.loss import chunked_cross_entropy
from llama_offload.train.progress import Progress

STATE_VERSION = 1


@dataclass
class FinetuneOptions:
    """The flags of ``llama-offload finetune`` (and ``scripts/finetune.py``): each field is one flag, with its
    help (train/command.py builds the command's parameters and help from these fields)."""

    data: Optional[str] = flag(None, 'a JSONL file, one {"text": ...} or {"messages": [{"role": ..., "content": ...}, '
                                     "...]} per line; chat examples are rendered in the checkpoint's chat format and "
                                     "only the assistant replies are learned.")
    out: Optional[str] = flag(None, "the adapter directory to write (adapter_config.json, adapter.safetensors, "
                                    "trainer_state.pt); must be new or empty unless --resume.")
    ckpt_dir: Optional[str] = flag(None, "the base checkpoint (default: the default model); 16-bit or quantized (a "
                                         "quantized base trains QLoRA-style).")
    tokenizer_path: Optional[str] = flag(None, "its tokenizer (default: the one found in or beside ckpt_dir).")
    steps: Optional[int] = flag(None, "optimizer steps to run in all (not with --epochs).")
    epochs: Optional[float] = flag(None, "passes over the packed data (default 1; not with --steps).")
    lr: float = flag(1e-4, "AdamW learning rate (constant).")
    lora_rank: int = flag(16, "the rank r of every update B @ A.")
    lora_alpha: float = flag(32.0, "updates are scaled by alpha / r.")
    lora_targets: str = flag("wq,wk,wv,wo,w1,w2,w3", "which matrices of every block get an adapter, comma-separated, "
                                                     "among wq,wk,wv,wo,w1,w2,w3.")
    seq_len: int = flag(1024, "tokens per packed row (examples are concatenated and cut into rows).")
    batch_size: int = flag(1, "rows per forward pass (per process).")
    grad_accum: int = flag(1, "forward passes per optimizer step.")
    gpu_memory_gb: Optional[float] = flag(None, "GPU budget in GiB: as many blocks as fit stay resident, the rest are "
                                                "paged from pinned memory in the forward and again in the backward "
                                                "pass (default: every block paged, the least memory).")
    seed: int = flag(1, "seeds the adapter's initialisation and the data order.")
    eval_data: Optional[str] = flag(None, "a JSONL file like --data whose mean loss is reported every --eval_every "
                                          "steps and at the end.")
    eval_every: int = flag(100, "steps between evaluations.")
    save_every: int = flag(100, "steps between saves of the adapter and the trainer state (and always at the end, "
                                "and on Ctrl-C).")
    resume: bool = flag(False, "continue the run saved in --out, at the step it saved (same data and flags; --steps "
                               "may grow).")
    offload_activations: Optional[bool] = flag(None, "keep each block's checkpointed input in pinned CPU memory "
                                                     "instead of on the GPU (default: on with a GPU).")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    device: Optional[str] = flag(None, "cuda, cuda:N or cpu (default: cuda if available).")
    dtype: Optional[str] = flag(None, "bfloat16, float16 or float32: the base weights' and autocast's dtype "
                                      "(default: bf16 on a GPU, fp32 on the CPU); the LoRA weights are always fp32.")
    chat_format: Optional[str] = flag(None, "llama2, llama3 or chatml: overrides the checkpoint's.")
    allow_long_context: bool = flag(False, "allow --seq_len above the context the model was trained for.")

    def check(self) -> None:
        def whole(name: str, low: int, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be a whole number >= {low}, found {value!r}.")

        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"--{name} must be a positive number, found {value!r}.")

        if not self.data:
            raise ValueError("--data is required: a JSONL file with one {\"text\": ...} or {\"messages\": [...]} per line.")
        if not self.out:
            raise ValueError("--out is required: the directory the adapter is written to (llama-offload finetune "
                             "--data train.jsonl --out adapters/mine).")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"Give --steps or --epochs, not both (found --steps {self.steps} --epochs {self.epochs}).")
        if self.steps is not None:
            whole("steps", 1, self.steps)
        if self.epochs is not None:
            positive("epochs", self.epochs)
        for name in ("lora_rank", "seq_len", "batch_size", "grad_accum", "eval_every", "save_every"):
            whole(name, 1, getattr(self, name))
        whole("seed", 0, self.seed)
        for name in ("lr", "lora_alpha"):
            positive(name, getattr(self, name))
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"--weight_decay must be 0 or more, found {self.weight_decay!r}.")
        if self.gpu_memory_gb is not None:
            positive("gpu_memory_gb", self.gpu_memory_gb)
        lora.parse_targets(self.lora_targets)

    def identity(self) -> dict[str, Any]:
        """What must not change when a run resumes: the rows, their order and the adapter's shape."""
        return {k: getattr(self, k) for k in ("seq_len", "batch_size", "grad_accum", "seed", "lora_rank",
                                              "lora_alpha", "lora_targets")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _start_data_parallel(device: Optional[str]) -> torch.device:
    """The training device; under torchrun with N processes, each rank's (GPU LOCAL_RANK, or the CPU with gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU. Use --device cpu, or install a "
                           "CUDA build of torch.")
    if world > 1:
        if wanted.type == "cuda":
            wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(wanted)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    elif wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return wanted


@dataclass
class Prepared:
    """Everything checked and read before the weights: the run can still be refused cheaply here."""

    opts: FinetuneOptions
    ckpt_dir: Path
    tokenizer_path: Path
    params: ModelArgs
    config: lora.LoRAConfig
    inputs: torch.Tensor  # (rows, seq_len) int64
    targets: torch.Tensor  # (rows, seq_len) int64, -100 where no loss is counted
    eval_inputs: Optional[torch.Tensor]
    eval_targets: Optional[torch.Tensor]
    data_sha256: str
    total_steps: int
    start_step: int
    state: Optional[dict]
    device: torch.device
    dtype: torch.dtype


def prepare(opts: FinetuneOptions, device: torch.device) -> Prepared:
    opts.check()
    _, world = _world()
    data_path = Path(opts.data).expanduser()
    if not data_path.is_file():
        raise FileNotFoundError(f"--data {data_path} does not exist. Pass a JSONL file with one example per line.")
    out = Path(opts.out).expanduser()
    state = None
    if opts.resume:
        if not (out / adapter.STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {out} holds no saved run ({adapter.STATE_FILE} is missing). Start the "
                                    "run without --resume, or point --out at the directory of the run to resume.")
        adapter.read_config(out)  # the saved adapter's config and weights file, whole
        state = _read_state(out / adapter.STATE_FILE)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; nothing in it is overwritten. Pass "
                              "--resume to continue the run saved there, or choose another --out.")
    ckpt_dir, tokenizer_path = resolve_paths(opts.ckpt_dir, opts.tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    params = ModelArgs.from_json(ckpt_dir / "params.json", max_seq_len=opts.seq_len, max_batch_size=opts.batch_size)
    if params.vocab_size == -1:
        params = dataclasses.replace(params, vocab_size=tokenizer.n_words)
    check_vocab_size(tokenizer, params.vocab_size, source=str(ckpt_dir / "params.json"))
    context, source = checkpoint_context_length(ckpt_dir, params)
    if context is not None and opts.seq_len > context and not opts.allow_long_context:
        raise ValueError(f"--seq_len {opts.seq_len} is above the {context} tokens this model was trained for "
                         f"({source}). Lower --seq_len, or pass --allow_long_context to train past it anyway.")
    config = lora.LoRAConfig(int(opts.lora_rank), float(opts.lora_alpha), lora.parse_targets(opts.lora_targets),
                             lora.ModelShape.of(params))
    config.check()
    check_out_room(out, config, resuming=state is not None)
    chat_format = get_chat_format(chat_format_name(opts.chat_format, read_checkpoint_meta(ckpt_dir), tokenizer),
                                  tokenizer)
    pad_id = tokenizer.eos_id

    def packed(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return data.pack(data.read_examples(path, tokenizer, chat_format), opts.seq_len, pad_id)

    inputs, targets = packed(data_path)
    eval_inputs = eval_targets = None
    if opts.eval_data is not None:
        eval_path = Path(opts.eval_data).expanduser()
        if not eval_path.is_file():
            raise FileNotFoundError(f"--eval_data {eval_path} does not exist. Pass a JSONL file like --data's.")
        eval_inputs, eval_targets = packed(eval_path)
    if not bool((targets != -100).any()):
        raise ValueError(f"--data {data_path} has no token to learn: every example's trained part is empty.")
    rows_per_step = opts.batch_size * opts.grad_accum * world
    if opts.steps is not None:
        total = int(opts.steps)
    else:
        total = max(1, math.ceil(float(opts.epochs if opts.epochs is not None else 1) * inputs.shape[0] / rows_per_step))
    sha = _sha256(data_path)
    start = 0
    if state is not None:
        mismatch = {k: (v, opts.identity()[k]) for k, v in state["identity"].items() if opts.identity()[k] != v}
        if state["world_size"] != world:
            mismatch["processes"] = (state["world_size"], world)
        if state["data_sha256"] != sha:
            mismatch["data"] = ("the saved run's file", f"a changed {data_path}")
        if mismatch:
            shown = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in mismatch.items())
            raise ValueError(f"--resume: this run differs from the one saved in {out}: {shown}. Resume with the "
                             "saved run's flags and data, or start a new run with another --out.")
        start = int(state["step"])
        if start >= total:
            raise ValueError(f"--resume: the run in {out} already did {start} steps and this one asks for {total}. "
                             "Raise --steps (or --epochs) to train further.")
    dtype = parse_dtype(opts.dtype, flag="--dtype") if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return Prepared(opts, ckpt_dir, tokenizer_path, params, config, inputs, targets, eval_inputs, eval_targets, sha,
                    total, start, state, device, dtype)


_STATE_KEYS = ("version", "step", "identity", "world_size", "data_sha256", "optimizer", "adapter", "history")


def _read_state(path: Path) -> dict:
    """The trainer state a run saved, read whole and checked for its keys: a damaged file is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types on a truncated or foreign file
        detail = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"--resume: {path} could not be read ({detail}): it is truncated or damaged. Start a new run with another --out; the adapter saved "
                         "beside it is still usable with --lora.") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} was written by another version of llama_offload; start a new run.")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"--resume: {path} lacks {', '.join(missing)}: it is damaged. Start a new run with another "
                         "--out.")
    return state


def check_out_room(out: Path, config: lora.LoRAConfig, *, resuming: bool) -> int:
    """Refuse, before any weight is read, an --out that cannot be written or whose disk cannot hold the saves;
    return the bytes asked for.

    Every save writes the adapter and the trainer state into a temporary sibling of --out, then swaps it in
    for the previous save: at the moment of the swap both are on disk, so the disk must hold two saves (one
    more when resuming, the run's own save being there already). Leftovers of killed runs beside --out are
    removed by the probe (cleanup.remove_stale), before the free space is measured."""
    one = adapter.save_bytes(config)
    need = one if resuming else 2 * one
    where = existing_ancestor(out)
    try:
        remove_tree(new_temp_dir(where, out.name))  # a real write: permissions, a read-only mount, root or not
    except OSError as e:
        raise PermissionError(f"--out {out} cannot be written: {where} is not writable ({e.strerror or e}). Choose an "
                              "--out in a directory you can write to.") from None
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(f"Not enough free disk space for --out {out}: its saves (adapter and trainer "
                      f"state, {one / 2**20:.1f} MiB each, {'one more' if resuming else 'two'} on disk while a save "
                      f"replaces the previous one) need about {need / 2**20:.1f} MiB, and the disk of {where} has "
                      f"{free / 2**20:.1f} MiB free. Free some space, choose an --out on another disk, or lower "
                      "--lora_rank.")
    return need


def step_rows(step: int, rows_per_step: int, n_rows: int, seed: int) -> torch.Tensor:
    """The packed rows of optimizer step ``step`` over every rank, in the fixed order (module docstring)."""
    first = step * rows_per_step
    out = []
    for k in range(first, first + rows_per_step):
        epoch, at = divmod(k, n_rows)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[at]))
    return torch.tensor(out, dtype=torch.long)


class Trainer:
    """The model, the adapter, the optimizer and the step; ``finetune`` drives it."""

    def __init__(self, prep: Prepared, *, show_progress: bool = True):
        self.prep, opts, device = prep, prep.opts, prep.device
        self.rank, self.world = _world()
        weight_bytes = _stored_bytes(prep)
        offload_activations = opts.offload_activations if opts.offload_activations is not None else device.type == "cuda"
        lora_params = sum(r * (i + o) for r, (o, i) in
                          ((prep.config.rank, prep.config.shape.matrix(t)) for t in prep.config.targets)) * prep.params.n_layers
        self.plan = budget.plan_training(
            prep.params, block_bytes=weight_bytes[0], fixed_weight_bytes=weight_bytes[1], lora_params=lora_params,
            seq_len=opts.seq_len, batch_size=opts.batch_size, itemsize=prep.dtype.itemsize, lora_rank=prep.config.rank,
            offload_activations=bool(offload_activations), gpu_memory_gb=opts.gpu_memory_gb)
        self.model = load_model(prep.ckpt_dir, max_seq_len=opts.seq_len, max_batch_size=opts.batch_size,
                                dtype=prep.dtype, vocab_size=prep.params.vocab_size, model_parallel_size=1,
                                show_progress=show_progress and self.rank == 0)
        torch.manual_seed(opts.seed)  # every rank draws the same initial adapter
        self.adapter = lora.LoRAAdapter(prep.config, device)
        lora.attach(self.model, self.adapter)
        for module in (self.model.tok_embeddings, self.model.norm, self.model.output):
            module.to(device)
        self.runner = paged.BlockRunner(self.model.layers, device,
                                        resident=self.plan.resident_layers if device.type == "cuda" else None,
                                        offload_activations=bool(offload_activations),
                                        autocast_dtype=torch.bfloat16 if prep.dtype == torch.bfloat16 else None,
                                        ffn_chunk=budget.FFN_CHUNK_TOKENS)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.history: list[dict] = []
        if prep.state is not None:
            self.adapter.load_tensors(prep.state["adapter"], str(opts.out))
            self.optimizer.load_state_dict(prep.state["optimizer"])
            self.history = list(prep.state["history"])
        self.freqs_cis = paged.rope_table(self.model, opts.seq_len, device)
        self.chunk = budget.loss_chunk_tokens(prep.params.vocab_size)

    def loss_fn(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        return chunked_cross_entropy(h, weight, targets, chunk_tokens=self.chunk, reduction=reduction)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

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
            part = slice(micro * opts.batch_size, (micro + 1) * opts.batch_size)
            total += paged.paged_loss_and_backward(self.model, self.runner, inputs[part], targets[part],
                                                   self.freqs_cis, max(count, 1.0), self.loss_fn).double()
        self._sum_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._all_reduce(total).item() / max(count, 1.0)
        return loss, inputs.numel() * self.world

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

    def save(self, step: int) -> Path:
        prep = self.prep
        state = {"version": STATE_VERSION, "step": step, "identity": prep.opts.identity(), "world_size": self.world,
                 "data_sha256": prep.data_sha256, "optimizer": self.optimizer.state_dict(),
                 "adapter": self.adapter.tensors(), "history": self.history}
        return adapter.save_adapter(self.adapter, Path(prep.opts.out).expanduser(), state)


def _stored_bytes(prep: Prepared) -> tuple[int, int]:
    """(one block, embedding + norm + head) in the training dtype, from the shapes: quantized blocks count less
    on the GPU, so this errs towards fewer resident blocks."""
    p = prep.params
    item = prep.dtype.itemsize
    block = sum(o * i for o, i in (lora.ModelShape.of(p).matrix(t) for t in lora.TARGETS)) + 2 * p.dim
    return block * item, (2 * p.vocab_size * p.dim + p.dim) * item


def finetune(opts: FinetuneOptions, *, show_progress: bool = True) -> Path:
    """Run (or resume) a fine-tuning job; returns the adapter directory."""
    device = _start_data_parallel(opts.device)
    prep = prepare(opts, device)
    rank, world = _world()
    trainer = Trainer(prep, show_progress=show_progress)
    if rank == 0:
        print(f"llama_offload finetune: {prep.inputs.shape[0]} rows of {opts.seq_len} tokens; {world} process{'es' if world > 1 else ''}; "
              f"LoRA rank {prep.config.rank} on {','.join(prep.config.targets)}; {prep.total_steps} steps"
              + (f" (resuming after step {prep.start_step})" if prep.start_step else "")
              + (f"; {trainer.plan.describe()}" if device.type == "cuda" else f"; on {device}"), file=sys.stderr)
    progress = Progress(prep.total_steps, prep.start_step, device, enabled=show_progress and rank == 0)
    step = prep.start_step
    try:
        while step < prep.total_steps:
            start = time.perf_counter()
            loss, tokens = trainer.train_step(step)
            step += 1
            eval_loss = trainer.eval_loss() if step % opts.eval_every == 0 or step == prep.total_steps else None
            record = {"step": step, "loss": loss, "seconds": time.perf_counter() - start}
            if eval_loss is not None:
                record["eval_loss"] = eval_loss
            trainer.history.append(record)
            progress.update(step, loss, tokens, eval_loss)
            if step % opts.save_every == 0 and step < prep.total_steps and rank == 0:
                trainer.save(step)
    except KeyboardInterrupt:
        if rank == 0 and step > prep.start_step:
            try:
                trainer.save(step)
                print(f"\nllama_offload finetune: interrupted; saved step {step} in {opts.out}; continue with "
                      "--resume", file=sys.stderr)
            except adapter.SaveError as e:  # the signal still decides the exit; the reason the save failed is shown
                print(f"\nllama_offload finetune: interrupted; step {step} was not saved: {e}", file=sys.stderr)
        raise
    out = trainer.save(step) if rank == 0 else Path(opts.out)
    if world > 1:
        dist.barrier()
    return out
