"""Peer baselines for the benchmark: Hugging Face accelerate's CPU offload and AirLLM, on our weights.

``scripts/bench/benchmark.py`` measures our offloading; this module measures two other ways of running a model
larger than the GPU, on the *same* weights, with one protocol (``common.measure_peer``):

- **accelerate**: ``AutoModelForCausalLM.from_pretrained(hf_dir, device_map="auto", max_memory={0: G, "cpu": big})``.
  The blocks that do not fit in ``G`` GiB stay in CPU memory and are copied to the GPU by accelerate's
  hooks at every forward, block by block, without overlap.
- **AirLLM** (``airllm.AutoModel``): splits the checkpoint once into one safetensors file per module
  (``<hf_dir>/splitted_model/model.layers.N.safetensors``, or under ``shards_dir``), then at every forward
  loads each module from its file (the page cache, once warm), copies it to the GPU, runs it and drops it;
  the next module's file is read on a worker thread meanwhile. AirLLM 4 drives transformers' own
  ``LlamaForCausalLM`` forward through hooks, so ``past_key_values`` / ``use_cache`` work: decode is a
  real KV-cached step, but every step still streams all of the model's weights to the GPU.

Both read a Hugging Face Llama directory; :func:`write_hf_checkpoint` writes one from a Meta state dict
(the q/k rows permuted as Hugging Face's ``convert_llama_weights_to_hf.py`` does, so the model is the same:
``tests/scripts/test_bench_peers.py`` checks that transformers' logits equal ``llama_offload.model.transformer.Transformer``'s).
It also writes a minimal word-level ``tokenizer.json`` covering the vocabulary: AirLLM's constructor calls
``AutoTokenizer.from_pretrained(hf_dir)`` unconditionally, and fails without one. Ids are random in the
benchmark, so the tokenizer is never used to encode anything.

The "HBM floor" of a step whose weights are all on the GPU is :func:`decode_read_bytes` (every weight read
once, plus the KV cache) divided by ``common.hbm_bandwidth`` (a device-to-device copy, measured in the same run).
Two more peers live beside this file, with the same row keys: ``bench_llamacpp.py`` (llama.cpp's
``llama-bench`` on a GGUF of the same weights) and ``bench_meta.py`` (Meta's reference ``llama_models`` code).

Offline use (the GPU machine has no network): every path here is local. ``HF_HUB_OFFLINE=1`` is set (unless
already set) before transformers is imported, so a stray hub call fails at once instead of timing out.
AirLLM only calls the hub when given a repo id instead of a directory.

Wheels the GPU machine needs for AirLLM
---------------------------------------
Given the GPU image (Python 3.12, torch 2.11 CUDA, transformers 5.17, accelerate 1.15, safetensors 0.8,
huggingface_hub 1.33, scipy; checked there: it also has tqdm, psutil, tokenizers 0.23 and sentencepiece
0.2.2), AirLLM needs exactly one wheel, pure Python, with no missing dependency::

    airllm==4.0.0          airllm-4.0.0-py3-none-any.whl  (83,338 bytes)

Download it (pure Python, so no platform flags)::

    python3 -m pip download --no-deps -d .whl airllm==4.0.0

and install it there with ``python3 -m pip install --no-index --no-deps .whl/airllm-4.0.0-py3-none-any.whl``
(or ``--target DIR`` and ``PYTHONPATH=DIR``). It declares ``tqdm, torch>=2.4, transformers>=4.49,<6,
accelerate>=1.0, safetensors, huggingface-hub, scipy, sentencepiece``, all present in the image; for a Llama it
imports none of ``optimum``, ``bitsandbytes`` (optional, only for ``compression='4bit'/'8bit'``, unused here)
or ``sentencepiece`` (only its Baichuan tokenizer, imported inside a try).

Disk: AirLLM's split is a second full copy of the weights (the HF directory is the first): a 7B fp16 model
needs ~13.5 GB for the Meta checkpoint + 13.5 GB for the HF directory + 13.5 GB for the split.

Usage
-----
    python scripts/bench/bench_peers.py --ckpt_dir checkpoints/random-7b --hf_dir /tmp/random-7b-hf \\
        --gpu_gb 8 --peers accelerate,airllm --json peers.json

converts the Meta checkpoint to ``--hf_dir`` (if that does not hold a ``config.json`` yet) and prints one
JSON object per peer. From Python: ``write_hf_checkpoint``, ``bench_accelerate``, ``bench_airllm``,
``decode_read_bytes``; the protocol, the rows and ``hbm_bandwidth`` are in ``common.py``, shared with the other peers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

# Before transformers / huggingface_hub are imported anywhere (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llama_offload.model.args import ModelArgs

from common import GiB, GpuPeak, baseline_note, failure, free_device, measure_peer, meta_state_dict, result

__all__ = [
    "hf_tensors",
    "write_hf_checkpoint",
    "bench_accelerate",
    "bench_airllm",
    "decode_read_bytes",
]


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_LAYER_NAMES = [  # Meta name -> Hugging Face name, in the order HF's LlamaDecoderLayer holds them
    ("attention.wq", "self_attn.q_proj"),
    ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"),
    ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
]
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: Llama's unk / bos / eos


# --- Meta -> Hugging Face checkpoint -------------------------------------------------------------------------


def _permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's q/k row order: within each head, Meta's interleaved RoPE pairs become two halves."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_tensors(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of a Meta state dict, in model order, lazily.

    q and k are permuted (a new tensor each); everything else is the state dict's own tensor, made
    contiguous. Raises KeyError naming the first missing Meta key.
    """

    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise KeyError(f"the Meta state dict has no {key!r} (expected {args.n_layers} layers)")
        return state_dict[key]

    yield "model.embed_tokens.weight", get("tok_embeddings.weight").contiguous()
    for i in range(args.n_layers):
        for meta, hf in _LAYER_NAMES:
            w = get(f"layers.{i}.{meta}.weight")
            if meta == "attention.wq":
                w = _permute_qk(w, args.n_heads)
            elif meta == "attention.wk":
                w = _permute_qk(w, args.kv_heads)
            yield f"model.layers.{i}.{hf}.weight", w.contiguous()
    yield "model.norm.weight", get("norm.weight").contiguous()
    yield "lm_head.weight", get("output.weight").contiguous()


