"""Speculative decoding on the GPU: tokens per pass, ms per pass and tokens/s of each draft against plain greedy
decoding of the same paged model, in one process.

    python scripts/bench/bench_speculative.py --ckpt_dir /tmp/smollm2-fp16 --out BENCHMARKS.md --json_out /tmp/bench_spec.json

Two parts:

- A real model (``--ckpt_dir``, a Meta-layout checkpoint in 16 bits; the project's default model converted with
  ``llama-offload convert gguf ... --dtype float16`` is what we run): every block paged from pinned host memory,
  one block per slice, batch 1, greedy. Each of the prompts below (10 chat questions, 5 rewriting and summarising
  tasks) is decoded by plain greedy decoding and by each draft (``--drafts``: ngram, the int8 and the int4 g64
  self-draft) at each K of ``--ks``. A row reports tokens per pass (the decoder's kept drafts + 1), decode ms per
  pass (drafting included; the prefill is not timed), decode tokens/s, the speed-up over plain and whether every
  prompt's tokens equal plain greedy's. Every variant decodes one prompt first, untimed (warm-up).
- 7B-shaped, random N(0, 0.02) fp16 weights, every block paged (``--shape``; ``--shape none`` skips it): ms per
  pass of plain decoding and of the ngram and int4 self-drafts at each K, drafting included, and the floor of a
  pass (the paged bytes over the pinned host-to-device bandwidth measured in the same run). Random weights
  cannot measure acceptance (their drafts are mostly rejected), so the projected tokens/s of a row is the real
  model's tokens per pass for that draft and K over this row's ms per pass.

Each row is printed as a JSON line when it completes, markdown tables at the end; ``--out FILE`` writes the section
between ``<!-- bench_speculative:start -->`` and ``<!-- bench_speculative:end -->`` in FILE (appended when absent).
Needs a CUDA GPU.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llama_offload.cli.options import fire_main
from llama_offload.model.args import ModelArgs
from llama_offload.checkpoint.load import random_state_dict
from llama_offload.generate.decode import BatchDecoder
from llama_offload.generate.generation import Llama
from llama_offload.offload.offloaded import offload
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.quant_load import quantize_model
from llama_offload.generate.speculative import ModelDraft, NgramDraft, SpeculativeDecoder

from common import (
    DECODE_PROMPT_LEN, SHAPES, cell, command_line, emit, failed, free_all, model_from_state_dict, pinned_bandwidth,
    replace_section, shape_args,
)

MARK_START = "<!-- bench_speculative:start -->"
MARK_END = "<!-- bench_speculative:end -->"
Row = dict[str, Any]

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is in two sentences.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a small coffee shop.",
    "Why is the sky blue?",
    "List four fruits that are high in vitamin C.",
    "How can I learn to play the guitar?",
)
PASSAGE = ("The city library will close for renovation from the first of March until the end of June. During this "
           "time, books can be returned to the drop box at the town hall, and the mobile library will visit each "
           "district once a week. The children's reading club will meet in the community centre on Saturday "
           "mornings. Members who have questions can call the library office or send an email to the front desk.")
REWRITE_PROMPTS = (
    f"Summarise this notice in two sentences:\n\n{PASSAGE}",
    f"Rewrite this notice in a friendlier tone, keeping every fact:\n\n{PASSAGE}",
    f"Repeat this notice exactly, but replace 'library' with 'museum':\n\n{PASSAGE}",
    "Fix the spelling in this sentence and repeat it: 'The quick brown fox jumpd over the lazzy dog and ran "
    "into the forrest, where it found a quiet place to sleep.'",
    f"Turn this notice into a bulleted list of facts:\n\n{PASSAGE}",
)
PROMPTS = CHAT_PROMPTS + REWRITE_PROMPTS
DRAFTS = ("ngram", "int8", "int4")
KS = (1, 2, 4, 8, 16)


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_prompt(decoder: BatchDecoder, prompt: list[int], max_gen_len: int, stop_ids: set[int]) -> tuple[list[int], int, float]:
    """Greedy-decode one prompt: its tokens, the decode passes after the prefill, and their seconds."""
    (seq,) = decoder.join([prompt], max_gen_len, stop_ids)  # the prefill: gives the first token, not timed
    sync()
    start, passes = time.perf_counter(), 0
    while decoder.active:
        decoder.step()
        passes += 1
    sync()
    return list(seq.tokens), passes, time.perf_counter() - start


def dialog_tokens(llama: Llama, prompts: Sequence[str]) -> list[list[int]]:
    return [llama.chat_format.encode_dialog_prompt([{"role": "user", "content": p}]) for p in prompts]


def run_real(llama: Llama, name: str, k: Optional[int], prompts: list[list[int]], max_gen_len: int,
             want: Optional[list[list[int]]]) -> tuple[Row, list[list[int]]]:
    """Decode every prompt with ``llama``'s decoder (after one untimed warm-up prompt); the row and the tokens."""
    stop_ids = llama.tokenizer.stop_ids
    with torch.inference_mode():
        decode_prompt(llama.decoder(temperature=0), prompts[0], 16, stop_ids)  # warm-up: kernels, graph captures
        tokens, passes, seconds, produced, scored = [], 0, 0.0, 0, 0
        for prompt in prompts:
            decoder = llama.decoder(temperature=0)
            got, n, s = decode_prompt(decoder, prompt, max_gen_len, stop_ids)
            tokens.append(got)
            passes, seconds = passes + n, seconds + s
            if isinstance(decoder, SpeculativeDecoder):
                produced, scored = produced + decoder.produced, scored + decoder.scored
            else:
                produced, scored = produced + n, scored + n
    decoded = sum(max(len(t) - 1, 0) for t in tokens)  # tokens after the prefill's
    row: Row = {"part": "real", "variant": name, "k": k, "prompts": len(prompts), "decoded": decoded,
                "passes": passes, "tokens_per_pass": produced / scored if scored else None,
                "ms_per_pass": 1e3 * seconds / passes if passes else None,
                "tokens_per_s": decoded / seconds if seconds else None}
    row["identical"] = None if want is None else tokens == want
    return row, tokens


