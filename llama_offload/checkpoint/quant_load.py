"""Loading quantized models: checkpoints that store quant.py's layout, and 16-bit ones quantized while loading.

A quantized checkpoint is one ``consolidated.00.pth`` whose quantized matrices carry ``.scales`` (and maybe
``.mins``) beside their int8/uint8 ``.weight``; its ``llama_offload.json`` records the format in
``"quantization"``. The state dict describes itself (bits from the weight's dtype, group size from the
scales' shape), so a GGUF that mixes types per tensor loads like a uniform one.

Each quantized matrix replaces its ``nn.Linear`` / ``nn.Embedding`` with ``QuantLinear`` / ``QuantEmbedding``
under the same name, on the meta device, before ``load_state_dict(assign=True)``: the bytes stay file-backed
until the pager pins them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from llama_offload.checkpoint.meta import META_FILENAME, read_checkpoint_meta
from llama_offload.checkpoint.record import CheckpointInfo
from llama_offload.model import parallel
from llama_offload.model.args import ModelArgs
from llama_offload.model.quant import (
    EMBEDDING_NAMES, FORMAT_VERSION, LINEAR_NAMES, QuantEmbedding, QuantLinear, QuantSpec, dequantize, in_features,
    quantize_matrix, scratch_bytes,
)

QUANT_PARTS = ("weight", "scales", "mins")


def read_quantization(ckpt_dir: CheckpointInfo | str | Path) -> Optional[dict[str, Any]]:
    """The checkpoint's "quantization" record (None: not quantized); a format newer than this reader is refused."""
    if isinstance(ckpt_dir, CheckpointInfo):
        meta, ckpt_dir = ckpt_dir.meta, ckpt_dir.path
    else:
        meta = read_checkpoint_meta(ckpt_dir)
    record = meta.get("quantization")
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"{Path(ckpt_dir) / META_FILENAME}: \"quantization\" must be a JSON object, found "
                         f"{type(record).__name__}. The file is damaged: re-run the conversion or quantization that "
                         "wrote the checkpoint.")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{Path(ckpt_dir) / META_FILENAME} records a quantization format version {version!r}; this version of "
            f"llama_offload reads version {FORMAT_VERSION}. The checkpoint was written by a newer llama_offload: "
            "upgrade it (pip install -U llama_offload), or quantize the 16-bit original with this one."
        )
    return record


def matrix_names(args: ModelArgs, embeddings: bool) -> list[str]:
    """The matrices (without ``.weight``) a spec quantizes, in model order."""
    names = [f"layers.{i}.{name}" for i in range(args.n_layers) for name in LINEAR_NAMES]
    return (["tok_embeddings"] if embeddings else []) + names + (["output"] if embeddings else [])


def quantized_prefixes(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".scales")] for k in state_dict if k.endswith(".scales")]


def check_quantized_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                               source: str) -> None:
    """Every key of ``expected`` present, plain with its shape or quantized with shapes that fit it."""
    prefixes = set(quantized_prefixes(state_dict))
    allowed = set(expected) | {f"{p}.{part}" for p in prefixes for part in ("scales", "mins")}
    unexpected = set(state_dict) - allowed
    missing = set(expected) - set(state_dict)
    if missing or unexpected:
        raise RuntimeError(f"{source} does not fit params.json: missing {sorted(missing)[:6] or 'nothing'}, "
                           f"unexpected {sorted(unexpected)[:6] or 'nothing'}. Re-convert or re-quantize it.")
    for key, want in expected.items():
        t, prefix = state_dict[key], key.removesuffix(".weight")
        if prefix not in prefixes:
            if t.shape != want:
                raise RuntimeError(f"{source}: {key} has shape {tuple(t.shape)}, params.json implies {tuple(want)}.")
            continue
        scales, mins = state_dict[f"{prefix}.scales"], state_dict.get(f"{prefix}.mins")
        ok = (t.dtype in (torch.int8, torch.uint8) and t.ndim == 2 and (t.shape[0], in_features(t)) == tuple(want)
              and scales.ndim == 2 and scales.shape[0] == want[0] and scales.shape[1] > 0
              and want[1] % scales.shape[1] == 0 and scales.dtype in (torch.float16, torch.float32)
              and (mins is None or (mins.shape == scales.shape and mins.dtype == scales.dtype)))
        if not ok:
            found = {part: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                     for part in QUANT_PARTS if (v := state_dict.get(f"{prefix}.{part}")) is not None}
            raise RuntimeError(
                f"{source}: the quantized {prefix} ({found}) does not fit a {tuple(want)} matrix: expected an int8 "
                "(out, in) or uint8 (out, in/2) weight and fp16/fp32 scales (out, in/group). Re-quantize it.")


