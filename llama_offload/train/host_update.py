"""Full fine-tuning's weight update: every weight trains, the optimizer runs on the CPU, overlapped with the GPU.

    units     the embedding, each block, and the final norm with the output head. A unit's parameters live in
              one flat host buffer, its *home*: a paged block's pinned page (the pager copies it in), or a buffer
              of its own, copied to the GPU after each update when the unit is resident there
    host      per unit: fp32 master weights (one flat tensor) and AdamW moments (host_adamw.py)
    backward  as a unit finishes (paged.BlockRunner calls ``collect`` and ``done``), its gradients, summed in fp32
              on the GPU, are copied out on a copy stream into pinned staging. A worker thread adds them to the
              unit's host gradient and, on the step's last micro-batch, steps the optimizer and writes the new
              16-bit weights into the home, while the GPU goes on with the blocks before it
    forward   before unit u is used again (its page copied in, its resident copy read), the host waits for u's
              update (``before_use``): the next step streams the updated weights

Clipping by global norm needs every gradient before any update. With ``max_grad_norm`` the worker keeps each
unit's gradient and its per-parameter norms during the backward; when it ends (``end_step``) the coefficient is
known and the updates are queued in forward order (embedding, block 0, ..., head), so they overlap the next
step's forward instead: block i waits only for its own update. The coefficient is torch's own
(``clip_grad_norm_``: max_norm / (norm + 1e-6), at most 1, multiplied into every gradient), from the same
per-parameter norms in the same order, so the result equals plain clipping (tests/train/test_full_finetune.py).

Data parallel (torchrun): unit u belongs to rank u % world. Each unit's gradient is reduced to its owner where it
was computed, before the copy out; only the owner holds u's master weights and moments and steps them; before u is
used again its new 16-bit weights are broadcast from the owner's home. Optimizer state and gradients are thus
sharded across ranks (ZeRO-2 style) and host memory for them divides by the world size.

The host thread's waits on the optimizer (``exposed_s``) are what the GPU can wait for: the benchmark reports
them as the optimizer's exposed time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from llama_offload.offload.pager import ALIGN, pinned_host_buffer
from llama_offload.train.host_adamw import HostAdamW

Part = Union[int, str]  # a block index, "embedding" or "head"


@dataclass
class Unit:
    """One group of parameters updated together, laid out in one flat host buffer."""

    name: str
    params: list[nn.Parameter]
    views: list[torch.Tensor]  # each parameter's view of ``home``
    home: torch.Tensor  # uint8, on the host: what the next forward reads, through the pager or an upload
    device_home: Optional[torch.Tensor] = None  # uint8 on the GPU for a resident unit; the parameters view it
    device_views: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each parameter's first element in the flat fp32 tensors

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.params[-1].numel() if self.params else 0


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` one after another, each aligned as the pager aligns them; and the total."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at = (at + t.numel() * t.element_size() + ALIGN - 1) // ALIGN * ALIGN
    return offsets, at


def _views(flat: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[torch.Tensor]:
    return [flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(tensors, offsets)]


def _element_offsets(params: Sequence[torch.Tensor]) -> list[int]:
    out, at = [], 0
    for p in params:
        out.append(at)
        at += p.numel()
    return out


def resident_unit(name: str, params: list[nn.Parameter], device: torch.device) -> Unit:
    """A unit whose parameters stay where the model computes with them: on a GPU they view a device buffer that
    is refreshed from a pinned home after each update; on the CPU they view the home itself."""
    offsets, nbytes = _layout(params)
    if device.type == "cuda":
        home = pinned_host_buffer(nbytes)
        device_home = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        home, device_home = torch.empty(nbytes, dtype=torch.uint8), None
    views = _views(home, params, offsets)
    for p, v in zip(params, views):
        v.copy_(p.data)
    unit = Unit(name, params, views, home, device_home, offsets=_element_offsets(params))
    if device_home is not None:
        device_home.copy_(home)
        unit.device_views = _views(device_home, params, offsets)
        for p, v in zip(params, unit.device_views):
            p.data = v
    else:
        for p, v in zip(params, views):
            p.data = v
    return unit


def paged_unit(name: str, pages: Any) -> Unit:
    """A paged block's unit: its home is the block's pinned page (offload.pager.FlatPages), which the pager
    copies to the GPU each time the block runs. The parameters point at the page between uses."""
    params = [t for t in pages.tensors if isinstance(t, nn.Parameter)]
    offsets = [o for t, o in zip(pages.tensors, pages.offsets) if isinstance(t, nn.Parameter)]
    views = _views(pages.host, params, offsets)
    return Unit(name, params, views, pages.host, offsets=_element_offsets(params))


class HostUpdate:
    """The update pipeline of one training run (module docstring); implements paged.TrainedWeights."""

    def __init__(self, units: list[Unit], parts: dict[Part, int], device: torch.device, *, lr: float,
                 weight_decay: float, optim_state: str, grad_accum: int, max_grad_norm: Optional[float],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.units, self.parts, self.device = units, parts, device
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.owned = [u for u in range(len(units)) if u % self.world == self.rank]
        # Master weights: the owner's fp32 copy of what the model holds now (exact for 16-bit weights).
        self.masters: dict[int, torch.Tensor] = {
            u: torch.cat([p.detach().reshape(-1).float().cpu() for p in units[u].params]) for u in self.owned}
        order = sorted(self.owned)
        self.optimizer = HostAdamW([self.masters[u] for u in order], lr=lr, betas=betas, eps=eps,
                                   weight_decay=weight_decay, state=optim_state)
        self._slot = {u: k for k, u in enumerate(order)}  # unit -> its index in the optimizer
        keep_grads = grad_accum > 1 or max_grad_norm is not None
        self.grads: dict[int, Optional[torch.Tensor]] = {u: None for u in self.owned}
        self._keep_grads = keep_grads
        self.norms: dict[int, list[torch.Tensor]] = {}  # unit -> its parameters' gradient norms, clipping only
        self.micro = 0
        self._device_grads: dict[int, torch.Tensor] = {}
        self._pending: dict[int, Future] = {}  # unit -> the job that writes its home next
        self._absorbing: list[Future] = []
        self._fresh: set[int] = set()  # units updated since the forward last used them
        self._uploaded: dict[int, torch.cuda.Event] = {}
        self.exposed_s = 0.0  # host time spent waiting for the optimizer
        self.optimizer_s = 0.0  # worker time spent in optimizer steps (and weight writes)
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-offload-optimizer")
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)  # gradients out
            self._upload_stream = torch.cuda.Stream(device)  # resident units' new weights in
            biggest = max(units[u].numel for u in self.owned) if self.owned else 0
            # Two pinned staging buffers: one being filled by the copy engine while the worker reads the other.
            self._staging = [pinned_host_buffer(4 * biggest).view(torch.float32) for _ in range(2)] if biggest else []
            self._staging_free = [threading.Event() for _ in self._staging]
            for e in self._staging_free:
                e.set()
            self._next_staging = 0

    # --- the schedule's side (paged.TrainedWeights) ---------------------------------------------------------

    def before_use(self, part: Part) -> None:
        self._ready(self.parts[part])

    def _ready(self, u: int) -> None:
        """Unit u's update done, shared with every rank and uploaded to the GPU where it is resident."""
        job = self._pending.pop(u, None)
        if job is not None:
            self._wait(job)
        if u in self._fresh:
            self._fresh.discard(u)
            unit = self.units[u]
            if self.world > 1:
                self._share(u)
                if unit.device_home is not None:
                    self._upload(u, torch.cuda.current_stream(self.device))
            if unit.device_home is not None:
                # The worker queued the upload on its own stream as soon as the update was written (one process),
                # or it was queued just above: compute waits for it, the host does not.
                torch.cuda.current_stream(self.device).wait_event(self._uploaded[u])

    def collect(self, part: Part) -> None:
        u = self.parts[part]
        unit = self.units[u]
        g = self._device_grads.get(u)
        if g is None:
            g = self._device_grads[u] = torch.zeros(unit.numel, dtype=torch.float32, device=unit.params[0].device)
        for p, at in zip(unit.params, unit.offsets):
            if p.grad is not None:
                g[at : at + p.numel()].add_(p.grad.reshape(-1))
                p.grad = None

    def done(self, part: Part) -> None:
        u = self.parts[part]
        g = self._device_grads.pop(u, None)
        if g is None:  # the unit took no part in the loss (cannot happen for a LLaMA): a zero gradient
            g = torch.zeros(self.units[u].numel, dtype=torch.float32, device=self.units[u].params[0].device)
        owner = u % self.world
        last = self.micro == self.grad_accum - 1
        if last and self.max_grad_norm is None:
            self._fresh.add(u)  # on every rank: each takes part in sharing the owner's new weights
        if self.world > 1:
            dist.reduce(g, dst=owner)
        if owner != self.rank:
            return
        if not self._cuda:
            self._submit_absorb(u, g, None, None, last)
            return
        k = self._take_staging()
        staging = self._staging[k][: g.numel()]
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            staging.copy_(g, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        g.record_stream(self._copy_stream)  # its memory is reused only after the copy out has read it
        self._submit_absorb(u, staging, copied, k, last)

    # --- optimizer steps --------------------------------------------------------------------------------------

    def begin_micro(self, micro: int) -> None:
        self.micro = micro

    def end_step(self) -> Optional[float]:
        """After the step's last micro-batch: with clipping, the global norm and the queued updates; returns the
        gradient norm before clipping (None without clipping, whose updates are queued during the backward)."""
        if self.max_grad_norm is None:
            return None
        for job in self._absorbing:
            self._wait(job)
        self._absorbing.clear()
        # torch.nn.utils.clip_grad_norm_'s arithmetic: the norm of the per-parameter norms, in parameter order.
        per_param = [n for u in range(len(self.units)) for n in self._norms_of(u)]
        norms = torch.stack(per_param)
        if self.world > 1:  # each parameter's norm comes from its owner; the others add zeros
            on = norms.to(self.device) if dist.get_backend() == "nccl" else norms
            dist.all_reduce(on)
            norms = on.cpu()
        total = torch.linalg.vector_norm(norms, 2.0)
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for u in range(len(self.units)):
            if u % self.world == self.rank:
                self._pending[u] = self._worker.submit(self._timed_step, u, self.grads[u], coef)
            self._fresh.add(u)
        self.norms.clear()
        return float(total)

    def _norms_of(self, u: int) -> list[torch.Tensor]:
        if u in self.norms:
            return list(self.norms[u])
        return [torch.zeros((), dtype=torch.float32) for _ in self.units[u].params]

    def settle(self) -> None:
        """Every queued update done and shared (before a save reads the weights); every rank calls it."""
        for job in self._absorbing:
            self._wait(job)
        self._absorbing.clear()
        for u in range(len(self.units)):
            self._ready(u)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # --- the worker's jobs -------------------------------------------------------------------------------------

    def _submit_absorb(self, u: int, grad: torch.Tensor, copied: Optional[torch.cuda.Event], staging: Optional[int],
                       last: bool) -> None:
        job = self._worker.submit(self._absorb, u, grad, copied, staging, self.micro == 0, last)
        if last and self.max_grad_norm is None:
            self._pending[u] = job
        else:
            self._absorbing.append(job)

    def _absorb(self, u: int, grad: torch.Tensor, copied: Optional[torch.cuda.Event], staging: Optional[int],
                first: bool, last: bool) -> None:
        """A unit's gradient of one micro-batch has arrived (or is arriving: ``copied`` marks the copy's end)."""
        if copied is not None:
            copied.synchronize()
        try:
            if self._keep_grads:
                acc = self.grads[u]
                if acc is None:
                    acc = self.grads[u] = torch.empty(grad.numel(), dtype=torch.float32)
                if first:
                    acc.copy_(grad)
                else:
                    acc.add_(grad)  # plain autograd's accumulation: the same additions in the same order
                self._release(staging)
                staging, grad = None, acc
            if last and self.max_grad_norm is not None:
                unit = self.units[u]
                self.norms[u] = [torch.linalg.vector_norm(grad[at : at + p.numel()], 2.0)
                                 for p, at in zip(unit.params, unit.offsets)]
            elif last:
                self._timed_step(u, grad, None)
        finally:
            self._release(staging)

    def _release(self, staging: Optional[int]) -> None:
        if staging is not None:
            self._staging_free[staging].set()

    def _timed_step(self, u: int, grad: torch.Tensor, coef: Optional[torch.Tensor]) -> None:
        start = time.perf_counter()
        if coef is not None:
            grad.mul_(coef)
        self.optimizer.step(self._slot[u], grad)
        self._write_home(u)
        with self._lock:
            self.optimizer_s += time.perf_counter() - start

    def _write_home(self, u: int) -> None:
        """The new 16-bit weights, rounded from the masters into the home the next forward reads; a unit resident
        on the GPU is uploaded from there at once, on the upload stream. The GPU has finished reading the unit
        by now: its gradient, which the worker waited for, was copied out after the unit's last kernels."""
        uploaded = self._uploaded.pop(u, None)
        if uploaded is not None:
            uploaded.synchronize()  # the previous upload has read the home
        unit, master = self.units[u], self.masters[u]
        for p, view, at in zip(unit.params, unit.views, unit.offsets):
            view.copy_(master[at : at + p.numel()].view(view.shape))
        if unit.device_home is not None and self.world == 1:
            self._upload(u, self._upload_stream)

    def _upload(self, u: int, stream: "torch.cuda.Stream") -> None:
        unit = self.units[u]
        with torch.cuda.stream(stream):
            unit.device_home.copy_(unit.home, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._uploaded[u] = done

    # --- helpers ---------------------------------------------------------------------------------------------

    def _take_staging(self) -> int:
        k = self._next_staging
        self._next_staging = (k + 1) % len(self._staging)
        event = self._staging_free[k]
        if not event.is_set():
            start = time.perf_counter()
            event.wait()
            self.exposed_s += time.perf_counter() - start
        event.clear()
        return k

    def _wait(self, job: Future) -> None:
        start = time.perf_counter()
        job.result()  # re-raises what the worker raised
        self.exposed_s += time.perf_counter() - start

    def _share(self, u: int) -> None:
        """The owner's new weights of unit u, broadcast into every rank's home."""
        home, owner = self.units[u].home, u % self.world
        if dist.get_backend() == "nccl":
            on_device = home.to(self.device, non_blocking=False) if owner == self.rank else torch.empty_like(home, device=self.device)
            dist.broadcast(on_device, src=owner)
            if owner != self.rank:
                home.copy_(on_device)
        else:
            dist.broadcast(home, src=owner)

    # --- resume ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"rank": self.rank, "world": self.world, "masters": {u: self.masters[u] for u in self.owned},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world") != self.world or state.get("rank") != self.rank:
            raise ValueError(f"the saved optimizer state is rank {state.get('rank')} of {state.get('world')} "
                             f"processes; this is rank {self.rank} of {self.world}. Resume with the saved run's "
                             "process count.")
        masters = state["masters"]
        for u in self.owned:
            saved = masters.get(u)
            if saved is None or saved.shape != self.masters[u].shape:
                raise ValueError(f"the saved master weights of {self.units[u].name} do not fit this model; resume "
                                 "with the checkpoint the run started from.")
            self.masters[u].copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        for u in range(len(self.units)):
            if u in self.masters:
                self._write_home(u)
            self._fresh.add(u)  # shared and uploaded before the first use
