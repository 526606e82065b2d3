"""Hugging Face Llama directories (config.json + safetensors) to Meta checkpoints.

Hugging Face's ``convert_llama_weights_to_hf.py`` reorders the rows of every q and k projection so that
its ``rotate_half`` RoPE (channel i paired with i + head_dim/2) computes what Meta's complex RoPE
(channel 2i paired with 2i + 1) computes on the original rows. Our model is Meta's, so conversion undoes
that permutation (:func:`permute_hf_to_meta`); everything else is a renaming.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import expected_shapes, save_checkpoint
from llama_offload.checkpoint.output_dir import check_free_space, check_out_dir, output_dir
from llama_offload.convert.common import detect_chat_format, ffn_params
from llama_offload.model.dtypes import dtype_name, parse_dtype
from llama_offload.checkpoint.meta import write_checkpoint_meta
from llama_offload.text.tokenizer import DEFAULT_TOKENIZER_FILENAME, HF_TOKENIZER_FILENAME, load_tokenizer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "convert_hf",
    "hf_name_to_meta",
    "permute_hf_to_meta",
    "permute_meta_to_hf",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Copied when present: the tokenizer itself and what says how to use it (special tokens, chat template, stops).
_TOKENIZER_FILES = (HF_TOKENIZER_FILENAME, DEFAULT_TOKENIZER_FILENAME, "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}


def _say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's q/k reordering: within each head, the interleaved pairs become two halves."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)  # (dim1, dim2)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_meta_to_hf`: the halves go back to interleaved pairs."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)  # (dim1, dim2)


def hf_name_to_meta(name: str) -> Optional[str]:
    """Meta's name for a Hugging Face Llama weight, or None if it has none."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[5] == "weight":
        sub = _LAYER_MAP.get(f"{parts[3]}.{parts[4]}")
        if sub is not None:
            return f"layers.{parts[2]}.{sub}.weight"
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[4] == "weight":
        sub = _LAYER_MAP.get(parts[3])
        if sub is not None:
            return f"layers.{parts[2]}.{sub}.weight"
    return None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the {what} from the model's files.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object ({what}), found {type(data).__name__}.")
    return data