def bench_real(ckpt_dir: str, tokenizer_path: str, drafts: Sequence[str], ks: Sequence[int], max_gen_len: int,
               max_seq_len: int, texts: Sequence[str] = PROMPTS) -> list[Row]:
    """Plain greedy decoding of each of ``texts`` as a one-message chat, then each draft at each K (rows)."""
    def build(**flags: Any) -> Llama:
        return Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, **flags)

    plain = build()
    prompts = dialog_tokens(plain, texts)
    longest = max(map(len, prompts))
    if longest + max_gen_len > max_seq_len:
        raise ValueError(f"the longest prompt is {longest} tokens: --max_seq_len {max_seq_len} cannot hold it and "
                         f"--max_gen_len {max_gen_len}; raise --max_seq_len to {longest + max_gen_len}.")
    plain_row, want = run_real(plain, "plain", None, prompts, max_gen_len, None)
    rows = [emit(plain_row)]
    del plain
    free_all()
    for draft in drafts:
        for k in ks:
            try:
                llama = build(draft=draft, num_draft_tokens=k)
                row, _ = run_real(llama, draft, k, prompts, max_gen_len, want)
                del llama
            except (ValueError, RuntimeError) as e:  # e.g. out of memory: a row that says why
                row = {"part": "real", "variant": draft, "k": k, "note": failed(e)}
            free_all()
            if row.get("tokens_per_s") and plain_row["tokens_per_s"]:
                row["speedup"] = row["tokens_per_s"] / plain_row["tokens_per_s"]
            rows.append(emit(row))
    return rows


# --- 7B-shaped, random weights ------------------------------------------------------------------------------


def random_7b(args: ModelArgs) -> dict[str, torch.Tensor]:
    """N(0, 0.02) fp16 weights drawn on the GPU (norms 1 + N(0, 0.02)), kept in host memory."""
    return random_state_dict(args, dtype=torch.float16, device="cuda")


