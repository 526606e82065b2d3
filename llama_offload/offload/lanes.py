"""Calibration of the two lanes a decode step can use: the PCIe lane (pinned host-to-device copies) and the CPU
lane (the host's cores computing a block), measured on this machine and cached there.

The planner (plan.LaneTimes) needs these numbers to split the blocks that are not resident: how long a block's
copy takes, alone and while the cores compute CPU blocks (both read host memory, so the copies may run slower
beside the CPU lane); how long the cores take to compute one at a few step sizes (a
block's CPU time grows with the tokens in a step, its copy time does not), timed while copies stream; which CPU
kernel is fastest (kernels/cpu.py); and the host time of one paged block's launch on the GPU, which the same host
thread spends between CPU blocks. All depend on
shapes, dtype and weight format, not on the weights' values, so they are measured on one random block of the
model's shape, before any weights load: a few seconds, once per machine and shape, then read from
``~/.cache/llama_offload/lanes.json``
(``LLAMA_OFFLOAD_CACHE`` moves it; a cache that cannot be read or written is measured again, never an error).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.offload.block_graphs import BlockGraphs
from llama_offload.model.transformer import KVCache, TransformerBlock
from llama_offload.offload.plan import HostKernel, LaneTimes
from llama_offload.kernels.cpu import kernels_for
from llama_offload.model.cpu_linear import set_cpu_kernel
from llama_offload.model.quant import LINEAR_NAMES, QuantLinear, QuantSpec, quantize_matrix
from llama_offload.model.step import StepShape, attention_mask

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32)  # step sizes the CPU block time is measured at
CALIBRATION_VERSION = 8


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, as taskset or a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads_for(requested: Optional[int], processes: int = 1, cores: Optional[int] = None) -> int:
    """Threads for the CPU lane: ``requested``, or every core but one (the one that drives the GPU), shared
    evenly by the ``processes`` on this host. Refuses a count the cores cannot give."""
    cores = cpu_cores() if cores is None else cores
    share = cores // max(processes, 1)
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"--cpu_threads must be a positive integer, found {requested!r}.")
        if requested > share:
            who = "" if processes == 1 else f" shared by {processes} processes ({share} each)"
            raise ValueError(f"--cpu_threads {requested} is more than the {cores} cores this process may use{who}: "
                             f"the threads would oversubscribe them. Give --cpu_threads {max(share - 1, 1)} or fewer.")
        return requested
    return max(share - 1, 1)


def check_cpu_lane_cores(cpu_blocks: Optional[int], processes: int = 1, cores: Optional[int] = None) -> None:
    """An explicit CPU lane needs a core to compute on beside the one that drives the GPU."""
    cores = cpu_cores() if cores is None else cores
    if cpu_blocks and cores // max(processes, 1) < 2:
        raise ValueError(f"--cpu_blocks {cpu_blocks} needs at least 2 CPU cores per process (one drives the GPU, the "
                         f"others compute the CPU blocks), but this process may use {cores} core(s). Give "
                         "--cpu_blocks 0 to page every block instead.")


def measure_pcie(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 4) -> float:
    """Pinned host-to-device bandwidth in GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


class CopyLoad:
    """Pinned host-to-device copies kept running on a side stream, as the paged blocks' copies run while the
    CPU lane computes: both read host memory, so the CPU blocks are timed under that load."""

    def __init__(self, device: torch.device, gbps: float, nbytes: int = 256 * 2**20):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device=device)
        self.gbps = gbps  # the measured bandwidth: how many copies fill a given time

    def keep_busy(self, seconds: float) -> tuple[int, torch.cuda.Event, torch.cuda.Event]:
        """Queue copies for about ``seconds`` (launching them takes microseconds; they run on their own): the
        bytes queued, and events recorded on the copy stream before and after them."""
        copies = max(1, int(seconds * self.gbps * 1e9 / self.host.numel()) + 1)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            begin.record(self.stream)
            for _ in range(copies):
                self.gpu.copy_(self.host, non_blocking=True)
            end.record(self.stream)
        return copies * self.host.numel(), begin, end

    def drain(self) -> None:
        self.stream.synchronize()