def _model_args(config: dict[str, Any], path: Path) -> tuple[ModelArgs, dict[str, Any]]:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type is {model_type!r}; only Llama-architecture models can be converted "
                         f"(model_type {', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)}).")
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r} (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            unsupported.append(f"{key} true (Llama's projections have no bias)")
    rope = config.get("rope_scaling") or {}
    rope_params = config.get("rope_parameters") or {}  # newer transformers keep rope settings here
    rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type", "default")
    if rope_type != "default":
        unsupported.append(f"RoPE scaling of type {rope_type!r} (only plain RoPE is implemented)")
    dim, n_heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(dim, int) or not isinstance(n_heads, int) or n_heads <= 0 or dim % n_heads:
        raise ValueError(f"{path}: hidden_size {dim!r} must be a multiple of num_attention_heads {n_heads!r}.")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        unsupported.append(f"head_dim {head_dim} different from hidden_size / num_attention_heads = {dim // n_heads}")
    if unsupported:
        raise ValueError(f"{path} describes a model with features this package does not implement: "
                         f"{'; '.join(unsupported)}. Its outputs would be wrong, so it is not converted.")

    hidden = config.get("intermediate_size")
    if not isinstance(hidden, int):
        raise ValueError(f"{path}: intermediate_size should be an integer, found {hidden!r}.")
    rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    args = ModelArgs.from_dict(dict(
        dim=dim,
        n_layers=config.get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config.get("vocab_size"),
        **ffn_params(dim, hidden),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
    ), source=str(path))
    assert args.ffn_hidden_dim == hidden, (args, hidden)
    context = config.get("max_position_embeddings")
    window = config.get("sliding_window")
    if isinstance(window, int) and isinstance(context, int) and window < context:
        # Sliding-window attention equals full attention up to the window; past it we would differ.
        _say(f"{path}: sliding_window {window} < max_position_embeddings {context}; outputs are exact only up to "
             f"{window} tokens, which is recorded as the context length.")
        context = window
    return args, {"context_length": context}


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """Weight name -> safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map; restore it from the model's files.")
        files = {name: hf_dir / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists {missing} but {hf_dir} lacks them; download the missing shards.")
        return files
    single = hf_dir / "model.safetensors"
    found = [single] if single.is_file() else sorted(hf_dir.glob("*.safetensors"))
    if len(found) != 1:
        other = sorted(p.name for p in hf_dir.glob("*.bin"))
        raise FileNotFoundError(
            f"{hf_dir} has {'no' if not found else len(found)} *.safetensors file(s) "
            f"{'' if not found else [p.name for p in found]} and no model.safetensors.index.json. Expected "
            "model.safetensors, or sharded files with their index"
            + (f" (PyTorch .bin weights {other} are not read: convert them to safetensors first)." if other else ".")
        )
    from safetensors import safe_open

    with safe_open(found[0], framework="pt") as f:
        return {name: found[0] for name in f.keys()}


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _estimated_bytes(hf_dir: Path, dtype: Optional[torch.dtype]) -> int:
    """The size of the checkpoint converted from ``hf_dir`` in ``dtype`` (None: the embedding's dtype, as
    ``_load_weights`` does), from the safetensors headers alone."""
    from safetensors import safe_open

    numel: dict[str, int] = {}
    itemsize: dict[str, int] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in _weight_files(hf_dir).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                numel[name] = int(math.prod(sl.get_shape()))
                itemsize[name] = _SAFETENSORS_ITEMSIZE.get(str(sl.get_dtype()), 4)
    out = dtype.itemsize if dtype is not None else itemsize.get("model.embed_tokens.weight", 4)
    total = sum(n for name, n in numel.items() if hf_name_to_meta(name) is not None)
    if "lm_head.weight" not in numel:  # tied: the head is written as a copy of the embedding
        total += numel.get("model.embed_tokens.weight", 0)
    tokenizer = sum((hf_dir / n).stat().st_size for n in _TOKENIZER_FILES if (hf_dir / n).is_file())
    return total * out + tokenizer


def _load_weights(hf_dir: Path, args: ModelArgs, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = _weight_files(hf_dir)
    expected = expected_shapes(args)
    meta_names, unknown = {}, []
    for name in files:
        meta = hf_name_to_meta(name)
        if meta is None:
            if not name.endswith("rotary_emb.inv_freq"):  # a buffer old exports saved; recomputed at run time
                unknown.append(name)
        elif meta not in expected:
            raise ValueError(f"{hf_dir}: weight {name} does not fit config.json ({args.n_layers} layers).")
        else:
            meta_names[meta] = name
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        hint = " Bias weights are not part of Llama." if any(n.endswith(".bias") for n in unknown) else ""
        raise ValueError(f"{hf_dir} has weights a Llama model does not: {shown}.{hint}")
    missing = sorted(set(expected) - set(meta_names) - {"output.weight"})
    if missing:
        raise ValueError(f"{hf_dir} lacks the weights for {missing[:8]}; the download is incomplete.")

    state_dict: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for key in expected:
            if key not in meta_names:
                continue
            name = meta_names[key]
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            w = handles[path].get_tensor(name)
            if key.endswith("attention.wq.weight"):
                w = permute_hf_to_meta(w, args.n_heads)
            elif key.endswith("attention.wk.weight"):
                w = permute_hf_to_meta(w, args.kv_heads)
            if w.shape != expected[key]:
                raise ValueError(f"{path.name}: {name} has shape {tuple(w.shape)}, config.json implies "
                                 f"{tuple(expected[key])} for {key}.")
            state_dict[key] = w
    if "output.weight" not in state_dict:  # tie_word_embeddings: the head reuses the embedding
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()
    # One dtype for the whole model: the embedding's unless asked otherwise (norms saved in fp32 next to
    # bf16 matrices would otherwise turn activations fp32 halfway through a block).
    target = dtype or state_dict["tok_embeddings.weight"].dtype
    return {k: state_dict[k].to(target).contiguous() for k in expected}


def _pick_tokenizer(out: Path, vocab_size: int, chat_format: Optional[str]) -> str:
    # Meta's SentencePiece file when it covers the whole vocabulary (Llama 1/2, Mistral: the project's
    # reference path); tokenizer.json when the model added tokens to it or chats in ChatML.
    names = [n for n in (DEFAULT_TOKENIZER_FILENAME, HF_TOKENIZER_FILENAME) if (out / n).is_file()]
    if chat_format == "chatml":
        names.sort(key=lambda n: n != HF_TOKENIZER_FILENAME)
    if not names:
        raise FileNotFoundError(f"No tokenizer: expected {HF_TOKENIZER_FILENAME} or {DEFAULT_TOKENIZER_FILENAME} "
                                "in the Hugging Face directory.")
    sizes = {}
    for name in names:
        n_words = load_tokenizer(out / name).n_words
        if n_words == vocab_size:
            return name
        sizes[name] = n_words
    raise ValueError(f"config.json has vocab_size {vocab_size}, but the tokenizer files have {sizes} tokens. "
                     "Models whose embedding table is padded beyond the tokenizer are not supported yet.")


def convert_hf(hf_dir: str | Path, out_dir: str | Path, *, dtype: Optional[str | torch.dtype] = None,
               force: bool = False) -> Path:
    """Convert a Hugging Face Llama directory into a Meta checkpoint directory; return the directory.

    ``hf_dir`` holds ``config.json``, ``model.safetensors`` (or shards with ``model.safetensors.index.json``)
    and ``tokenizer.json`` and/or ``tokenizer.model``. ``dtype`` None keeps the weights' dtype. The q/k
    rows are put back in Meta's order. The tokenizer files are copied, and ``llama_offload.json`` records
    the chat format found in ``tokenizer_config.json``'s chat template (null if none is recognised).
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir).expanduser()
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a Hugging Face model directory (config.json, "
                                "*.safetensors, tokenizer files).")
    torch_dtype = parse_dtype(dtype)
    config = _read_json(config_path, "model config")
    args, extra = _model_args(config, config_path)
    # The head is the embedding (written as a copy); info counts that matrix once.
    extra["tied_embeddings"] = bool(config.get("tie_word_embeddings", False))
    out_dir = check_out_dir(out_dir, force=force, sources=[hf_dir])
    tok_config_path = hf_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path, "tokenizer config") if tok_config_path.is_file() else {}
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        template = next((d.get("template") for d in template if isinstance(d, dict) and d.get("name") == "default"), None)
    chat_format = detect_chat_format(template if isinstance(template, str) else None)

    needed = _estimated_bytes(hf_dir, torch_dtype)
    check_free_space(out_dir, needed)  # before any weight is read

    _say(f"converting {hf_dir}: {args.n_layers} layers, dim {args.dim}")
    state_dict = _load_weights(hf_dir, args, torch_dtype)
    out_dtype = next(iter(state_dict.values())).dtype
    with output_dir(out_dir, force=force, sources=[hf_dir], needed_bytes=needed) as tmp:
        save_checkpoint(state_dict, args, tmp)
        for name in _TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        tokenizer = _pick_tokenizer(tmp, args.vocab_size, chat_format)
        write_checkpoint_meta(
            tmp, chat_format=chat_format, tokenizer=tokenizer,
            source={"format": "huggingface", "path": str(hf_dir.resolve()), "model_type": config.get("model_type"),
                    "name": config.get("_name_or_path")},
            dtype=dtype_name(out_dtype), **extra,
        )
    if chat_format is None:
        _say("no ChatML or Llama 2 chat template found (chat_format recorded as null): use text completion, "
             "or pick a chat format by hand.")
    _say(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s (chat format: {chat_format}, tokenizer: {tokenizer})")
    return out_dir