def shape_decode(model: Any, decoder: BatchDecoder, prompt: list[int], steps: int,
                 margins: Optional[list[float]] = None) -> tuple[list[int], float, int]:
    """Tokens, seconds and passes of one timed greedy decode after a short warm-up. ``margins``: filled with the
    gap between the two largest logits of each token chosen (plain decoding: one per pass), which says how near a
    tie the choice was where a speculative run differs."""
    with torch.inference_mode():
        decode_prompt(decoder, prompt, 4, {-1})  # warm-up
        tokens, passes, seconds = decode_prompt(decoder, prompt, steps + 1, {-1})
        if margins is not None:  # an untimed second run that keeps each pass's logits
            step = model.step

            def keep(s: Any) -> torch.Tensor:
                logits = step(s)
                top = logits.reshape(-1, logits.shape[-1])[-1].float().topk(2).values
                margins.append(float(top[0] - top[1]))
                return logits

            model.step = keep
            try:
                if decode_prompt(decoder, prompt, steps + 1, {-1})[0] != tokens:
                    raise RuntimeError("plain greedy decoding gave other tokens on a second run of the same prompt")
            finally:
                del model.step  # the instance attribute; the class's step again
    return tokens, seconds, passes


def first_difference(got: list[int], want: list[int]) -> Optional[int]:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None if len(got) == len(want)
                else min(len(got), len(want)))


def bench_shape(shape: str, ks: Sequence[int], steps: int, bandwidth: float, real: list[Row]) -> list[Row]:
    args = shape_args(shape)
    max_seq = DECODE_PROMPT_LEN + steps + max(ks) + 8
    log(f"{shape}: drawing random fp16 weights")
    sd = random_7b(args)
    target = offload(model_from_state_dict(sd, args), max_batch_size=1, max_seq_len=max_seq)
    floor_ms = 1e3 * target.plan.streamed_bytes / bandwidth
    prompt = torch.randint(0, args.vocab_size, (DECODE_PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    kw = dict(max_batch_size=1, max_seq_len=max_seq, device=torch.device("cuda"), temperature=0)
    margins: list[float] = []
    want, seconds, passes = shape_decode(target, BatchDecoder(target, **kw), prompt, steps, margins)
    plain_ms = 1e3 * seconds / passes
    rows = [emit({"part": shape, "variant": "plain", "k": None, "ms_per_pass": plain_ms,
                              "floor_ms": floor_ms, "tokens_per_pass": 1.0, "tokens_per_s": 1e3 / plain_ms,
                              "identical": None})]
    measured = {(r["variant"], r["k"]): r.get("tokens_per_pass") for r in real}
    for name in ("ngram", "int4"):
        draft_model = None
        if name == "int4":
            log(f"{shape}: quantizing the int4 g64 self-draft on the GPU")
            draft_model = quantize_model(model_from_state_dict(sd, args), QuantSpec(4, 64), device="cuda")
            draft_model = offload(draft_model, max_batch_size=1, max_seq_len=max_seq + max(ks) + 1, resident=True)
        for k in ks:
            draft = NgramDraft() if draft_model is None else ModelDraft(draft_model)
            spec = SpeculativeDecoder(target, draft, num_draft_tokens=k, **kw)
            got, seconds, passes = shape_decode(target, spec, prompt, steps)
            row: Row = {"part": shape, "variant": name, "k": k, "ms_per_pass": 1e3 * seconds / passes,
                        "floor_ms": floor_ms, "random_tokens_per_pass": spec.tokens_per_pass, "identical": got == want}
            diff = first_difference(got, want)
            if diff is not None:
                row["note"] = (f"differs from token {diff}, where plain decoding's top two logits were "
                               f"{margins[diff]:.4f} apart" if diff < len(margins) else f"differs from token {diff}")
            real_tpp = measured.get((name, k))
            if real_tpp:
                row["tokens_per_pass"] = real_tpp
                row["tokens_per_s"] = 1e3 * real_tpp / row["ms_per_pass"]
                row["speedup"] = row["tokens_per_s"] * plain_ms / 1e3
            rows.append(emit(row))
        del draft_model
        free_all()
    del target, sd
    free_all()
    return rows


# --- report -------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _yes(x: Optional[bool]) -> str:
    return "" if x is None else ("yes" if x else "NO")


def table_real(rows: list[Row]) -> str:
    head = ["variant", "K", "tokens/pass", "ms/pass", "tokens/s", "speed-up", "tokens = plain", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], _f(r.get("k"), "d"), _f(r.get("tokens_per_pass"), ".2f"), _f(r.get("ms_per_pass"), ".2f"),
            _f(r.get("tokens_per_s"), ".1f"), _f(r.get("speedup"), ".2f"), _yes(r.get("identical")),
            cell(r.get("note"))]) + " |")
    return "\n".join(lines)