def quantize_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs, spec: QuantSpec, *,
                        show_progress: bool = True, device: Optional[torch.device | str] = None
                        ) -> dict[str, torch.Tensor]:
    """``--quantize`` at load: each matrix quantized in turn (a chunk of rows in fp32 at a time), the rest kept as
    is. ``device``: where to compute (a GPU quantizes a 7B model in seconds, the CPU takes minutes); the codes are
    the same on every device and always returned in host memory."""
    names = matrix_names(args, spec.embeddings)
    spec.check_shapes({n: tuple(state_dict[f"{n}.weight"].shape) for n in names})
    out = dict(state_dict)
    start, last = time.perf_counter(), 0.0
    for i, name in enumerate(names):
        w = out.pop(f"{name}.weight")
        bits, group = (8, None) if name in EMBEDDING_NAMES else (spec.bits, spec.group_size)
        out.update({f"{name}.{k}": v for k, v in quantize_matrix(w, bits, group, device=device).items()})
        now = time.perf_counter()
        if show_progress and (now - last > 0.5 or i + 1 == len(names)):
            last = now
            bar = "#" * (30 * (i + 1) // len(names))
            where = "" if device is None else f" on {device}"
            print(f"\rquantizing to {spec.name}{where}: [{bar:<30}] {i + 1}/{len(names)} matrices, {now - start:.1f} s",
                  end="\n" if i + 1 == len(names) else "", file=sys.stderr, flush=True)
    return {k: out[k] for k in _model_order(out, state_dict)}


def _model_order(out: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> list[str]:
    order = []
    for key in original:
        prefix = key.removesuffix(".weight")
        order += [k for k in (key, f"{prefix}.scales", f"{prefix}.mins") if k in out and k not in order]
    return order + [k for k in out if k not in order]


def slice_for_rank(state_dict: dict[str, torch.Tensor], split_dims: dict[str, Optional[int]], rank: int,
                   world_size: int, source: str) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of a quantized state dict: rows of all three tensors for a split along the output
    features; for a split along the input features, whole groups of codes and their scales (a per-channel scale
    is kept whole by every rank)."""
    out: dict[str, torch.Tensor] = {}
    quantized = set(quantized_prefixes(state_dict))
    for key, t in state_dict.items():
        part = key.rsplit(".", 1)[-1]
        prefix = key[: -len(part) - 1]
        d = split_dims.get(f"{prefix}.weight") if prefix in quantized else split_dims.get(key)
        if d is None:
            out[key] = t
            continue
        if prefix in quantized and part != "weight" and d == 1 and t.shape[1] == 1:
            out[key] = t  # one scale per output channel: each rank's part of the row keeps it
            continue
        length = t.shape[d]
        if length % world_size:
            scales = state_dict[f"{prefix}.scales"]
            raise ValueError(
                f"{source}: {prefix} has {scales.shape[1]} quantization groups along its input features, which "
                f"{world_size} ranks cannot split into whole groups. Run with a process count that divides "
                f"{scales.shape[1]}, or quantize with a smaller --group_size.")
        n = length // world_size
        out[key] = t.narrow(d, rank * n, n).contiguous()
    return out


def dequantize_embeddings(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The embedding and head back in 16/32 bits (model parallelism splits them as plain matrices)."""
    out = dict(state_dict)
    for name in EMBEDDING_NAMES:
        if f"{name}.scales" in out:
            out[f"{name}.weight"] = dequantize(out[f"{name}.weight"], out.pop(f"{name}.scales"),
                                               out.pop(f"{name}.mins", None), dtype)
    return out


def swap_quantized_modules(model: nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace each quantized matrix's module (built on the meta device) by its quantized form, same name."""
    for prefix in quantized_prefixes(state_dict):
        shapes = {part: (state_dict[f"{prefix}.{part}"].shape, state_dict[f"{prefix}.{part}"].dtype)
                  for part in QUANT_PARTS if f"{prefix}.{part}" in state_dict}
        old = model.get_submodule(prefix)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantEmbedding.empty(shapes, dtype=dtype)
        else:
            kind = ("column" if isinstance(old, parallel.ColumnParallelLinear)
                    else "row" if isinstance(old, parallel.RowParallelLinear) else None)
            new = QuantLinear.empty(shapes, parallel=kind, gather_output=bool(getattr(old, "gather_output", False)))
        model.set_submodule(prefix, new)


def quantized_weight_bytes(state_dict: dict[str, torch.Tensor], args: ModelArgs,
                           dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(largest block, embedding, head + norm, dequantization scratch) in bytes, from the tensors themselves."""
    def nbytes(keys: list[str]) -> int:
        return sum(state_dict[k].numel() * (dtype.itemsize if state_dict[k].is_floating_point()
                                            and not k.endswith((".scales", ".mins")) else state_dict[k].element_size())
                   for k in keys)

    blocks = [nbytes([k for k in state_dict if k.startswith(f"layers.{i}.")]) for i in range(args.n_layers)]
    embedding = nbytes([k for k in state_dict if k.startswith("tok_embeddings.")])
    head = nbytes([k for k in state_dict if k.startswith(("output.", "norm."))])
    shapes = [(state_dict[f"{p}.weight"].shape[0], in_features(state_dict[f"{p}.weight"]))
              for p in quantized_prefixes(state_dict) if p != "tok_embeddings"]
    return max(blocks), embedding, head, scratch_bytes(shapes, dtype)


def quantize_model(model: nn.Module, spec: QuantSpec, *,
                   weight_of: Optional[Callable[[str, tuple[int, int]], torch.Tensor]] = None,
                   device: Optional[torch.device | str] = None) -> nn.Module:
    """Quantize a built ``Transformer`` in place: the blocks' matrices (and with ``spec.embeddings`` the embedding
    and head) become QuantLinear / QuantEmbedding holding their codes on the CPU.

    ``weight_of(name, (out, in))`` supplies each matrix instead of the module's own weight: a model too large for
    host memory in 16 bits (a 70B) can be quantized from weights drawn one matrix at a time on the GPU.
    ``device``: where to quantize (default: where the weight is)."""
    dtype = model.dtype
    for name in matrix_names(model.params, spec.embeddings):
        old = model.get_submodule(name)
        shape = tuple(old.weight.shape)
        w = old.weight if weight_of is None else weight_of(name, shape)
        bits, group = (8, None) if name in EMBEDDING_NAMES else (spec.bits, spec.group_size)
        q = quantize_matrix(w, bits, group, device=device)
        new = (QuantEmbedding(q["weight"], q["scales"], q.get("mins"), dtype=dtype) if isinstance(old, nn.Embedding)
               else QuantLinear(q["weight"], q["scales"], q.get("mins")))
        model.set_submodule(name, new)
    return model
