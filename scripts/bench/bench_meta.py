"""Meta's reference Llama code as a benchmark peer, and as the reference our attention is checked against.

The code is ``llama_models/llama3/model.py`` from the PyPI wheel ``llama-models==0.3.0`` (Meta's own package;
the project already takes its Llama 3 tokenizer from it). That module needs only torch and fairscale: its
``Transformer`` is built from FairScale's model-parallel layers (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``), it keeps a KV cache of ``max_batch_size x max_seq_len`` per layer, and its
attention is the explicit math (``softmax(q k^T / sqrt(d) + mask) v``, no SDPA). The same file runs Llama 2
shapes: its ``ModelArgs`` has the same fields as ours (``n_kv_heads`` None means multi-head attention, the
SwiGLU width follows the same rule) and only its ``rope_theta`` default differs (500000), so every field is
passed explicitly. Parameter names equal the Meta checkpoint's keys, so ``consolidated.00.pth`` loads with
``strict=True``.

How it is run here, as Meta's ``Llama3.build`` does but in-process and without torchrun:

- a one-process ``torch.distributed`` group (gloo, a FileStore in a temporary directory) and FairScale's
  ``initialize_model_parallel(1)``; with one rank its layers never communicate. Both are torn down afterwards
  when this module made them (a group that already exists, e.g. under torchrun, is used and kept);
- the model is built under ``torch.device(device)`` with the default dtype set to ``dtype`` (Meta calls
  ``torch.set_default_device`` / ``set_default_dtype``), so the KV cache and RoPE table are made there; the
  weights are then assigned from the checkpoint tensor by tensor (``load_state_dict(assign=True)``), so the
  model is never held twice;
- ``forward(tokens, start_pos)`` is Meta's; :func:`bench_meta` times it with ``common.measure_peer``
  (the position plays the part of ``past_key_values``), exactly the protocol of the other peers.

On the GPU machine the wheel comes from ``.whl/`` (``pip install --no-index --no-deps --target /tmp/site
.whl/*.whl``). Elsewhere, ``ref_path`` (or LLAMA_OFFLOAD_META_REF) may name a directory holding
``llama_models/llama3/model.py`` and ``args.py`` (an unzipped wheel), as the CPU test does.

Usage::

    python scripts/bench/bench_meta.py --ckpt_dir /tmp/llama_offload_bench/meta-7b --steps 8

From Python: ``bench_meta``, ``meta_logits``, ``build_meta_model``, ``meta_reference``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator, Optional

import torch

from llama_offload.model.args import ModelArgs

from common import (
    DECODE_BATCHES, DECODE_PROMPT_LEN, PREFILL_LEN, WARMUP_LEN, GpuPeak, baseline_note, failure, free_device,
    measure_peer, meta_state_dict, result, sync,
)

__all__ = ["LLAMA_MODELS", "META_MODULE", "meta_reference", "meta_model_args", "model_parallel_group",
           "build_meta_model", "meta_logits", "bench_meta"]

LLAMA_MODELS = "llama-models==0.3.0"
META_MODULE = "llama_models.llama3.model"
ENV_VAR = "LLAMA_OFFLOAD_META_REF"
_INSTALL_HINT = ("pip install --no-index --no-deps --target /tmp/site .whl/llama_models-0.3.0-py3-none-any.whl "
                 "(the wheel: pip download --no-deps llama-models==0.3.0 -d .whl)")


def meta_reference(ref_path: str | Path | None = None) -> ModuleType:
    """Meta's ``llama_models.llama3.model`` module.

    From the installed package, or, with ``ref_path`` (else the LLAMA_OFFLOAD_META_REF variable), from the
    directory holding ``llama_models/`` (an unzipped wheel, or just ``llama3/model.py`` and ``llama3/args.py``
    under it). Raises ImportError with an install hint if neither is there.
    """
    ref_path = ref_path or os.environ.get(ENV_VAR) or None
    if ref_path is None:
        try:
            return importlib.import_module(META_MODULE)
        except ImportError as e:
            raise ImportError(f"Meta's reference model ({META_MODULE}, from {LLAMA_MODELS}) is not importable: "
                              f"{failure(e)}. Install it: {_INSTALL_HINT}") from e
    root = str(Path(ref_path).expanduser().resolve())
    if not (Path(root) / "llama_models" / "llama3" / "model.py").is_file():
        raise ImportError(f"{root} holds no llama_models/llama3/model.py (set {ENV_VAR} to an unzipped "
                          f"{LLAMA_MODELS} wheel)")
    loaded = sys.modules.get(META_MODULE)
    if loaded is not None and str(Path(loaded.__file__).resolve()).startswith(root):
        return loaded
    # Another copy may be imported already: import this one afresh.
    for name in [m for m in sys.modules if m == "llama_models" or m.startswith("llama_models.")]:
        del sys.modules[name]
    # The package from ``root`` by its spec, then its submodules through the package's own __path__: nothing
    # is added to the interpreter's import path.
    spec = importlib.machinery.PathFinder.find_spec("llama_models", [root])
    if spec is None:
        raise ImportError(f"{root}/llama_models is not importable as a package")
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_models"] = package
    try:
        if spec.loader is not None:  # None: a namespace package (no __init__.py), nothing to run
            spec.loader.exec_module(package)
        return importlib.import_module(META_MODULE)
    except BaseException:
        for name in [m for m in sys.modules if m == "llama_models" or m.startswith("llama_models.")]:
            del sys.modules[name]
        raise


def meta_model_args(module: ModuleType, args: ModelArgs, *, max_batch_size: int, max_seq_len: int) -> Any:
    """Meta's ``ModelArgs`` for our ``args``: every params.json field passed explicitly (Meta's llama3 defaults
    rope_theta to 500000, ours to 10000), and the run-time sizes of the KV cache."""
    margs = module.ModelArgs(**{**args.to_params(), "max_batch_size": max_batch_size, "max_seq_len": max_seq_len})
    for key, value in args.to_params().items():
        got = getattr(margs, key)
        if key == "n_kv_heads" and value is None:
            value = args.n_heads
        if got != value:
            raise ValueError(f"Meta's ModelArgs did not take {key}={value!r} (it holds {got!r}).")
    return margs


@contextlib.contextmanager
def model_parallel_group() -> Iterator[None]:
    """A one-process torch.distributed group (gloo) and FairScale model-parallel group of size 1, for the
    ``with`` block; an existing group is used and left alone."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    made_dist = made_mp = False
    tmp = None
    try:
        if not dist.is_initialized():
            tmp = tempfile.TemporaryDirectory(prefix="bench_meta_")
            store = dist.FileStore(os.path.join(tmp.name, "store"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            made_dist = True
        if not fs_init.model_parallel_is_initialized():
            with contextlib.redirect_stdout(io.StringIO()):  # FairScale prints the group sizes
                fs_init.initialize_model_parallel(1)
            made_mp = True
        if fs_init.get_model_parallel_world_size() != 1:
            raise RuntimeError("bench_meta runs Meta's model on one rank, but a model-parallel group of "
                               f"{fs_init.get_model_parallel_world_size()} ranks already exists.")
        yield
    finally:
        if made_mp:
            fs_init.destroy_model_parallel()
        if made_dist:
            dist.destroy_process_group()
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_meta_model(state_dict: dict[str, torch.Tensor], args: ModelArgs, *, device: torch.device | str = "cuda",
                     dtype: torch.dtype = torch.float16, max_batch_size: int = 8, max_seq_len: int = 1024,
                     module: Optional[ModuleType] = None, ref_path: str | Path | None = None) -> torch.nn.Module:
    """Meta's ``Transformer`` for ``args`` with ``state_dict``'s weights on ``device`` in ``dtype``.

    Call it inside :func:`model_parallel_group`. The KV cache holds ``max_batch_size x max_seq_len`` positions
    per layer (Meta allocates all of it up front); the RoPE table covers ``2 * max_seq_len``. Weights are
    moved one at a time (``strict=True``: names and shapes must match Meta's module exactly).
    """
    module = module or meta_reference(ref_path)
    device = torch.device(device)
    margs = meta_model_args(module, args, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    with torch.device(device), _default_dtype(dtype):
        # fairscale makes its weights with the legacy torch.Tensor(n, m) constructor, which ignores the
        # default device: they are uninitialised host memory until replaced below.
        model = module.Transformer(margs)
    weights = {k: v.detach().to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    del weights
    model.to(device)  # a no-op unless Meta's code left something behind
    return model.eval()


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # on the CPU, reference counting frees the model; a full gc.collect is slow
        free_device(device)


def _forward(model: torch.nn.Module):
    """Meta's ``forward(tokens, start_pos)`` in the call shape ``measure_peer`` drives: the "cache" handed
    back is the next position (Meta's KV cache lives inside the model; a call with None starts at 0)."""

    def forward(*, input_ids: torch.Tensor, past_key_values: Optional[int], use_cache: bool = True):
        start = 0 if past_key_values is None else int(past_key_values)
        logits = model(input_ids, start)
        return SimpleNamespace(logits=logits, past_key_values=start + input_ids.shape[1])

    return forward


def _load(ckpt_dir: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    from llama_offload.checkpoint.load import load_state_dict

    return load_state_dict(ckpt_dir, args, show_progress=False)


def _seq_len_for(steps: int) -> int:
    return max(PREFILL_LEN, WARMUP_LEN, DECODE_PROMPT_LEN + steps)


def meta_logits(ckpt_dir: str | Path, args: ModelArgs, tokens: torch.Tensor, *, decode_steps: int = 4,
                device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16,
                state_dict: Optional[dict[str, torch.Tensor]] = None,
                ref_path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Meta's logits for the prompt ``tokens`` (b, n), then for ``decode_steps`` greedy steps.

    Returns ``(prefill_logits (b, n, vocab), next_tokens (b, decode_steps), decode_logits (b, decode_steps,
    vocab))``, float32 on the CPU: step i feeds the argmax of the previous logits at position n + i, as
    generation does. Compare against our model fed the same tokens (``model(tokens, 0)``, then
    ``model(next_tokens[:, i:i+1], n + i)``). ``state_dict`` skips reading ``ckpt_dir`` (tests).
    """
    sd = state_dict if state_dict is not None else _load(Path(ckpt_dir), args)
    b, n = tokens.shape
    with model_parallel_group():
        model = build_meta_model(sd, args, device=device, dtype=dtype, max_batch_size=b,
                                 max_seq_len=n + decode_steps, ref_path=ref_path)
        try:
            with torch.inference_mode():
                prefill = model(tokens.to(device), 0)
                token = prefill[:, -1].argmax(-1, keepdim=True)
                fed, decoded = [], []
                for i in range(decode_steps):
                    fed.append(token)
                    out = model(token, n + i)
                    decoded.append(out[:, -1])
                    token = out[:, -1].argmax(-1, keepdim=True)
            empty = torch.empty(b, 0, dtype=torch.long)
            return (prefill.float().cpu(),
                    torch.cat(fed, 1).cpu() if fed else empty,
                    torch.stack(decoded, 1).float().cpu() if decoded else torch.empty(b, 0, prefill.shape[-1]))
        finally:
            del model
            _free(torch.device(device))


def bench_meta(ckpt_dir: str | Path, args: ModelArgs, steps: int = 8, *, seed: int = 0,
               device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16, max_batch_size: int = 8,
               ref_path: str | Path | None = None) -> dict[str, Any]:
    """Meta's reference model, all resident on ``device``, timed with ``common.measure_peer``.

    Figures: ``prefill_s_512`` (one forward of 512 tokens), ``decode_ms_b1`` and ``decode_ms_b8`` (a 16-token
    prompt, then ``steps`` single-token forwards each feeding back the argmax; ``b8`` only when
    ``max_batch_size`` >= 8), ``peak_gpu_gib`` (torch's peak allocation while it was built and ran, KV cache of
    ``max_batch_size x 528`` positions included). ``device="cpu"`` runs it without a GPU (tests only).
    Never raises: a missing package or a failure comes back as the row's note.
    """
    name = "Meta reference (llama-models)"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return result(name, "skipped: CUDA is not available")
    try:
        module = meta_reference(ref_path)
    except ImportError as e:
        return result(name, f"not installed: {e}")
    figures: dict[str, Any] = {}
    note = ""
    model = None
    peak = GpuPeak(dev)
    try:
        with model_parallel_group(), peak:
            start = time.perf_counter()
            sd = _load(Path(ckpt_dir), args)
            model = build_meta_model(sd, args, device=dev, dtype=dtype, max_batch_size=max_batch_size,
                                     max_seq_len=_seq_len_for(steps), module=module)
            del sd
            sync(dev)
            load_s = time.perf_counter() - start
            version = _version()
            note = (f"llama-models {version} llama3/model.py, {str(dtype).removeprefix('torch.')} on {dev.type}, "
                    f"all resident; explicit attention math, KV cache {max_batch_size}x{_seq_len_for(steps)}; "
                    f"load {load_s:.1f} s")
            batches = tuple(b for b in DECODE_BATCHES if b <= max_batch_size)
            measure_peer(_forward(model), args.vocab_size, dev, steps=steps, seed=seed,
                                     figures=figures, batches=batches)
            if len(batches) < len(DECODE_BATCHES):
                note += f"; no decode_ms_b8: max_batch_size {max_batch_size}"
            peak.read()
        return result(name, note + baseline_note(peak), peak_gpu_gib=peak.gib, **figures)
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report
        stage = "" if figures else "building/warm-up: "
        return result(name, "; ".join(x for x in (f"FAILED {stage}{failure(e)}", note) if x), **figures)
    finally:
        del model
        _free(dev)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-models")
    except PackageNotFoundError:
        return LLAMA_MODELS.split("==")[1] + " (unpacked)"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", type=Path, required=True, help="Meta checkpoint (params.json, consolidated.00.pth)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--ref_path", type=Path, default=None, help=f"unzipped {LLAMA_MODELS} (default: the installed one)")
    p.add_argument("--json", type=Path, default=None, help="also write the row here")
    a = p.parse_args(argv)
    args = ModelArgs.from_json(a.ckpt_dir / "params.json")
    if args.vocab_size == -1:  # take it from the tokenizer (common.meta_state_dict)
        args = meta_state_dict(a.ckpt_dir)[1]
    row = bench_meta(a.ckpt_dir, args, a.steps, device=a.device, dtype=getattr(torch, a.dtype),
                     max_batch_size=a.max_batch_size, ref_path=a.ref_path)
    print(json.dumps(row), flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0 if not row["note"].startswith(("FAILED", "not installed")) else 1


if __name__ == "__main__":
    sys.exit(main())