def table_shape(rows: list[Row]) -> str:
    head = ["variant", "K", "ms/pass", "floor ms", "ms/pass / floor", "random-weight tokens/pass",
            "tokens = plain", "real-model tokens/pass", "projected tokens/s", "projected speed-up", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], _f(r.get("k"), "d"), _f(r["ms_per_pass"], ".1f"), _f(r["floor_ms"], ".1f"),
            _f(r["ms_per_pass"] / r["floor_ms"], ".2f"), _f(r.get("random_tokens_per_pass"), ".2f"),
            _yes(r.get("identical")), _f(r.get("tokens_per_pass"), ".2f"), _f(r.get("tokens_per_s"), ".1f"),
            _f(r.get("speedup"), ".2f"), cell(r.get("note"))]) + " |")
    return "\n".join(lines)


def section(info: dict[str, Any], real: list[Row], shaped: list[Row]) -> str:
    lines = [
        MARK_START,
        "## Speculative decoding",
        "",
        f"Command: `{info['command']}`  ",
        f"Device: {info['device']}, torch {info['torch']}, {info['date']}  ",
        f"Pinned host-to-device bandwidth measured in the same run: {info['bandwidth_gbps']:.1f} GB/s",
    ]
    if real:
        lines += ["", f"{info['model']}: every block paged, one per slice, batch 1, greedy; {len(PROMPTS)} prompts "
                      f"({len(CHAT_PROMPTS)} chat, {len(REWRITE_PROMPTS)} rewriting/summarising), up to "
                      f"{info['max_gen_len']} new tokens each. ms/pass: decode passes after the prefill, drafting "
                      "included; tokens/s: tokens after the prefill's first over those passes' time; speed-up over "
                      "plain; tokens = plain: every prompt's tokens equal plain greedy decoding's.",
                  "", table_real(real)]
    if shaped:
        lines += ["", f"{info['shape']}-shaped, random N(0, 0.02) fp16 weights, every block paged, batch 1, "
                      f"{info['steps']} decode steps after a {DECODE_PROMPT_LEN}-token prompt. Floor: the "
                      "paged bytes of one pass over the pinned bandwidth. Random weights reject most drafts, so "
                      "tokens/pass there says nothing about a real model: the projection uses the real model's "
                      "tokens/pass of the same draft and K over this row's ms/pass.",
                  "", table_shape(shaped)]
        if any(r.get("identical") is False for r in shaped):
            lines += ["", "Rows marked NO differ where plain decoding's top two logits were as close as the note says. "
                          "A pass over K + 1 positions multiplies through other GEMM kernels than a pass over one, so "
                          "its fp16 logits (and the keys and values it caches) differ from plain decoding's in their "
                          "last bits, and a near-tie can fall the other way; the verification logic itself keeps only "
                          "the target's own argmax. Greedy identity on the GPU therefore holds up to fp16 rounding of "
                          "the wider pass."]
    lines.append(MARK_END)
    return "\n".join(lines)


def write_section(path: Path, new_section: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(old, new_section, MARK_START, MARK_END), encoding="utf-8")


def _ints(value: Any, flag: str) -> list[int]:
    items = list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    try:
        out = [int(v) for v in items]
    except ValueError:
        raise ValueError(f"--{flag} takes comma-separated whole numbers (e.g. 1,4,8), found {value!r}.") from None
    if not out or min(out) < 1:
        raise ValueError(f"--{flag} takes whole numbers of at least 1, found {value!r}.")
    return out