def _hf_shapes(args: ModelArgs) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, Meta name) in the order of :func:`hf_tensors`, without touching any tensor."""
    d, hd, f = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"attention.wq": (d, d), "attention.wk": (args.kv_heads * hd, d), "attention.wv": (args.kv_heads * hd, d),
              "attention.wo": (d, d), "feed_forward.w1": (f, d), "feed_forward.w2": (d, f), "feed_forward.w3": (f, d),
              "attention_norm": (d,), "ffn_norm": (d,)}
    out = [("model.embed_tokens.weight", (args.vocab_size, d), "tok_embeddings.weight")]
    for i in range(args.n_layers):
        out += [(f"model.layers.{i}.{hf}.weight", shapes[meta], f"layers.{i}.{meta}.weight") for meta, hf in _LAYER_NAMES]
    out += [("model.norm.weight", (d,), "norm.weight"), ("lm_head.weight", (args.vocab_size, d), "output.weight")]
    return out


def hf_config(args: ModelArgs, dtype: torch.dtype, *, max_position_embeddings: int = 4096) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


def _write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """A word-level tokenizer.json with exactly ``vocab_size`` tokens: <unk> <s> </s> tok3 tok4 ...

    Only there so that loaders that insist on a tokenizer (AirLLM, ``convert_hf``) find one that matches
    the embedding table; the benchmark feeds token ids directly.
    """
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    vocab.update({f"tok{i}": i for i in range(len(_SPECIAL_TOKENS), vocab_size)})
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(_SPECIAL_TOKENS)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2), encoding="utf-8")


def write_hf_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path, *,
                        shard_bytes: int = 2 * 2**30, max_position_embeddings: int = 4096) -> None:
    """Write a Meta state dict as a Hugging Face Llama directory ``out_dir``, in the state dict's dtype.

    ``config.json`` (LlamaForCausalLM), ``model-0000X-of-0000N.safetensors`` shards of at most
    ``shard_bytes`` each (a tensor larger than that gets a shard of its own) with
    ``model.safetensors.index.json``, ``generation_config.json`` and a minimal tokenizer
    (:func:`_write_tokenizer`). q/k rows are permuted for Hugging Face's ``rotate_half`` RoPE.

    ``out_dir`` must not exist or be empty. Files are written to a sibling ``<out_dir>.partial`` first and
    renamed at the end, so an interrupted run never leaves a complete-looking directory. Peak extra memory
    is one shard's q/k copies (the other tensors are written from the state dict's own storage).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if args.vocab_size <= 0:
        raise ValueError("args.vocab_size must be set (it is -1); take it from the tokenizer first.")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, found {shard_bytes}.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; choose a new path or remove it.")

    # Check every tensor before writing anything: name, shape and one dtype for the whole model.
    plan = _hf_shapes(args)
    dtypes = set()
    for hf_name, shape, meta_name in plan:
        t = state_dict.get(meta_name)
        if t is None:
            raise KeyError(f"the Meta state dict has no {meta_name!r} (expected {args.n_layers} layers)")
        if tuple(t.shape) != shape:
            raise ValueError(f"{meta_name} has shape {tuple(t.shape)}, the model args imply {shape}.")
        dtypes.add(t.dtype)
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_NAMES:
        raise ValueError(f"expected one floating dtype among {list(_DTYPE_NAMES.values())} for all weights, "
                         f"found {sorted(str(d) for d in dtypes)}.")
    dtype = next(iter(dtypes))
    itemsize = torch.empty((), dtype=dtype).element_size()

    # Greedy packing in model order, as transformers' save_pretrained does.
    shards: list[list[str]] = [[]]
    used = 0
    sizes = {}
    for hf_name, shape, _ in plan:
        nbytes = itemsize * int(torch.Size(shape).numel())
        sizes[hf_name] = nbytes
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(hf_name)
        used += nbytes
    n = len(shards)
    file_of = {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, names in enumerate(shards) for name in names}

    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tensors = hf_tensors(state_dict, args)
        for i, names in enumerate(shards):
            chunk = {}
            for expected_name in names:
                name, t = next(tensors)
                assert name == expected_name, (name, expected_name)
                chunk[name] = t
            save_file(chunk, str(tmp / f"model-{i + 1:05d}-of-{n:05d}.safetensors"), metadata={"format": "pt"})
            del chunk
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        config = hf_config(args, dtype, max_position_embeddings=max_position_embeddings)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2), encoding="utf-8")
        _write_tokenizer(tmp, args.vocab_size, max_position_embeddings)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_config(hf_dir: Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))


