"""AdamW for full fine-tuning with the fp32 master weights and the moments in host memory, one unit at a time.

A unit is one flat fp32 CPU tensor of master weights (a transformer block's parameters, the embedding, the final
norm, the output head). The GPU loop sends a unit's fp32 gradient as soon as backward has produced it, and a
worker thread calls ``HostAdamW.step(unit, grad)``: the unit's masters are updated in place while the GPU goes
on with the next block. The arithmetic is ``torch.optim.AdamW``'s (decoupled weight decay)::

    p *= 1 - lr * wd;  m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g * g
    p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

with ``t`` the unit's own step count (units are stepped independently, in any order).

The moments m and v are kept in one of three storages (``state``):

    fp32  8 bytes a parameter. Equal to torch.optim.AdamW within fp32 rounding (by default bit for bit
          torch.optim.AdamW(fused=True): the same kernel).
    bf16  4 bytes. m and v stored in bfloat16, every update computed in fp32 (load, update, store back). Rounded
          to nearest, an increment of v below half a bfloat16 step (2**-9 relative) is lost: with b2 = 0.999 that
          is every increment after a few hundred steps, v stalls near a quarter of a steady gradient's square
          and the steps grow to 1.5-1.9 times AdamW's. So the stores round stochastically by default (unbiased:
          up with probability dropped bits / 2**16), with bits that are a hash of the element's index, the unit
          and its step count (csrc/cpu_adamw.cpp's dither): the same inputs give the same bits on any thread
          count and after a resume. ``stochastic_rounding=False`` rounds to nearest even.
    int8  2 + 8/256 bytes. Blocks of 256 elements (BLOCK), two fp32 scales each:
          m: signed absmax-linear int8, code = round(m * 127 / absmax), m = code * absmax / 127;
          v: its square root as uint8 against the block's largest, code = ceil(sqrt(v) * 255 / max),
          v = (code * max / 255)**2. The square root spends the 8 bits on the range that sets the step size
          (the step divides by sqrt(v)), and rounding *up* keeps a nonzero v from being stored as 0. To the
          nearest code, a small v beside a large one in its block becomes 0; at a step where that element's
          gradient is 0 (an embedding row not in the batch) v is then 0, the denominator eps and the step
          lr * m / eps: hundreds of lr where AdamW's is at most a few (tests/train/test_host_adamw.py). Rounding
          up errs only toward smaller steps; the price is that an element whose sqrt(v) is under 1/255 of its
          block's largest steps as if it were 1/255 of it, so slower than AdamW would.
          Rounding up also keeps a code where sqrt(v) shrinks by less than one code in a step: with b2 = 0.999,
          an element's v decays only as its block's largest does (whose code, 255, is exact), the safe direction.

The steps, by default: fp32 moments by torch's fused CPU AdamW (``torch._fused_adamw_``: one pass over memory,
within half a unit in the last place of torch.optim.AdamW); bf16 and int8 moments by the native kernel
(``kernels/csrc/cpu_adamw.cpp``, OpenMP, ``-march=native``), one pass as well: grad, master, m and v read, master,
m and v written, no temporaries. Where the kernel does not build (no compiler, ``LLAMA_OFFLOAD_NATIVE=0``,
``native=False``) torch's kernels step bf16 and int8 chunk by chunk (CHUNK elements, fp32 temporaries of 4 MiB
that stay in the caches): the moments widened to fp32, stepped by the fused kernel, and stored back; on 2 cores
(bench_host_adamw.py) int8 takes 3 times the native kernel's time, bf16 9 times (its stochastic rounding's hash
in torch's integer ops; 2 times without). Where torch has no fused CPU AdamW (before 2.4), fp32 takes the native
kernel, or torch.optim.AdamW's own operations chunk by chunk. Every path uses the
threads torch is allowed (``torch.set_num_threads``) and is deterministic: every element, and every int8 block,
is computed by one thread from its own inputs, so no bit depends on the scheduling. The paths share the state
layout (a state_dict from one resumes on the other) but not every last bit: the fused kernel and the native one
round the same formula in different orders (fp32 masters within a few units in the last place), after which an
int8 code can round the other way, and int8 runs on the two paths drift apart as two roundings do.

Threads: ``step`` for different units may run concurrently (each thread has its own temporaries); one unit must
never be stepped by two threads at once. ``step`` only reads ``grad``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from llama_offload.kernels import cpu_adamw

STATES = ("fp32", "bf16", "int8")
BLOCK = cpu_adamw.BLOCK  # int8: elements per quantization block (one fp32 scale for m and one for sqrt(v))
CHUNK = 1 << 20  # torch path: elements per chunk (a multiple of BLOCK), so temporaries stay 4 MiB each
TINY = cpu_adamw.TINY  # int8: the smallest block maximum a scale divides by (an all-zero block stays zero)

_MOMENT_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                  "int8": (torch.int8, torch.uint8)}


def state_bytes_per_param(state: str) -> float:
    """Bytes of moments a parameter costs in host memory: fp32 8, bf16 4, int8 2 plus two fp32 scales a block."""
    _check_state(state)
    return {"fp32": 8.0, "bf16": 4.0, "int8": 2.0 + 8.0 / BLOCK}[state]


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"HostAdamW: state must be one of {', '.join(STATES)}; got {state!r}")


_fused: Optional[bool] = None


def fused_available() -> bool:
    """Whether this torch has the fused CPU AdamW kernel (``torch._fused_adamw_`` on CPU tensors, torch 2.4+)."""
    global _fused
    if _fused is None:
        try:
            p, g, m, v = (torch.ones(4) for _ in range(4))
            torch._fused_adamw_([p], [g], [m], [v], [], [torch.ones(())], lr=0.1, beta1=0.9, beta2=0.999,
                                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
            _fused = bool(torch.isfinite(p).all())
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _fused = False
    return _fused


def _int32(x: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _round_stochastically(m: torch.Tensor, v: torch.Tensor, start: int, key: int) -> None:
    """Rounds fp32 m and v (elements start.. of a unit) to bfloat16 values in place, stochastically: the bits
    csrc/cpu_adamw.cpp's dither(index, key) draws, added below bfloat16's 16 bits, which are then kept (up with
    probability dropped bits / 2**16: unbiased). The hash in int32, whose products wrap as the kernel's uint32
    ones do, and whose right shifts sign-extend, hence the masks: the same bits as the native kernel."""
    n = m.numel()
    if start + n <= 1 << 31:
        h = torch.arange(start, start + n, dtype=torch.int32)
    else:  # the kernel hashes the index's low 32 bits
        h = torch.arange(start, start + n, dtype=torch.int64).bitwise_and_(0xFFFFFFFF)
        h = torch.where(h >= 1 << 31, h - (1 << 32), h).to(torch.int32)
    h.mul_(cpu_adamw.DITHER_INDEX_MUL).add_(_int32(key))
    h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))
    h.mul_(cpu_adamw.DITHER_MIX1)
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    h.mul_(cpu_adamw.DITHER_MIX2)
    h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))
    m.view(torch.int32).add_(h & 0xFFFF).bitwise_and_(-0x10000)  # -0x10000: 0xFFFF0000 as an int32
    v.view(torch.int32).add_(h.bitwise_right_shift_(16).bitwise_and_(0xFFFF)).bitwise_and_(-0x10000)


@dataclass
class _Unit:
    """One unit's moments: m and v (int8: the codes, padded to whole blocks, and a scale a block) and its step."""

    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    exp_avg_scale: Optional[torch.Tensor] = None
    exp_avg_sq_scale: Optional[torch.Tensor] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class HostAdamW:
    """AdamW over units of fp32 master weights in host memory; see the module's docstring.

    ``masters``: the caller's 1-D contiguous fp32 CPU tensors, one a unit, updated in place by ``step``.
    ``state``: how the moments are stored ("fp32", "bf16", "int8"). ``stochastic_rounding`` (bf16 only): round the
    moments stochastically with hashed, reproducible bits (the default), else to nearest even. ``native``: None
    uses the native kernel where it builds, except for fp32 moments where torch has its fused CPU AdamW (as fast,
    and closer to torch.optim.AdamW); True uses the native kernel for every storage (a ValueError where it does
    not build); False uses torch's kernels only.
    ``lr`` may be changed between steps (``opt.lr = ...``) or passed to ``step`` with the gradient.
    """

    def __init__(self, masters: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state: str = "fp32",
                 stochastic_rounding: bool = True, native: Optional[bool] = None) -> None:
        _check_state(state)
        if not lr >= 0.0:
            raise ValueError(f"HostAdamW: lr must be >= 0; got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"HostAdamW: betas must each be in [0, 1); got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"HostAdamW: eps and weight_decay must be >= 0; got eps={eps}, weight_decay={weight_decay}")
        for i, p in enumerate(masters):
            if not isinstance(p, torch.Tensor) or p.dtype != torch.float32 or p.device.type != "cpu" \
                    or p.dim() != 1 or not p.is_contiguous():
                what = f"{p.dtype} on {p.device} of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p)
                raise ValueError(f"HostAdamW: master {i} must be a 1-D contiguous float32 CPU tensor (a unit's "
                                 f"parameters flattened into one tensor); got {what}")
        if native and cpu_adamw.unavailable_reason() is not None:
            raise ValueError(f"HostAdamW: native=True, but the native kernel is not available: "
                             f"{cpu_adamw.unavailable_reason()}. Pass native=None to use torch's kernels then.")
        self.masters = list(masters)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (float(betas[0]), float(betas[1])), \
            float(eps), float(weight_decay)
        self.state = state
        self.stochastic_rounding = bool(stochastic_rounding)
        # fp32 moments: torch's fused kernel is one pass too, as fast as the native one (measured: 26.5 and 26.0 ms
        # for 50M parameters on 2 cores), and within half a unit in the last place of torch.optim.AdamW.
        self.native = bool(native) if native is not None else \
            not (state == "fp32" and fused_available()) and cpu_adamw.available()
        self._units = [self._zeros(p.numel()) for p in self.masters]
        self._scratch = threading.local()  # the torch path's fp32 temporaries, one pair a thread

    def _zeros(self, numel: int) -> _Unit:
        m_dtype, v_dtype = _MOMENT_DTYPES[self.state]
        if self.state != "int8":
            return _Unit(0, torch.zeros(numel, dtype=m_dtype), torch.zeros(numel, dtype=v_dtype))
        blocks = -(-numel // BLOCK)
        return _Unit(0, torch.zeros(blocks * BLOCK, dtype=m_dtype), torch.zeros(blocks * BLOCK, dtype=v_dtype),
                     torch.zeros(blocks), torch.zeros(blocks))

    def step_count(self, unit: int) -> int:
        """How many steps ``unit`` has taken."""
        return self._units[unit].step

    # --- the step ---------------------------------------------------------------------------------------------

    def step(self, unit: int, grad: torch.Tensor, *, lr: Optional[float] = None) -> None:
        """One AdamW step of ``masters[unit]`` with ``grad`` (1-D contiguous fp32 CPU, the unit's numel), at
        ``lr`` (default ``self.lr``). ``grad`` is only read."""
        if not 0 <= unit < len(self._units):
            raise ValueError(f"HostAdamW.step: unit {unit} is out of range; this optimizer has {len(self._units)} "
                             f"units (0..{len(self._units) - 1})")
        p, u = self.masters[unit], self._units[unit]
        if grad.dtype != torch.float32 or grad.device.type != "cpu" or grad.numel() != p.numel() \
                or not grad.is_contiguous():
            raise ValueError(f"HostAdamW.step: unit {unit}'s gradient must be a contiguous float32 CPU tensor of "
                             f"{p.numel()} elements (its master's); got {grad.dtype} on {grad.device}, "
                             f"{grad.numel()} elements{'' if grad.is_contiguous() else ', not contiguous'}")
        lr = self.lr if lr is None else float(lr)
        u.step += 1
        if p.numel() == 0:
            return
        g = grad.view(-1)
        beta1, beta2 = self.betas
        if self.native:
            # torch's formulas for the scalars, in Python's doubles, so both paths see the same numbers.
            step_size = lr / (1 - beta1 ** u.step)
            bc2_sqrt = (1 - beta2 ** u.step) ** 0.5
            cpu_adamw.adamw_step(p, g, u.exp_avg, u.exp_avg_sq, u.exp_avg_scale, u.exp_avg_sq_scale, lr=lr,
                                 beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=self.weight_decay,
                                 step_size=step_size, bias_correction2_sqrt=bc2_sqrt, dither=self._dither_key(unit))
        elif self.state == "fp32" and fused_available():
            self._adamw(p, g, u.exp_avg, u.exp_avg_sq, u.step, lr)  # one pass, no temporaries to bound
        else:
            self._step_chunks(p, g, u, lr, self._dither_key(unit))

    def _dither_key(self, unit: int) -> Optional[int]:
        """The key of this step's bf16 stochastic rounding (None: to nearest)."""
        if self.state != "bf16" or not self.stochastic_rounding:
            return None
        return cpu_adamw.dither_key(unit, self._units[unit].step)

    def _adamw(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
               lr: float) -> None:
        """AdamW on fp32 tensors: torch's fused CPU kernel, or torch.optim.adamw's single-tensor ops in its order."""
        beta1, beta2 = self.betas
        if fused_available():
            torch._fused_adamw_([p], [g], [m], [v], [], [torch.tensor(float(step))], lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=self.weight_decay, eps=self.eps, amsgrad=False,
                                maximize=False)
            return
        p.mul_(1 - lr * self.weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(self.eps), value=-(lr / (1 - beta1 ** step)))

    def _temporaries(self, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This thread's fp32 m and v of ``numel`` elements, and an int16 buffer for the uint8 codes."""
        scratch = getattr(self._scratch, "buffers", None)
        if scratch is None or scratch[0].numel() < numel:
            size = max(numel, CHUNK)
            scratch = self._scratch.buffers = (torch.empty(size), torch.empty(size),
                                               torch.empty(size, dtype=torch.int16))
        return scratch[0][:numel], scratch[1][:numel], scratch[2][:numel]

    def _step_chunks(self, p: torch.Tensor, g: torch.Tensor, u: _Unit, lr: float, key: Optional[int]) -> None:
        """The torch path chunk by chunk: bf16 and int8 moments widened to fp32 for the step and stored back."""
        n = p.numel()
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            if self.state == "fp32":  # torch without the fused kernel: its ops make chunk-sized temporaries
                self._adamw(p[a:b], g[a:b], u.exp_avg[a:b], u.exp_avg_sq[a:b], u.step, lr)
            elif self.state == "bf16":
                m, v, _ = self._temporaries(b - a)
                m.copy_(u.exp_avg[a:b])
                v.copy_(u.exp_avg_sq[a:b])
                self._adamw(p[a:b], g[a:b], m, v, u.step, lr)
                if key is not None:
                    _round_stochastically(m, v, a, key)
                u.exp_avg[a:b].copy_(m)  # exact after stochastic rounding, to nearest even without it
                u.exp_avg_sq[a:b].copy_(v)
            else:
                self._int8_chunk(p, g, u, a, b, lr)

    def _int8_chunk(self, p: torch.Tensor, g: torch.Tensor, u: _Unit, a: int, b: int, lr: float) -> None:
        """Parameters a..b of an int8 unit: whole blocks (CHUNK is a multiple of BLOCK; the last chunk's padding
        codes stay 0). The operations, in this order, are csrc/cpu_adamw.cpp's block_int8."""
        end = min(a + CHUNK, u.exp_avg.numel())
        m, v, codes = self._temporaries(end - a)
        blocks = slice(a // BLOCK, end // BLOCK)
        mb, vb = m.view(-1, BLOCK), v.view(-1, BLOCK)
        mb.copy_(u.exp_avg[a:end].view(-1, BLOCK)).mul_(u.exp_avg_scale[blocks, None])
        vb.copy_(u.exp_avg_sq[a:end].view(-1, BLOCK)).mul_(u.exp_avg_sq_scale[blocks, None]).square_()
        self._adamw(p[a:b], g[a:b], m[:b - a], v[:b - a], u.step, lr)
        # amax and amin: torch.aminmax over the blocks took 12 times as long as the two of them.
        absmax = torch.maximum(mb.amax(dim=1), mb.amin(dim=1).neg_()).clamp_min_(TINY)
        u.exp_avg_scale[blocks] = absmax / 127
        mb.mul_((127 / absmax)[:, None]).round_()
        u.exp_avg[a:end].view(-1, BLOCK).copy_(mb)
        vb.sqrt_()
        vmax = vb.amax(dim=1).clamp_min_(TINY)
        u.exp_avg_sq_scale[blocks] = vmax / 255
        # Up, so that no nonzero v becomes 0; the clamp catches a block maximum that lands a hair above 255.
        vb.mul_((255 / vmax)[:, None]).ceil_().clamp_max_(255)
        # Through int16: torch's float -> uint8 conversion is not vectorized (5 times as long as both steps).
        u.exp_avg_sq[a:end].copy_(codes.copy_(v))

    # --- resume -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every unit's step count and moments, for resume. The tensors are the optimizer's own (not copies, as
        the fp32 moments of an 8B model are 64 GB): save them before the next ``step``."""
        return {"state": self.state, "block": BLOCK if self.state == "int8" else None,
                "units": [{"step": u.step, **u.tensors()} for u in self._units]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies a ``state_dict`` into this optimizer's moments, after checking that it was made for the same
        storage and the same units. The hyperparameters stay this optimizer's."""
        if not isinstance(state, dict) or "units" not in state or "state" not in state:
            raise ValueError("HostAdamW.load_state_dict: expected a dict from HostAdamW.state_dict() with 'state' "
                             f"and 'units'; got {type(state).__name__}"
                             f"{' with keys ' + str(sorted(state)) if isinstance(state, dict) else ''}")
        if state["state"] != self.state:
            raise ValueError(f"HostAdamW.load_state_dict: the saved moments are stored as {state['state']!r} but this "
                             f"optimizer stores {self.state!r}; build it with state={state['state']!r} to resume")
        if self.state == "int8" and state.get("block") != BLOCK:
            raise ValueError(f"HostAdamW.load_state_dict: the saved int8 moments use blocks of {state.get('block')} "
                             f"elements, this version uses {BLOCK}")
        units = state["units"]
        if len(units) != len(self._units):
            raise ValueError(f"HostAdamW.load_state_dict: the saved state has {len(units)} units, this optimizer "
                             f"has {len(self._units)}; resume with the same model and the same units")
        for i, (saved, mine) in enumerate(zip(units, self._units)):
            step = saved.get("step") if isinstance(saved, dict) else None
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"HostAdamW.load_state_dict: unit {i} has no valid step count (a non-negative "
                                 f"int); got {step!r}")
            for name, t in mine.tensors().items():
                s = saved.get(name)
                if not isinstance(s, torch.Tensor) or s.dtype != t.dtype or s.shape != t.shape:
                    found = f"{s.dtype} of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else repr(s)
                    raise ValueError(f"HostAdamW.load_state_dict: unit {i}'s {name} must be {t.dtype} of shape "
                                     f"{tuple(t.shape)} (a unit of {self.masters[i].numel()} parameters); "
                                     f"got {found}. Was it saved for another model or unit layout?")
        for saved, mine in zip(units, self._units):  # checked all first: a refused state changes nothing
            mine.step = saved["step"]
            for name, t in mine.tensors().items():
                t.copy_(saved[name])