def random_block(args: ModelArgs, dtype: torch.dtype, spec: Optional[QuantSpec] = None,
                 quantize_device: Optional[torch.device] = None) -> TransformerBlock:
    """One block of ``args``' shape on the CPU, weights N(0, 0.02), quantized as ``spec`` says."""
    block = TransformerBlock(0, args).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    if spec is not None:
        for name in LINEAR_NAMES:
            w = block.get_submodule(name).weight.data
            q = quantize_matrix(w, spec.bits, spec.group_size, device=quantize_device)
            block.set_submodule(name, QuantLinear(q["weight"], q["scales"], q.get("mins")))
    return block.eval()


# A decode step's CPU blocks are all different blocks, so their weights come from RAM, never from the host's
# last-level cache: timing one block again and again would let part of a small (int4) block stay cached. The
# step is timed over copies of the block at distinct addresses, this many bytes of them at least (up to 8).
UNCACHED_BYTES = 512 * 2**20
# Between two CPU runs the host thread launches a paged block and waits for it, and the CPU lane's threads idle:
# each timed step follows a pause of about that length, so what waking them costs is in the time.
PAUSE_S = 0.0003


def _replicas(block: TransformerBlock) -> list[TransformerBlock]:
    nbytes = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
    count = min(8, max(1, -(-UNCACHED_BYTES // max(nbytes, 1))))
    return [block] + [copy.deepcopy(block) for _ in range(count - 1)]


@torch.inference_mode()
def measure_cpu_block(block: TransformerBlock, threads: int, token_counts: tuple[int, ...] = TOKEN_COUNTS,
                      kv_len: int = 256, budget_s: float = 0.25,
                      load: Optional[CopyLoad] = None, min_runs: int = 3,
                      fastest: bool = False) -> tuple[tuple[int, float], ...]:
    """(tokens, ms) for one decode-like step of ``block`` on the CPU at each step size: one sequence of that
    many positions after ``kv_len`` cached ones, as speculative verification and chunked prefill run; with
    ``load``, while host-to-device copies run; the median run, or with ``fastest`` the fastest. Each step runs a
    copy of the block the last steps did not touch (``UNCACHED_BYTES``) after a short pause (``PAUSE_S``), as the
    CPU runs of a hybrid step do."""
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    blocks = _replicas(block)
    try:
        out = []
        for tokens in token_counts:
            runs = [_cpu_step(b, tokens, kv_len) for b in blocks]
            if load is not None:
                load.keep_busy(budget_s + 0.15)
            for run in runs:
                run()  # warm-up: first-touch of the weights, kernel selection
            times, start = [], time.perf_counter()
            while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 20):
                time.sleep(PAUSE_S)
                t = time.perf_counter()
                runs[len(times) % len(runs)]()
                times.append(time.perf_counter() - t)
            # The median, or the fastest run (``fastest``: a choice between kernels, which other processes' bursts
            # on a shared machine must not decide).
            out.append((tokens, (min(times) if fastest else sorted(times)[len(times) // 2]) * 1e3))
        return tuple(out)
    finally:
        for b in blocks:
            b.attention.cache = None
        torch.set_num_threads(kept)
        if load is not None:
            load.drain()


def _cpu_step(block: TransformerBlock, tokens: int, kv_len: int) -> Callable[[], torch.Tensor]:
    """One decode-like step of ``block`` on the CPU: ``tokens`` positions after ``kv_len`` cached ones (the block
    gets a fresh host cache; the caller sets ``block.attention.cache`` back to None)."""
    dtype = block.attention_norm.weight.dtype
    attention = block.attention
    attention.cache = KVCache(1, kv_len + tokens, attention.n_local_kv_heads, attention.head_dim, "cpu", dtype)
    shape = StepShape(1, tokens, attention.cache.k.shape[1])
    input_pos = torch.arange(kv_len, kv_len + tokens)[None]  # (1, tokens)
    half = attention.head_dim // 2
    freqs = torch.polar(torch.ones(1, tokens, half), torch.zeros(1, tokens, half))  # (1, tokens, head_dim/2)
    mask = attention_mask(input_pos, shape.kv_len, dtype)  # (1, 1, tokens, kv_len)
    x = torch.randn(1, tokens, block.attention_norm.weight.shape[0]).to(dtype)  # (1, tokens, dim)
    return lambda: block(x, shape, input_pos, freqs, mask)


@torch.inference_mode()
def measure_pcie_beside_cpu(block: TransformerBlock, device: torch.device, threads: int, gbps: float,
                            seconds: float = 0.15) -> float:
    """Pinned host-to-device GB/s while the cores compute ``block`` at 1 token, step after step, as they do while
    a hybrid step's copies run: both read host memory. The copies are timed on their stream, and the CPU steps go
    on until the last copy is done."""
    load = CopyLoad(device, gbps)
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = _cpu_step(block, 1, 256)
        run()  # warm-up
        nbytes, begin, end = load.keep_busy(seconds)
        while not end.query():
            run()
        end.synchronize()
        return nbytes / (begin.elapsed_time(end) / 1e3) / 1e9
    finally:
        block.attention.cache = None
        torch.set_num_threads(kept)


@torch.inference_mode()
def measure_gpu_block(block: TransformerBlock, device: torch.device, threads: int, repeats: int = 8,
                      cuda_graphs: bool = True) -> float:
    """Host ms to launch one block's decode step on the GPU (1 token) and see it finish, each right after a CPU
    step of the same block, as the hybrid schedule alternates them (the CPU threads just ran); replayed as a
    CUDA graph as hybrid.py runs it (block_graphs.py), or eager. On a CPU ``device`` the same steps run there
    (how the tests exercise it)."""
    gpu_block = copy.deepcopy(block).to(device)
    attention, dtype = gpu_block.attention, gpu_block.attention_norm.weight.dtype
    attention.cache = KVCache(1, 257, attention.n_local_kv_heads, attention.head_dim, device, dtype)
    shape = StepShape(1, 1, attention.cache.k.shape[1])
    input_pos = torch.full((1, 1), 256, device=device)  # (1, 1)
    freqs = torch.polar(torch.ones(1, 1, attention.head_dim // 2, device=device),
                        torch.zeros(1, 1, attention.head_dim // 2, device=device))  # (1, 1, head_dim/2)
    mask = attention_mask(input_pos, shape.kv_len, dtype)  # (1, 1, 1, kv_len)
    dim = gpu_block.attention_norm.weight.shape[0]
    x = torch.randn(1, 1, dim, device=device).to(dtype)  # (1, 1, dim)
    out = torch.empty_like(x)  # in place, as a paged block writes its packet
    run = lambda buf: buf.copy_(gpu_block(x, shape, input_pos, freqs, mask))  # noqa: E731
    cuda = device.type == "cuda"
    graphs = BlockGraphs(device) if cuda and cuda_graphs else None
    times = []
    try:
        for r in range(repeats + 2):
            measure_cpu_block(block, threads, token_counts=(1,), budget_s=0.0, min_runs=1)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            if graphs is not None:
                graphs.compute("calibration", run, out, shape)  # eager, captured, then replayed
            else:
                run(out)
            if cuda:
                torch.cuda.synchronize(device)
            if r >= 2:  # the first runs settle cuBLAS, the allocator and the capture
                times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    finally:
        run = graphs = gpu_block = attention = None  # the block's GPU copy and graph go before emptying the cache
        if cuda:
            torch.cuda.empty_cache()


def _pcie_beside_cpu(block: TransformerBlock, device: torch.device, threads: int, gbps: float) -> Optional[float]:
    """``measure_pcie_beside_cpu``, or None (the copies are then planned at their pace alone) where it fails: a
    refinement of the plan, never a reason to stop a run."""
    try:
        return measure_pcie_beside_cpu(block, device, threads, gbps)
    except RuntimeError as e:
        print(f"llama_offload: the copies beside the CPU lane could not be timed ({str(e).splitlines()[0]}); they are "
              "planned at their pace alone.", file=sys.stderr)
        return None


def _cache_path() -> Path:
    root = os.environ.get("LLAMA_OFFLOAD_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "llama_offload") / "lanes.json"


def _machine_key(args: ModelArgs, dtype: torch.dtype, spec: Optional[QuantSpec], threads: int,
                 device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = (args.dim, args.ffn_hidden_dim, args.n_heads, args.kv_heads)
    text = json.dumps([CALIBRATION_VERSION, cpu, cpu_cores(), threads, gpu, torch.__version__, shape, str(dtype),
                       None if spec is None else spec.name])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, lanes: LaneTimes) -> None:
    data = _read_cache(path)
    data[key] = {"pcie_gbps": lanes.pcie_gbps, "cpu_ms": [list(p) for p in lanes.cpu_ms], "threads": lanes.threads,
                 "cpu_kernel": lanes.cpu_kernel, "kernel_ms": [list(p) for p in lanes.kernel_ms],
                 "gpu_block_ms": lanes.gpu_block_ms, "pcie_loaded_gbps": lanes.pcie_loaded_gbps}
    _write_json(path, data)


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        pass  # a read-only home: measure again next time


def calibrate(args: ModelArgs, dtype: torch.dtype, device: torch.device, *, threads: int,
              spec: Optional[QuantSpec] = None, use_cache: bool = True, verbose: bool = True) -> LaneTimes:
    """The lanes of this machine for ``args``' blocks in ``dtype`` (quantized as ``spec`` says), on ``threads``
    CPU threads: from the cache when this machine measured them before, else measured now and cached."""
    path, key = _cache_path(), _machine_key(args, dtype, spec, threads, device)
    entry = _read_cache(path).get(key) if use_cache else None
    if entry is not None:
        try:
            return LaneTimes(float(entry["pcie_gbps"]), tuple((int(t), float(ms)) for t, ms in entry["cpu_ms"]),
                             int(entry["threads"]), cpu_kernel=str(entry["cpu_kernel"]),
                             kernel_ms=tuple((str(k), float(ms)) for k, ms in entry["kernel_ms"]),
                             gpu_block_ms=float(entry["gpu_block_ms"]),
                             pcie_loaded_gbps=None if entry["pcie_loaded_gbps"] is None else float(entry["pcie_loaded_gbps"]))
        except (KeyError, TypeError, ValueError):
            pass  # an entry from another version: measure again
    start = time.perf_counter()
    block = random_block(args, dtype, spec, quantize_device=device if device.type == "cuda" else None)
    # Every CPU kernel that applies here (kernels/cpu.py) on one step of the block: the fastest one runs.
    candidates = kernels_for(dtype, quantized=spec is not None)
    timed = []
    for name in candidates:
        set_cpu_kernel(block, name)
        timed.append((name, measure_cpu_block(block, threads, token_counts=(1,))[0][1]))
    kernel = min(timed, key=lambda t: t[1])[0]
    kernel_ms = tuple(timed) if len(timed) > 1 else ()
    set_cpu_kernel(block, kernel)
    cuda = device.type == "cuda"
    pcie_gbps = measure_pcie(device)
    cpu_ms = measure_cpu_block(block, threads, load=CopyLoad(device, pcie_gbps) if cuda else None)
    pcie_loaded = _pcie_beside_cpu(block, device, threads, pcie_gbps) if cuda else None
    # Quantized blocks are slow on the CPU with some kernels: fewer alternations for them.
    gpu_block_ms = measure_gpu_block(block, device, threads, repeats=8 if spec is None else 3) if cuda else 0.0
    del block
    lanes = LaneTimes(pcie_gbps, cpu_ms, threads, cpu_kernel=kernel, kernel_ms=kernel_ms, gpu_block_ms=gpu_block_ms,
                      pcie_loaded_gbps=pcie_loaded)
    if verbose:
        loaded = f" ({pcie_loaded:.1f} beside the CPU lane)" if pcie_loaded else ""
        print(f"llama_offload: calibrated the lanes in {time.perf_counter() - start:.1f} s: PCIe {lanes.pcie_gbps:.1f} "
              f"GB/s{loaded}, a block on {threads} CPU threads {lanes.cpu_block_ms(1):.2f} ms, a paged block's launch "
              f"{lanes.gpu_block_ms:.2f} ms (cached in {path})",
              file=sys.stderr)
    _write_cache(path, key, lanes)
    return lanes


# --- a run without a GPU ----------------------------------------------------------------------------------

HOST_KERNEL_VERSION = 2  # a new version measures the choice again: 2 takes each kernel's fastest run, not its median


def stored_block_format(state_dict: dict[str, torch.Tensor]) -> Optional[dict[str, dict[str, tuple]]]:
    """How a quantized checkpoint stores its first block's matrices: for each of LINEAR_NAMES the (shape, dtype)
    of its codes, scales and mins, read from the tensors' headers (a memory-mapped shard: no weight is read).
    None when that block is not quantized."""
    found = {}
    for name in LINEAR_NAMES:
        prefix = f"layers.0.{name}"
        if f"{prefix}.scales" not in state_dict:
            return None
        found[name] = {part: (tuple(state_dict[f"{prefix}.{part}"].shape), state_dict[f"{prefix}.{part}"].dtype)
                       for part in ("weight", "scales", "mins") if f"{prefix}.{part}" in state_dict}
    return found


def _stored_format_name(stored: dict[str, dict[str, tuple]]) -> str:
    # The cache key's name for a stored format: codes, group size, scale dtype and mins of every matrix.
    parts = []
    for name, t in stored.items():
        (rows, cols), codes = t["weight"]
        n_in = cols * (2 if codes == torch.uint8 else 1)
        parts.append(f"{name}:{rows}x{n_in}:{codes}:{n_in // t['scales'][0][1]}:{t['scales'][1]}:{'mins' in t}")
    return ",".join(parts)


def host_block(args: ModelArgs, dtype: torch.dtype, spec: Optional[QuantSpec] = None,
               stored: Optional[dict[str, dict[str, tuple]]] = None) -> TransformerBlock:
    """One block of the run's shape and format on the CPU with random values: quantized as the checkpoint stores
    it (``stored``, see stored_block_format: codes, scales and mins of the same shapes and dtypes), else as
    ``spec`` says, else ``dtype`` throughout."""
    if stored is None:
        return random_block(args, dtype, spec)
    block = random_block(args, dtype)
    for name, t in stored.items():
        (rows, cols), codes = t["weight"]
        weight = torch.randint(-128 if codes == torch.int8 else 0, 128 if codes == torch.int8 else 256, (rows, cols),
                               dtype=torch.int16).to(codes)
        scales = torch.empty(t["scales"][0]).uniform_(1e-4, 1e-3).to(t["scales"][1])
        mins = torch.empty(t["mins"][0]).uniform_(-1e-2, 0.0).to(t["mins"][1]) if "mins" in t else None
        block.set_submodule(name, QuantLinear(weight, scales, mins))
    return block.eval()


def choose_host_kernel(args: ModelArgs, dtype: torch.dtype, *, spec: Optional[QuantSpec] = None,
                       stored: Optional[dict[str, dict[str, tuple]]] = None, threads: Optional[int] = None,
                       use_cache: bool = True, verbose: bool = True) -> Optional[HostKernel]:
    """For a run without a GPU: the kernel (kernels/cpu.py) that computes a block of this model fastest at one token
    on this machine, timed on a random block of its shape and format (``stored``: a quantized checkpoint's own,
    else ``spec``'s, else ``dtype``), once per machine and format, then read from the lanes cache. None where only
    one kernel applies (a float32 model: torch's)."""
    quantized = stored is not None or spec is not None
    candidates = kernels_for(dtype, quantized=quantized)
    if len(candidates) < 2:
        return None
    threads = threads or torch.get_num_threads()
    fmt = _stored_format_name(stored) if stored is not None else None if spec is None else spec.name
    key = f"host{HOST_KERNEL_VERSION}-" + hashlib.sha1(json.dumps([_machine_key(args, dtype, spec, threads, torch.device("cpu")),
                                             fmt]).encode()).hexdigest()[:16]
    path = _cache_path()
    entry = _read_cache(path).get(key) if use_cache else None
    if entry is not None:
        try:
            timed = tuple((str(k), float(ms)) for k, ms in entry["block_ms"])
            if timed and {k for k, _ in timed} | set(entry.get("left_out", ())) == set(candidates):
                return HostKernel(min(timed, key=lambda t: t[1])[0], timed, threads)
        except (KeyError, TypeError, ValueError):
            pass  # an entry from another version: measure again
    start = time.perf_counter()
    block = host_block(args, dtype, spec, stored)
    timed = []
    for name in candidates:
        set_cpu_kernel(block, name)
        try:
            timed.append((name, measure_cpu_block(block, threads, token_counts=(1,), budget_s=0.1, min_runs=5,
                                                  fastest=True)[0][1]))
        except (RuntimeError, AttributeError, NotImplementedError) as e:
            # A kernel this torch or CPU lacks (torch's int4 CPU kernel came in 2.5) is no candidate: the others run.
            if verbose:
                print(f"llama_offload: the {name} CPU kernel does not run here ({str(e).splitlines()[0][:120]}); "
                      "it is left out.", file=sys.stderr)
    if not timed:
        return None
    choice = HostKernel(min(timed, key=lambda t: t[1])[0], tuple(timed), threads)
    if verbose:
        print(f"llama_offload: timed the CPU kernels on one block in {time.perf_counter() - start:.1f} s: "
              f"{choice.describe()} (cached in {path})", file=sys.stderr)
    data = _read_cache(path)
    data[key] = {"block_ms": [list(t) for t in timed], "left_out": [k for k in candidates if k not in dict(timed)]}
    _write_json(path, data)
    return choice


def lanes_for_run(cpu_blocks: Optional[int], cpu_threads: Optional[int], args: ModelArgs, dtype: torch.dtype,
                  device: torch.device, *, offload: bool, spec: Optional[QuantSpec] = None,
                  model_parallel_size: int = 1, processes: int = 1) -> tuple[Optional[LaneTimes], Optional[int]]:
    """(the lanes to plan with, the CPU threads) for a run's flags: (None, None) where no CPU lane applies (no
    GPU, nothing offloaded, ``cpu_blocks`` 0, or an automatic split under model parallelism). Bad flags are
    refused here, before any weight is read."""
    if device.type != "cuda" or not offload:
        if cpu_blocks:
            where = "no GPU is used, so every block already runs on the CPU" if device.type != "cuda" else \
                "--offload False keeps every block on the GPU"
            raise ValueError(f"--cpu_blocks {cpu_blocks} splits the blocks that are paged through a GPU, but {where}. "
                             "Drop --cpu_blocks.")
        return None, None
    if cpu_blocks == 0 or model_parallel_size > 1:  # several processes: the plan refuses an explicit split
        return None, None
    check_cpu_lane_cores(cpu_blocks, processes)
    if cpu_blocks is None and cpu_cores() // max(processes, 1) < 2:
        return None, None  # one core drives the GPU: no core left for a lane
    threads = cpu_threads_for(cpu_threads, processes)
    return calibrate(args, dtype, device, threads=threads, spec=spec), threads