def _names(value: Any) -> list[str]:
    items = list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
    unknown = [d for d in items if d not in DRAFTS]
    if unknown:
        raise ValueError(f"--drafts takes some of {', '.join(DRAFTS)}, found {', '.join(map(str, unknown))}.")
    return [str(d) for d in items]


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, drafts: str = ",".join(DRAFTS),
         ks: str = ",".join(map(str, KS)), max_gen_len: int = 128, max_seq_len: int = 512, shape: str = "7b",
         steps: int = 32, real_from: Optional[str] = None, out: Optional[str] = None,
         json_out: Optional[str] = None) -> None:
    """Benchmark speculative decoding (see the module docstring); the section goes to ``--out``.
    ``--real_from FILE``: the real-model rows (and their info) of an earlier run's ``--json_out`` instead of running
    that part again (the two parts can then run as two commands)."""
    params = dict(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, drafts=drafts, ks=ks, max_gen_len=max_gen_len,
                  max_seq_len=max_seq_len, shape=shape, steps=steps, real_from=real_from, out=out, json_out=json_out)
    draft_names, k_values = _names(drafts), _ints(ks, "ks")
    if shape != "none" and shape not in SHAPES:
        raise ValueError(f"--shape takes one of {', '.join(SHAPES)} or none, found {shape!r}.")
    if ckpt_dir is not None and real_from is not None:
        raise ValueError("Give either --ckpt_dir (run the real-model part) or --real_from (reuse its rows), not both.")
    if ckpt_dir is None and real_from is None and shape == "none":
        raise ValueError("Nothing to run: give --ckpt_dir (a 16-bit checkpoint) and/or a --shape.")
    earlier: dict[str, Any] = {}
    if real_from is not None:
        try:
            earlier = json.loads(Path(real_from).read_text())
            earlier["real"], earlier["info"]["model"]  # noqa: B018  (both must be there)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--real_from {real_from}: expected the --json_out of an earlier run with --ckpt_dir, "
                             f"could not read its real-model rows ({e}).") from None
    if ckpt_dir is not None:
        if not (Path(ckpt_dir) / "params.json").is_file():
            raise ValueError(f"--ckpt_dir {ckpt_dir} has no params.json: give a Meta-layout checkpoint directory.")
        # A converted checkpoint holds tokenizer.json (GGUF / Hugging Face), a Meta one tokenizer.model.
        beside = [Path(ckpt_dir) / n for n in ("tokenizer.model", "tokenizer.json")]
        tokenizer_path = tokenizer_path or str(next((p for p in beside if p.is_file()), beside[0]))
    if not torch.cuda.is_available():
        raise RuntimeError("bench_speculative.py needs a CUDA GPU; none is visible.")
    start = time.perf_counter()
    bandwidth = pinned_bandwidth()
    info = {"command": command_line(params, "scripts/bench/bench_speculative.py"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "bandwidth_gbps": bandwidth / 1e9,
            "model": Path(ckpt_dir).name if ckpt_dir else None, "max_gen_len": max_gen_len, "shape": shape,
            "steps": steps}
    log(f"pinned host-to-device bandwidth: {bandwidth / 1e9:.1f} GB/s")
    if earlier:
        real = earlier["real"]
        info.update({k: earlier["info"][k] for k in ("model", "max_gen_len")})
        info["command"] = f"{earlier['info']['command']}; then {info['command']}"
    else:
        real = bench_real(ckpt_dir, str(tokenizer_path), draft_names, k_values, max_gen_len, max_seq_len) if ckpt_dir else []
    shaped = bench_shape(shape, k_values, steps, bandwidth, real) if shape != "none" else []
    info["total_s"] = time.perf_counter() - start
    text = section(info, real, shaped)
    print(text)
    if out:
        write_section(Path(out), text)
    if json_out:
        Path(json_out).write_text(json.dumps({"info": info, "real": real, "shape": shaped}, indent=1))


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)  # one-line errors, and help printed without a pager