# --- the device-memory floor (divided by common.hbm_bandwidth) ---------------------------------------------------


def decode_read_bytes(args: ModelArgs, *, itemsize: int = 2, batch: int = 1, context_len: int = 0) -> int:
    """Bytes one decode step must read from device memory: every weight matrix and norm once (the
    embedding table only for the ``batch`` rows looked up), plus ``context_len`` cached keys and values per
    sequence and layer, all at ``itemsize`` bytes. Divide by ``common.hbm_bandwidth`` for the HBM floor."""
    d, hd, kv, f = args.dim, args.head_dim, args.kv_heads, args.ffn_hidden_dim
    per_layer = d * d * 2 + 2 * kv * hd * d + 3 * f * d + 2 * d
    weights = args.n_layers * per_layer + d + args.vocab_size * d + batch * d
    cache = 2 * args.n_layers * batch * context_len * kv * hd
    return itemsize * (weights + cache)


# --- accelerate ----------------------------------------------------------------------------------------------


def _devices_of(module: str, device_map: dict[str, Any]) -> set[str]:
    """Where ``module``'s weights were placed: the entries for it and its submodules, else for its nearest parent."""
    inside = {str(dev) for key, dev in device_map.items() if key == module or key.startswith(module + ".")}
    if inside:
        return inside
    best, where = -1, None
    for key, dev in device_map.items():
        if (key == "" or module.startswith(key + ".")) and len(key) > best:
            best, where = len(key), dev
    return {str(where)}


