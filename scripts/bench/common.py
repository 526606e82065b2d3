"""What the benchmarks in this folder share: the measurement protocols, the shapes, and the row and file helpers.

A script here runs as ``python scripts/bench/NAME.py``, so Python searches this folder first and ``import common``
finds this module; the package itself is the installed ``llama_offload`` (``pip install -e .``).

- The peers' protocol (``bench_peers``, ``bench_meta``, ``bench_llamacpp`` and ``benchmark.py``'s peer rows):
  :data:`PEER_KEYS` and :func:`result` (one row), :func:`measure_peer` (warm-up, a 512-token prefill, decode at
  batch 1 and 8 through a ``forward(input_ids=, past_key_values=, use_cache=)``), :class:`GpuPeak` and
  :func:`baseline_note` (peak GPU memory of a peer), :func:`failure` (an exception as one line of a note),
  :func:`hbm_bandwidth` (the device-memory floor), :func:`meta_state_dict` (a Meta checkpoint with its vocab size).
- Our offloaded model's protocol (``benchmark.py``, ``bench_quant``, ``bench_speculative``): :data:`SHAPES`,
  :data:`MAX_BATCH`, :data:`MAX_SEQ_LEN`, :func:`pinned_bandwidth` (the PCIe floor), :func:`timed`,
  :func:`measure`, :func:`run_variant`, :func:`make_checkpoint`, :func:`free_gpu`, :func:`free_all`,
  :func:`shape_args`, :func:`model_from_state_dict`.
- Rows and files: :func:`emit` (a row as a JSON line), :func:`failed` (a note for a row that failed),
  :func:`list_arg` (a comma list from fire), :func:`cell` (a table cell), :func:`command_line` (the command that
  reproduces a run), :func:`replace_section` (a marked section of a markdown file), :func:`example_dialogs`
  (the chat example's dialogs).
"""

from __future__ import annotations

import gc
import json
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.model.presets import PRESETS

GiB = 2**30
PEER_KEYS = ("name", "decode_ms_b1", "decode_ms_b8", "prefill_s_512", "peak_gpu_gib", "note")
PREFILL_LEN = 512
DECODE_PROMPT_LEN = 16
DECODE_BATCHES = (1, 8)
WARMUP_LEN = 8
SHAPES = {name: ModelArgs(**PRESETS[name]) for name in ("7b", "13b")}  # benchmark.py's --shape
MAX_BATCH = 8
MAX_SEQ_LEN = PREFILL_LEN + 32
REPO = Path(__file__).resolve().parents[2]  # scripts/bench/ is two levels down

Row = dict[str, Any]


# --- rows, notes and files ------------------------------------------------------------------------------------


def failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def failed(e: BaseException) -> str:
    """The note of a row whose run raised ``e``: ``FAILED: Type: first line``."""
    return f"FAILED: {failure(e)}"


def emit(row: Row) -> Row:
    print(json.dumps(row), flush=True)
    return row


