"""llama.cpp as a benchmark peer: our Meta weights written as a GGUF, timed by llama.cpp's own ``llama-bench``.

``llama-bench`` is built on the GPU machine from the llama.cpp source that ``../shared/tools/llamacpp-peer.sh
pack`` puts in ``.peers/llamacpp-src.tgz`` (``llamacpp-peer.sh build`` compiles it with CUDA for sm_90 into
``/tmp/llamacpp/llama.cpp/build/bin``, about 5 minutes on 16 cores); no network is needed there.

- :func:`write_gguf` writes a Meta state dict (``tok_embeddings.weight``, ``layers.N.attention.wq.weight`` ...)
  as a llama-architecture GGUF with gguf-py's ``GGUFWriter``: ``token_embd``, ``blk.N.attn_q`` / ``attn_k`` /
  ``attn_v`` / ``attn_output``, ``ffn_gate`` (w1) / ``ffn_down`` (w2) / ``ffn_up`` (w3), ``attn_norm``,
  ``ffn_norm``, ``output_norm``, ``output``. GGUF keeps Meta's q/k row order (llama.cpp's RoPE, like Meta's,
  rotates adjacent pairs; ``convert_hf_to_gguf.py`` undoes Hugging Face's permutation to get there), so no
  row is permuted. Matrices are written in ``dtype`` (F16 by default), norms in F32, as llama.cpp's converter
  does. The vocabulary is a minimal SentencePiece-style ("llama") one of exactly ``vocab_size`` tokens:
  ``<unk> <s> </s>``, the 256 byte tokens ``<0x00>`` ... ``<0xFF>``, then placeholders; ``llama-bench``
  feeds random ids, so it is never used to encode text. Tensors are streamed: the header and tensor table are
  written first, then one tensor at a time, so a 13 GB model needs no second copy in memory.
- :func:`bench_llamacpp` runs ``llama-bench -m GGUF -ngl N -t T -p 512 -n 32 -o json`` and turns its JSON into
  a peer row (``common.PEER_KEYS``, the keys of every peer): ``decode_ms_b1`` from the ``tg32`` test (``avg_ns`` / 32),
  ``prefill_s_512`` from the ``pp512`` test (``avg_ns``), and a note with the build, the backends and the
  flags. ``llama-bench`` decodes one sequence, so there is no ``decode_ms_b8``. Failures (no binary, a
  crash, output that is not llama-bench's JSON) come back as a row whose note says what happened.

Protocol differences from ``common.measure_peer`` (say them next to the figures): ``llama-bench``
warms up once, then repeats each test ``reps`` times (default 5) and reports the mean; its decode test
starts from an empty KV cache (``-n 32`` at depth 0, where ours decodes after a 16-token prompt; ``n_depth=16``
gives ``-d 16``), and each step feeds a random token, not the argmax, so no logits leave the GPU.

Usage, on the GPU machine::

    bash ../shared/tools/llamacpp-peer.sh build
    python scripts/bench/bench_llamacpp.py --ckpt_dir /tmp/llama_offload_bench/meta-7b --gguf /tmp/7b-f16.gguf \\
        --bin_dir /tmp/llamacpp/llama.cpp/build/bin --ngl 99,15,0

From Python: ``write_gguf``, ``bench_llamacpp``, ``parse_llama_bench_json``, ``quantize_gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from llama_offload.model.args import ModelArgs

from common import GiB, failure, meta_state_dict, result

__all__ = [
    "DEFAULT_BIN_DIR",
    "gguf_tensors",
    "write_gguf",
    "parse_llama_bench_json",
    "llama_bench_figures",
    "bench_llamacpp",
    "n_gpu_layers_for_budget",
    "quantize_gguf",
    "find_binary",
]

DEFAULT_BIN_DIR = Path("/tmp/llamacpp/llama.cpp/build/bin")  # where llamacpp-peer.sh build puts it

# Meta name (within a layer) -> GGUF name, in the order llama.cpp's converter writes a block.
_LAYER_NAMES = [
    ("attention_norm", "attn_norm"),
    ("feed_forward.w2", "ffn_down"),
    ("feed_forward.w1", "ffn_gate"),
    ("feed_forward.w3", "ffn_up"),
    ("ffn_norm", "ffn_norm"),
    ("attention.wk", "attn_k"),
    ("attention.wo", "attn_output"),
    ("attention.wq", "attn_q"),
    ("attention.wv", "attn_v"),
]
_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama 2's tokenizer
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --- Meta -> GGUF ---------------------------------------------------------------------------------------------


def _plan(args: ModelArgs) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, Meta name, shape) for every tensor, in the order they are written."""
    d, hd, kv, f, v = args.dim, args.head_dim, args.kv_heads, args.ffn_hidden_dim, args.vocab_size
    shapes = {"attention.wq": (d, d), "attention.wk": (kv * hd, d), "attention.wv": (kv * hd, d),
              "attention.wo": (d, d), "feed_forward.w1": (f, d), "feed_forward.w2": (d, f),
              "feed_forward.w3": (f, d), "attention_norm": (d,), "ffn_norm": (d,)}
    out = [("token_embd.weight", "tok_embeddings.weight", (v, d))]
    for i in range(args.n_layers):
        out += [(f"blk.{i}.{g}.weight", f"layers.{i}.{m}.weight", shapes[m]) for m, g in _LAYER_NAMES]
    out += [("output_norm.weight", "norm.weight", (d,)), ("output.weight", "output.weight", (v, d))]
    return out


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of exactly ``n`` distinct tokens: specials, bytes, placeholders."""
    from gguf import TokenType

    tokens = list(_SPECIALS)[:n]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)][:n]
    if n >= len(_SPECIALS) + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [int(TokenType.BYTE)] * 256
    first = len(tokens)
    tokens += [f"\u2581t{i}" for i in range(first, n)]  # "▁t259" ...: SentencePiece's word-start mark
    types += [int(TokenType.NORMAL)] * (n - first)
    scores = [0.0] * first + [-float(i - first) for i in range(first, n)]
    return tokens, scores, types


def gguf_tensors(state_dict: dict[str, torch.Tensor], args: ModelArgs, dtype: str = "F16"
                 ) -> Iterator[tuple[str, Any]]:
    """(GGUF name, numpy array) for every tensor, lazily: matrices in ``dtype``, norms in float32.

    Each array is made when it is asked for (a view of the state dict's own storage when it is already a
    contiguous CPU tensor of that dtype, a copy otherwise), so at most one converted tensor is alive.
    BF16 comes as uint16 bits (numpy has no bfloat16); write it with ``raw_dtype=BF16``.
    """
    target = _DTYPES[dtype]
    for gguf_name, meta_name, _ in _plan(args):
        t = state_dict[meta_name].detach()
        want = torch.float32 if t.dim() == 1 else target
        t = t.to("cpu", want).contiguous()
        yield gguf_name, (t.view(torch.int16).numpy().view("uint16") if want == torch.bfloat16 else t.numpy())


def write_gguf(state_dict: dict[str, torch.Tensor], args: ModelArgs, path: str | Path, dtype: str = "F16", *,
               context_length: int = 4096, name: str = "llama_offload random benchmark model") -> Path:
    """Write a Meta state dict as a llama-architecture GGUF file at ``path``; return the path.

    ``dtype`` (F16, BF16 or F32) is the matrices' type; norms are always F32. Every key and shape is checked
    against ``args`` before anything is written; the file is written as ``<path>.partial`` and renamed at the
    end, so an interrupted run never leaves a complete-looking GGUF. Peak extra memory is one tensor (none
    for a CPU state dict already in ``dtype``, such as a memory-mapped fp16 checkpoint).
    ``context_length`` is the model's training context (Llama 2: 4096), which llama.cpp only reports.
    """
    import gguf

    path = Path(path)
    dtype = dtype.upper()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}; for quantized types write F16 "
                         "and convert it with quantize_gguf (llama.cpp's llama-quantize).")
    if args.vocab_size <= 0:
        raise ValueError("args.vocab_size must be set (it is -1); take it from the tokenizer first.")
    if args.use_scaled_rope:  # Llama 3.1's frequency scaling: llama.cpp would need a rope_freqs tensor
        raise ValueError("use_scaled_rope (Llama 3.1 RoPE scaling) is not supported by write_gguf.")
    plan = _plan(args)
    for _, meta_name, shape in plan:
        t = state_dict.get(meta_name)
        if t is None:
            raise KeyError(f"the Meta state dict has no {meta_name!r} (expected {args.n_layers} layers)")
        if tuple(t.shape) != shape:
            raise ValueError(f"{meta_name} has shape {tuple(t.shape)}, the model args imply {shape}.")
        if not t.is_floating_point():
            raise ValueError(f"{meta_name} is {t.dtype}, not a floating-point tensor.")

    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(name)
        w.add_context_length(context_length)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.ffn_hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.kv_heads)
        w.add_rope_freq_base(float(args.rope_theta))
        w.add_layer_norm_rms_eps(float(args.norm_eps))
        w.add_rope_dimension_count(args.head_dim)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(int(file_type))
        tokens, scores, types = _vocab(args.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        if args.vocab_size >= len(_SPECIALS):
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

        raw = gguf.GGMLQuantizationType
        for gguf_name, meta_name, shape in plan:
            if len(shape) == 1 or dtype == "F32":
                w.add_tensor_info(gguf_name, shape, _np_dtype("F32"), 4 * _numel(shape))
            elif dtype == "F16":
                w.add_tensor_info(gguf_name, shape, _np_dtype("F16"), 2 * _numel(shape))
            else:
                w.add_tensor_info(gguf_name, shape, _np_dtype("BF16"), 2 * _numel(shape), raw_dtype=raw.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, array in gguf_tensors(state_dict, args, dtype):
            w.write_tensor_data(array)
            del array
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _np_dtype(dtype: str):
    import numpy as np

    return {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16)}[dtype]


# --- llama-bench's output -------------------------------------------------------------------------------------


def parse_llama_bench_json(text: str) -> list[dict[str, Any]]:
    """The test records printed by ``llama-bench -o json`` (a JSON array of objects), or by ``-o jsonl``.

    Tolerates what a crash leaves behind: anything before the first ``[`` or ``{`` is skipped, and an array
    cut off after some records (llama-bench prints and flushes one record per finished test, and the closing
    ``]`` only at the very end) yields the complete records. Raises ValueError if no record is found.
    """
    decoder = json.JSONDecoder()
    records: list[Any] = []
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError(f"no JSON in llama-bench's output: {text.strip()[:200]!r}")
    pos = start
    if text[start] == "[":
        try:
            value, _ = decoder.raw_decode(text, start)
            records, pos = list(value) if isinstance(value, list) else [value], -1
        except json.JSONDecodeError:
            pos = start + 1  # a truncated array: read its complete objects one by one below
    while pos >= 0:  # objects one after the other: JSON lines, or what is left of a cut-off array
        pos = text.find("{", pos)
        if pos < 0:
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        records.append(value)
    records = [r for r in records if isinstance(r, dict) and "avg_ns" in r]
    if not records:
        raise ValueError(f"llama-bench printed JSON but no test record: {text.strip()[:200]!r}")
    return records


def llama_bench_figures(records: list[dict[str, Any]]) -> dict[str, float]:
    """Peer-row figures from llama-bench records.

    - a generation test (``n_prompt`` 0, ``n_gen`` g > 0): ``decode_ms_b1`` = ``avg_ns`` / g / 1e6, milliseconds
      per token (the mean over the repetitions of the whole g-token run, after ``n_depth`` cached tokens);
    - a prompt test (``n_prompt`` p > 0, ``n_gen`` 0): ``prefill_s_<p>`` = ``avg_ns`` / 1e9, seconds for the p
      tokens (``prefill_s_512`` for the benchmark's 512).
    Also ``decode_tok_s`` / ``prefill_tok_s`` (llama-bench's ``avg_ts``) and ``stddev`` figures in the same units.
    """
    out: dict[str, float] = {}
    for r in records:
        n_prompt, n_gen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        avg_ns, sd_ns = float(r["avg_ns"]), float(r.get("stddev_ns", 0) or 0)
        if n_prompt == 0 and n_gen > 0:
            out["decode_ms_b1"] = avg_ns / n_gen / 1e6
            out["decode_ms_b1_stddev"] = sd_ns / n_gen / 1e6
            out["decode_tok_s"] = float(r.get("avg_ts", 1e9 * n_gen / avg_ns))
        elif n_prompt > 0 and n_gen == 0:
            out[f"prefill_s_{n_prompt}"] = avg_ns / 1e9
            out[f"prefill_s_{n_prompt}_stddev"] = sd_ns / 1e9
            out["prefill_tok_s"] = float(r.get("avg_ts", 1e9 * n_prompt / avg_ns))
    return out


def _note(records: list[dict[str, Any]], n_gpu_layers: int, threads: int) -> str:
    r = records[0]
    parts = [
        f"llama.cpp build {r.get('build_number', '?')} ({r.get('build_commit', '?')})",
        f"{r.get('model_type', '?')}, {int(r.get('model_size', 0)) / GiB:.2f} GiB weights",
        f"backends {r.get('backends', '?')} ({r.get('gpu_info', '') or 'no GPU'})",
        f"-ngl {r.get('n_gpu_layers', n_gpu_layers)} -t {r.get('n_threads', threads)}",
        f"flash_attn {r.get('flash_attn', '?')}, n_batch {r.get('n_batch', '?')}, n_ubatch {r.get('n_ubatch', '?')}",
        f"KV {r.get('type_k', '?')}/{r.get('type_v', '?')}",
        f"mean of {len(r.get('samples_ns') or [])} runs after a warm-up; tests start after {r.get('n_depth', 0)} "
        "cached tokens; decode feeds random tokens",
    ]
    return "; ".join(parts)


# --- GPU memory, seen from outside the process ---------------------------------------------------------------


class _DeviceMemoryPoller:
    """Peak device-wide used memory (NVML, else nvidia-smi) over a ``with`` block, minus the value at entry.

    llama-bench is another process, so torch's allocator statistics cannot see it. The figure includes
    anything else that allocates on the device meanwhile; None when neither NVML nor nvidia-smi answers.
    """

    def __init__(self, index: int = 0, period_s: float = 0.05) -> None:
        self.index, self.period_s = index, period_s
        self.baseline: Optional[int] = None
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 - no NVML: try the command line tool
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None

        def read() -> int:
            out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                                  str(self.index)], capture_output=True, text=True, timeout=10, check=True)
            return int(float(out.stdout.strip().splitlines()[0])) * 2**20

        return read

    def _sample(self) -> None:
        try:
            used = self._read()
        except Exception:  # noqa: BLE001
            return
        self.peak = used if self.peak is None else max(self.peak, used)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "_DeviceMemoryPoller":
        if self._read is not None:
            try:
                self.baseline = self._read()
            except Exception:  # noqa: BLE001
                self._read = None
                return self
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def gib(self) -> Optional[float]:
        if self.baseline is None or self.peak is None:
            return None
        return max(0, self.peak - self.baseline) / GiB


# --- running llama-bench --------------------------------------------------------------------------------------


def find_binary(bin_dir: str | Path | None, name: str) -> Optional[Path]:
    """The llama.cpp program ``name`` (llama-bench, llama-quantize) in ``bin_dir``, the usual build directories or
    the PATH; None when there is none (bench_quant and bench_hybrid then leave llama.cpp's rows out)."""
    for d in ([Path(bin_dir)] if bin_dir else []) + [DEFAULT_BIN_DIR, Path("/tmp/llamacpp/build/bin")]:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return d / name
    found = shutil.which(name)
    return Path(found) if found else None


def _lib_env(binary: Path) -> dict[str, str]:
    """The environment for a llama.cpp binary built with shared libraries (libllama.so, libggml*.so in bin/)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(x for x in (str(binary.parent), env.get("LD_LIBRARY_PATH", "")) if x)
    return env


def llama_bench_command(binary: str | Path, gguf_path: str | Path, *, n_gpu_layers: int = 99, threads: int = 15,
                        n_gen: int = 32, n_prompt: int = 512, reps: int = 5, n_depth: int = 0,
                        extra_args: Sequence[str] = ()) -> list[str]:
    """``llama-bench -m GGUF -ngl N -t T -p P -n G -r R -o json`` (P or G 0: that test is left out), with
    ``-d D`` when ``n_depth`` D > 0 (each test then runs after D tokens already in the KV cache)."""
    cmd = [str(binary), "-m", str(gguf_path), "-ngl", str(n_gpu_layers), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    if n_depth:
        cmd += ["-d", str(n_depth)]
    return cmd + [str(a) for a in extra_args]


def bench_llamacpp(gguf_path: str | Path, bin_dir: str | Path | None = DEFAULT_BIN_DIR, n_gpu_layers: int = 99,
                   threads: int = 15, n_gen: int = 32, n_prompt: int = 512, *, reps: int = 5,
                   n_depth: int = 0, extra_args: Sequence[str] = (), timeout_s: float = 1800, name: Optional[str] = None,
                   gpu_index: int = 0) -> dict[str, Any]:
    """llama.cpp's ``llama-bench`` on ``gguf_path`` as a peer row (``common.PEER_KEYS`` and a few more).

    ``n_gpu_layers`` layers go to the GPU (99: all of them, output included; fewer: the rest runs on the CPU
    with ``threads`` threads, which is how llama.cpp runs a model bigger than the GPU). ``n_depth`` 16 decodes
    after a 16-token context, like ``measure_peer`` (its prefill test then also starts at 16). Figures: see
    :func:`llama_bench_figures`; ``peak_gpu_gib`` is the device-wide peak while it ran, from NVML or
    nvidia-smi (None without either). Never raises for a missing binary, a failed run or unreadable output:
    the row's note starts with "skipped" or "FAILED" and says why, with the end of llama-bench's stderr.
    """
    label = name or f"llama.cpp llama-bench (-ngl {n_gpu_layers})"
    binary = find_binary(bin_dir, "llama-bench")
    if binary is None:
        return result(label, f"skipped: no llama-bench in {bin_dir} (build it with ../shared/tools/llamacpp-peer.sh "
                              "build) nor on PATH")
    if not Path(gguf_path).is_file():
        return result(label, f"skipped: GGUF file {gguf_path} not found (write it with write_gguf)")
    cmd = llama_bench_command(binary, gguf_path, n_gpu_layers=n_gpu_layers, threads=threads, n_gen=n_gen,
                              n_prompt=n_prompt, reps=reps, n_depth=n_depth, extra_args=extra_args)
    poller = _DeviceMemoryPoller(gpu_index)
    start = time.perf_counter()
    try:
        with poller:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_lib_env(binary))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return _partial(label, out, f"FAILED: timed out after {timeout_s:g} s", cmd, n_gpu_layers, threads)
    except OSError as e:
        return result(label, f"FAILED: could not run {binary}: {failure(e)}")
    wall_s = time.perf_counter() - start
    stderr_tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    if proc.returncode != 0:
        return _partial(label, proc.stdout, f"FAILED: llama-bench exited {proc.returncode}: {stderr_tail}", cmd,
                        n_gpu_layers, threads)
    try:
        records = parse_llama_bench_json(proc.stdout)
    except ValueError as e:
        return result(label, f"FAILED: {e}; stderr: {stderr_tail}")
    figures = llama_bench_figures(records)
    note = _note(records, n_gpu_layers, threads) + f"; wall {wall_s:.1f} s"
    if poller.gib is not None:
        note += "; peak_gpu_gib is the device-wide peak while llama-bench ran"
    missing = [k for k, want in (("decode_ms_b1", n_gen), (f"prefill_s_{n_prompt}", n_prompt))
               if want and k not in figures]
    if missing:
        note = f"FAILED: no figure for {', '.join(missing)} in llama-bench's output; " + note
    row = result(label, note, peak_gpu_gib=poller.gib, **figures)
    row["command"] = " ".join(cmd)
    return row


def _partial(label: str, stdout: str, why: str, cmd: list[str], n_gpu_layers: int, threads: int) -> dict[str, Any]:
    """A failure row that keeps the figures of the tests that finished before it (llama-bench prints each)."""
    try:
        records = parse_llama_bench_json(stdout)
    except ValueError:
        return result(label, why)
    row = result(label, f"{why}; {_note(records, n_gpu_layers, threads)}", **llama_bench_figures(records))
    row["command"] = " ".join(cmd)
    return row


def n_gpu_layers_for_budget(args: ModelArgs, gpu_gib: float, *, itemsize: float = 2, reserve_gib: float = 1.0,
                            context_len: int = 544) -> int:
    """The ``-ngl`` that keeps llama.cpp within about ``gpu_gib`` GiB of GPU memory, to compare it with our
    offload at the same budget: as many whole blocks (weights at ``itemsize`` bytes per parameter, plus
    their f16 KV cache for ``context_len`` positions) as fit after ``reserve_gib`` for llama.cpp's compute
    buffers. With fewer than all layers on the GPU, llama.cpp runs the rest, and the output head, on the CPU
    (the token embedding always stays there). Check the figure against the row's ``peak_gpu_gib``."""
    d, hd, kv, f = args.dim, args.head_dim, args.kv_heads, args.ffn_hidden_dim
    block = itemsize * (2 * d * d + 2 * kv * hd * d + 3 * f * d) + 4 * 2 * d + 2 * 2 * context_len * kv * hd
    n = int(max(0.0, gpu_gib - reserve_gib) * GiB // block)
    return min(n, args.n_layers)


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str = "Q8_0", bin_dir: str | Path | None = DEFAULT_BIN_DIR,
                  *, threads: int = 15, timeout_s: float = 1800) -> Path:
    """``llama-quantize SRC DST QTYPE THREADS`` (built beside llama-bench): a Q8_0 / Q4_0 / ... copy of an F16
    GGUF. Raises RuntimeError with the end of its output if it fails."""
    binary = find_binary(bin_dir, "llama-quantize")
    if binary is None:
        raise RuntimeError(f"no llama-quantize in {bin_dir} nor on PATH (../shared/tools/llamacpp-peer.sh build)")
    proc = subprocess.run([str(binary), str(src), str(dst), qtype, str(threads)], capture_output=True, text=True,
                          timeout=timeout_s, env=_lib_env(binary))
    if proc.returncode != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama-quantize exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return Path(dst)


# --- command line ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True, help="GGUF file to benchmark (written from --ckpt_dir if absent)")
    p.add_argument("--ckpt_dir", type=Path, default=None, help="Meta checkpoint to write --gguf from")
    p.add_argument("--dtype", default="F16", help="GGUF matrix type when writing: F16, BF16 or F32")
    p.add_argument("--quant", default=None, help="also quantize to this type (Q8_0, Q4_0, ...) with llama-quantize "
                                                 "and benchmark that file instead")
    p.add_argument("--bin_dir", type=Path, default=DEFAULT_BIN_DIR)
    p.add_argument("--ngl", default="99", help="-ngl values, comma-separated: one row each")
    p.add_argument("--threads", type=int, default=15)
    p.add_argument("--n_gen", type=int, default=32)
    p.add_argument("--n_prompt", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here, as a JSON list")
    a = p.parse_args(argv)

    if not a.gguf.is_file():
        if a.ckpt_dir is None:
            p.error(f"{a.gguf} does not exist; pass --ckpt_dir to write it from a Meta checkpoint")
        start = time.perf_counter()
        state_dict, args = meta_state_dict(a.ckpt_dir)
        write_gguf(state_dict, args, a.gguf, a.dtype)
        del state_dict
        print(f"wrote {a.gguf} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    target = a.gguf
    if a.quant:
        target = a.gguf.with_name(f"{a.gguf.stem}-{a.quant}.gguf")
        if not target.is_file():
            quantize_gguf(a.gguf, target, a.quant, a.bin_dir, threads=a.threads)
    rows = []
    for ngl in (int(x) for x in a.ngl.split(",") if x.strip()):
        rows.append(bench_llamacpp(target, a.bin_dir, ngl, a.threads, a.n_gen, a.n_prompt, reps=a.reps))
        print(json.dumps(rows[-1]), flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