def _device_map(model: torch.nn.Module) -> dict[str, Any]:
    """``model.hf_device_map``, or, where transformers set none (it leaves it out when everything fits on
    one device), the placement read from the parameters: a parameter accelerate offloaded sits on "meta"."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return dict(device_map)
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params:
            kinds = {p.device.type for p in params}
            out[name] = "cpu" if kinds & {"meta", "cpu"} else (0 if kinds == {"cuda"} else "/".join(sorted(kinds)))
    return out


def _placement_note(device_map: dict[str, Any], n_layers: int) -> tuple[str, int]:
    """("k/n layers on the GPU, ... (embed_tokens: 0, ...)", number of layers not wholly on the GPU)."""
    def on_gpu(devices: set[str]) -> bool:
        return all(d.isdigit() or d.startswith("cuda") for d in devices)

    layers = [_devices_of(f"model.layers.{i}", device_map) for i in range(n_layers)]
    n_gpu = sum(on_gpu(d) for d in layers)
    n_disk = sum("disk" in d for d in layers)
    n_cpu = n_layers - n_gpu - n_disk
    where = ", ".join(f"{m.split('.')[-1]}: {'+'.join(sorted(_devices_of(m, device_map)))}"
                      for m in ("model.embed_tokens", "model.norm", "lm_head"))
    text = f"{n_gpu}/{n_layers} layers on the GPU, {n_cpu} offloaded to CPU"
    if n_disk:
        text += f", {n_disk} to disk"
    return f"{text} ({where})", n_cpu + n_disk


def _cpu_budget_gib() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64
    return max(1, int(total * 0.9 / GiB))


def bench_accelerate(hf_dir: Path, gpu_memory_gb: float, *, steps: int = 8, seed: int = 0) -> dict:
    """accelerate's big-model inference with CPU offload, under a GPU budget of ``gpu_memory_gb`` GiB.

    ``from_pretrained(device_map="auto", max_memory={0: "<G>GiB", "cpu": <90% of RAM>})`` in float16; the
    layers that do not fit stay on the CPU and are copied to the GPU at each forward. The note says how
    many layers were placed on the GPU (and warns when nothing was offloaded).
    """
    name = f"accelerate ({gpu_memory_gb:g} GiB)"
    if not torch.cuda.is_available():
        return result(name, "skipped: CUDA is not available (accelerate's GPU offload needs a GPU)")
    device = torch.device("cuda", 0)
    figures: dict[str, Any] = {}
    model = None
    note = ""
    peak = GpuPeak(device)
    try:
        with peak:
            import transformers
            from transformers import AutoModelForCausalLM

            hf_dir = Path(hf_dir)
            n_layers = int(_read_config(hf_dir)["num_hidden_layers"])
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            dtype_kw = {"dtype": torch.float16} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float16}
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                hf_dir, device_map="auto", max_memory={0: f"{gpu_memory_gb:g}GiB", "cpu": f"{_cpu_budget_gib()}GiB"},
                **dtype_kw)
            model.eval()
            load_s = time.perf_counter() - start
            placement, offloaded = _placement_note(_device_map(model), n_layers)
            note = f"transformers {transformers.__version__}; {placement}; load {load_s:.1f} s"
            if offloaded == 0:
                note += "; WARNING: nothing was offloaded, the whole model fit in the budget"
            measure_peer(model, model.config.vocab_size, device, steps=steps, seed=seed, figures=figures)
            peak.read()
        return result(name, note + baseline_note(peak), peak_gpu_gib=peak.gib, **figures)
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report, not a crash
        stage = "" if figures else "building/warm-up: "
        return result(name, "; ".join(x for x in (f"FAILED {stage}{failure(e)}", note) if x), **figures)
    finally:
        del model
        free_device(device)


# --- AirLLM --------------------------------------------------------------------------------------------------


def bench_airllm(hf_dir: Path, *, steps: int = 8, seed: int = 0, device: str = "cuda:0",
                 shards_dir: Optional[Path] = None, keep_split: bool = False) -> dict:
    """AirLLM (``airllm.AutoModel.from_pretrained``) on a Hugging Face directory, in float16.

    The build splits the checkpoint into per-module files under ``<shards_dir or hf_dir>/splitted_model``
    (a second copy of the weights on disk: 13.5 GB for a 7B fp16 model); its time is in the note, not in the
    figures. A split made by this call is deleted at the end unless ``keep_split``; one found there is reused
    and kept. Decode uses the KV cache (AirLLM 4 runs
    transformers' forward), but each step still loads every module's weights from the split files and
    copies them to the GPU. ``device="cpu"`` runs it without a GPU (tests only: no memory figure).
    """
    name = "airllm"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return result(name, "skipped: CUDA is not available")
    hf_dir = Path(hf_dir)
    figures: dict[str, Any] = {}
    model = None
    note = ""
    peak = GpuPeak(dev)
    split_root = Path(shards_dir) if shards_dir is not None else hf_dir
    split_existed = (split_root / "splitted_model").exists()
    try:
        with peak:
            try:
                import airllm
                from airllm import AutoModel
            except ImportError as e:
                return result(name, f"not installed: {failure(e)} (pip install --no-index --no-deps "
                                     ".whl/airllm-4.0.0-py3-none-any.whl)")
            version = getattr(airllm, "__version__", None)
            if version is None:
                from importlib.metadata import PackageNotFoundError, version as _version
                try:
                    version = _version("airllm")
                except PackageNotFoundError:
                    version = "?"
            start = time.perf_counter()
            kwargs: dict[str, Any] = dict(device=device, dtype=torch.float16)
            if shards_dir is not None:
                kwargs["layer_shards_saving_path"] = str(shards_dir)
            model = AutoModel.from_pretrained(str(hf_dir), **kwargs)
            build_s = time.perf_counter() - start
            note = (f"airllm {version}; KV cache used (transformers' forward); every step streams all layers "
                    f"from {split_root / 'splitted_model'} to {device} (pinned copy, then gc.collect + "
                    f"cuda.empty_cache after each module); build {build_s:.1f} s"
                    + ("" if split_existed else " (includes splitting the checkpoint)"))
            measure_peer(model, int(model.config.vocab_size), dev, steps=steps, seed=seed, figures=figures)
            peak.read()
        return result(name, note + baseline_note(peak), peak_gpu_gib=peak.gib, **figures)
    except Exception as e:  # noqa: BLE001
        stage = "" if figures else "building/warm-up: "
        return result(name, "; ".join(x for x in (f"FAILED {stage}{failure(e)}", note) if x), **figures)
    finally:
        executor = getattr(model, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        del model
        free_device(dev)
        if not keep_split and not split_existed:
            shutil.rmtree(split_root / "splitted_model", ignore_errors=True)


# --- command line --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", type=Path, required=True, help="Hugging Face Llama directory (written if absent)")
    p.add_argument("--ckpt_dir", type=Path, help="Meta checkpoint to convert into --hf_dir when it has no config.json")
    p.add_argument("--gpu_gb", type=str, default="8", help="accelerate GPU budget(s) in GiB, comma-separated")
    p.add_argument("--peers", type=str, default="accelerate,airllm")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards_dir", type=Path, default=None, help="where AirLLM writes its split (default: --hf_dir)")
    p.add_argument("--keep_split", action="store_true", help="keep AirLLM's per-layer copy of the weights afterwards")
    p.add_argument("--json", type=Path, default=None, help="also write the results here, as a JSON list")
    a = p.parse_args(argv)

    if not (a.hf_dir / "config.json").is_file():
        if a.ckpt_dir is None:
            p.error(f"{a.hf_dir} has no config.json; pass --ckpt_dir to convert a Meta checkpoint into it")
        start = time.perf_counter()
        state_dict, args = meta_state_dict(a.ckpt_dir)
        write_hf_checkpoint(state_dict, args, a.hf_dir)
        del state_dict
        print(f"wrote {a.hf_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    results = []
    for peer in [x.strip() for x in a.peers.split(",") if x.strip()]:
        if peer == "accelerate":
            for g in a.gpu_gb.split(","):
                results.append(bench_accelerate(a.hf_dir, float(g), steps=a.steps, seed=a.seed))
                print(json.dumps(results[-1]), flush=True)
        elif peer == "airllm":
            results.append(bench_airllm(a.hf_dir, steps=a.steps, seed=a.seed, shards_dir=a.shards_dir,
                                        keep_split=a.keep_split))
            print(json.dumps(results[-1]), flush=True)
        else:
            p.error(f"unknown peer {peer!r} (known: accelerate, airllm)")
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