def list_arg(value) -> list[str]:
    # fire turns "4,8" into a tuple and "4" into an int; a plain string comes through as is.
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def cell(text: Any) -> str:
    # A note may hold a "|" (llama-bench's stderr) or a newline: either would break the table row.
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def command_line(params: dict[str, Any], script: str) -> str:
    """The command that reproduces a run: ``python SCRIPT`` with every argument it used."""
    parts = ["python", script]
    for key, value in params.items():
        if value is None or value is False:
            continue  # None: not given; False: the flag's default
        if value is True:
            parts.append(f"--{key}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            parts += [f"--{key}", shlex.quote(text)]
    return " ".join(parts)


def replace_section(text: str, new_section: str, mark_start: str, mark_end: str) -> str:
    """``text`` with its section between the two markers replaced by ``new_section``
    (appended when it has none)."""
    start = text.find(mark_start)
    if start < 0:
        if mark_end in text:
            raise ValueError(f"found {mark_end} without {mark_start}: fix the markers by hand")
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + new_section + "\n"
    end = text.find(mark_end, start)
    if end < 0:
        raise ValueError(f"found {mark_start} without {mark_end} after it: fix the markers by hand")
    return text[:start] + new_section + text[end + len(mark_end):]


def example_dialogs() -> list:
    """``EXAMPLE_DIALOGS`` of ``scripts/example_chat_completion.py``, the dialogs its users see answered.

    The example is a script at the top of scripts/, not a module on the path, so it is read from its file
    (its ``main`` does not run: the module is not ``__main__``)."""
    import runpy

    return list(runpy.run_path(str(REPO / "scripts" / "example_chat_completion.py"),
                               run_name="example_chat_completion")["EXAMPLE_DIALOGS"])


# --- the peers' protocol ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def result(name: str, note: str = "", **figures: Optional[float]) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in PEER_KEYS}
    out.update(name=name, note=note, **figures)
    return out


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peer(forward: Callable[..., Any], vocab_size: int, device: torch.device | str, *, steps: int = 8,
                 seed: int = 0, figures: Optional[dict[str, Any]] = None,
                 batches: tuple[int, ...] = DECODE_BATCHES) -> dict[str, Optional[float]]:
    """The common protocol, on ``forward(input_ids=, past_key_values=, use_cache=)`` -> output with
    ``.logits`` and ``.past_key_values`` (a transformers causal LM, or anything that calls one).

    1. warm-up: one forward of a (1, 8) prompt;
    2. ``prefill_s_512``: one forward of a (1, 512) prompt with a fresh cache, seconds;
    3. ``decode_ms_b{1,8}``: a (b, 16) prompt prefilled (not timed), then ``steps`` single-token forwards
       feeding back the argmax, with the KV cache; milliseconds per step. The whole of 3 runs twice and only
       the second is timed: the first loads the kernels of the new shapes (and lets a model capture them).
    ``batches`` are the decode batch sizes (1 and 8; fewer for a model whose cache holds fewer sequences). Ids
    are uniform in [0, vocab_size) from ``seed``. Times are wall clock between ``torch.cuda.synchronize()``
    calls. Figures go into ``figures`` as soon as they are measured, so a caller that catches an exception
    keeps the ones taken before it. Returns ``figures``.
    """
    device = torch.device(device)
    figures = {} if figures is None else figures
    gen = torch.Generator().manual_seed(seed)

    def ids(b: int, n: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (b, n), generator=gen).to(device)

    with torch.inference_mode():
        forward(input_ids=ids(1, WARMUP_LEN), past_key_values=None, use_cache=True)
        sync(device)

        prompt = ids(1, PREFILL_LEN)
        sync(device)
        start = time.perf_counter()
        out = forward(input_ids=prompt, past_key_values=None, use_cache=True)
        sync(device)
        figures["prefill_s_512"] = time.perf_counter() - start
        del out, prompt

        for b in batches:
            for timed in (False, True):  # the first pass warms up: kernels of a new shape, lazily loaded
                out = forward(input_ids=ids(b, DECODE_PROMPT_LEN), past_key_values=None, use_cache=True)
                cache = out.past_key_values
                if cache is None:
                    raise RuntimeError("the model returned no past_key_values with use_cache=True")
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                del out
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    out = forward(input_ids=token, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    del out
                sync(device)
                if timed:
                    figures[f"decode_ms_b{b}"] = (time.perf_counter() - start) / steps * 1e3
                del cache, token
    return figures


class GpuPeak:
    """Peak memory allocated by torch on one CUDA device over a ``with`` block, beyond what was already allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib: Optional[float] = None
        self.baseline = 0

    def __enter__(self) -> "GpuPeak":
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def read(self) -> Optional[float]:
        if self.device.type == "cuda":
            self.gib = (torch.cuda.max_memory_allocated(self.device) - self.baseline) / GiB
        return self.gib

    def __exit__(self, *exc: Any) -> None:
        return None


def baseline_note(peak: GpuPeak) -> str:
    if peak.baseline:
        return f"; peak excludes {peak.baseline / GiB:.2f} GiB already allocated before the peer was built"
    return ""


def hbm_bandwidth(nbytes: int = GiB, reps: int = 10, *, device: torch.device | str = "cuda") -> float:
    """Device-memory bandwidth in bytes/s: the best of ``reps`` device-to-device copies of ``nbytes``.

    A copy reads ``nbytes`` and writes ``nbytes``, so each counts ``2 * nbytes``. On CUDA each copy is timed
    with a pair of CUDA events (after one untimed warm-up copy); the answer is what a memory-bound kernel
    can hope for, so ``bytes read per decode step / hbm_bandwidth()`` is the "HBM floor" of a step whose
    weights are all resident (see ``bench_peers.decode_read_bytes``). ``device="cpu"`` times a host memcpy with
    ``perf_counter`` (tests only). Raises RuntimeError when a CUDA device is asked for and there is none.
    """
    dev = torch.device(device)
    if nbytes <= 0 or reps <= 0:
        raise ValueError(f"nbytes and reps must be positive, found {nbytes} and {reps}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hbm_bandwidth needs a CUDA GPU: PyTorch sees none here.")
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.fill_(1)  # touch every page before timing
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        stream = torch.cuda.current_stream(dev)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def meta_state_dict(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    from llama_offload.checkpoint.load import load_state_dict

    args = ModelArgs.from_json(ckpt_dir / "params.json")
    if args.vocab_size == -1:
        from llama_offload.text.tokenizer import load_tokenizer

        for place in (ckpt_dir, ckpt_dir.parent):
            try:
                args.vocab_size = load_tokenizer(place).n_words
                break
            except (FileNotFoundError, ValueError):
                continue
        else:
            raise ValueError(f"{ckpt_dir}/params.json has vocab_size -1 and no tokenizer was found to fill it in.")
    return load_state_dict(ckpt_dir, args), args


# --- our offloaded model's protocol -----------------------------------------------------------------------------


def pinned_bandwidth(nbytes: int = GiB, reps: int = 5) -> float:
    """Host-to-device bytes/s from pinned memory: the link every offloaded step is bound by."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, vocab_size: int, steps: int) -> dict:
    """The shared protocol: warm-up, a 512-token prefill, then decode steps at batch 1 and 8."""
    g = torch.Generator().manual_seed(0)

    def ids(bs: int, n: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (bs, n), generator=g).cuda()

    model(ids(1, 4), 0)  # warm-up: kernels, cuBLAS handles, allocator
    result = {"prefill_s_512": timed(lambda: model(ids(1, PREFILL_LEN), 0))}
    for bs in (1, 8):
        first = ids(bs, 1)

        def decode() -> None:
            # Like generation: each step feeds the previous step's greedy token, and nothing waits for
            # the GPU in between, so work queued behind a step (a prefetch) overlaps the next one.
            tok = first
            for i in range(steps):
                tok = model(tok, DECODE_PROMPT_LEN + i)[:, -1].argmax(-1, keepdim=True)  # (bs, 1)

        for timing in (False, True):  # the first run warms up: lazily loaded kernels, CUDA graph captures
            model(ids(bs, DECODE_PROMPT_LEN), 0)
            seconds = timed(decode)
        result[f"decode_ms_b{bs}"] = 1e3 * seconds / steps
    return result


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():  # the benchmarks' CPU tests free their models too
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def free_all() -> None:
    # The dequantization scratch is global (quant.SCRATCH) and outlives the model that sized it: dropped here so
    # each variant's peak GPU memory counts its own, and a smaller model does not keep a larger one's buffer.
    from llama_offload.model import quant

    quant.SCRATCH.buffers.clear()
    free_gpu()


def run_variant(name: str, build: Callable[[], tuple[object, int, str]], vocab_size: int, steps: int,
                bandwidth: float, hbm_floor_ms: Optional[float] = None) -> dict:
    """Build a variant (returns model, bytes streamed per step, a note), measure it, free it."""
    free_gpu()
    before = torch.cuda.memory_allocated()  # whatever earlier variants left: not this variant's
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        model, streamed, note = build()
    except ValueError as e:  # e.g. a budget below the plan's minimum: reported in the table, not fatal
        print(f"{name}: {e}", flush=True)
        return {"name": name, "note": str(e).split(":")[0]}
    build_s = time.perf_counter() - start
    row = {"name": name, "build_s": build_s, "streamed_gib": streamed / GiB, "note": note}
    with torch.inference_mode():
        row.update(measure(model, vocab_size, steps))
    row["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() - before) / GiB
    row["floor_ms"] = 1e3 * streamed / bandwidth if streamed else None
    row["ratio_b1"] = row["decode_ms_b1"] / row["floor_ms"] if streamed else None
    row["b8_over_b1"] = row["decode_ms_b8"] / row["decode_ms_b1"]
    if not streamed and hbm_floor_ms:
        row["hbm_floor_ms"] = hbm_floor_ms
        row["ratio_hbm"] = row["decode_ms_b1"] / hbm_floor_ms
    print(json.dumps(row), flush=True)
    del model
    free_gpu()
    return row


def make_checkpoint(args: ModelArgs, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from llama_offload.checkpoint.load import random_state_dict, save_checkpoint

    if not (ckpt_dir / "params.json").exists():
        sd = random_state_dict(args, dtype=torch.float16, device="cuda")
        save_checkpoint(sd, args, ckpt_dir)
        return sd
    return {}


def shape_args(shape: str) -> ModelArgs:
    base = SHAPES[shape]
    return ModelArgs(**{**base.to_params(), "max_batch_size": MAX_BATCH,
                        "max_seq_len": MAX_SEQ_LEN})


def model_from_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> torch.nn.Module:
    """What ``load_model`` does once it has the (possibly quantized) state dict: build on the meta device, swap in
    the quantized modules, assign the tensors. Fresh aliases are assigned, so the pager re-pointing the model's
    tensors at pinned memory leaves ``state_dict`` as it was (it can build the next variant)."""
    from llama_offload.checkpoint.quant_load import swap_quantized_modules
    from llama_offload.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args, model_parallel_size=1)
    swap_quantized_modules(model, state_dict, state_dict["norm.weight"].dtype)
    model.load_state_dict({k: v.detach() for k, v in state_dict.items()}, assign=True, strict=True)
    model.requires_grad_(False)
    return model.eval()
