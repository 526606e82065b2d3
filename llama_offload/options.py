"""Flag handling shared by the ``llama-offload`` command and the example scripts.

fire hands over whatever the shell gave it, parsed as Python literals where that works: ``--prompts``
may arrive as a list or as a JSON string, ``--temperature 0`` as an int, ``--dtype`` as any word. Everything
is checked here, before a model is loaded, so a typo costs a second and not a checkpoint load.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, TypeVar

import fire
import torch

from . import parallel
from .chat_format import Dialog, validate_dialog
from .default_model import resolve_paths
from .generation import Llama

__all__ = [
    "DTYPES",
    "build_llama",
    "check_generation_flags",
    "fire_main",
    "parse_dialogs",
    "parse_dtype",
    "parse_prompts",
    "run_chat_completion",
    "run_text_completion",
    "start_model_parallel",
]

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

# What a user can fix from the message alone. Anything else (TypeError, AssertionError, ...) is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)

T = TypeVar("T")


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """``--dtype`` as a torch dtype; None keeps the checkpoint's own dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(
            f"Unknown --dtype {dtype!r}: expected float16, bfloat16 or float32 (or fp16, bf16, fp32). "
            "Leave it unset to keep the checkpoint's own dtype."
        )
    return DTYPES[key]


def _load_json(value: Any, flag: str, example: str) -> Any:
    if not isinstance(value, str):
        return value  # fire already parsed it as a Python literal
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ValueError(
            f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {shown!r}. Expected {example}; "
            "quote the whole value for the shell."
        ) from None


def parse_prompts(value: Any) -> list[str]:
    """``--prompts``: a JSON list of strings (or the list fire already parsed)."""
    example = """a JSON list of strings, e.g. --prompts '["Once upon a time", "The capital of France is"]'"""
    prompts = _load_json(value, "--prompts", example)
    if isinstance(prompts, tuple):
        prompts = list(prompts)
    if not isinstance(prompts, list):
        raise ValueError(f"--prompts must be {example}; found a {type(prompts).__name__}: {prompts!r}.")
    if not prompts:
        raise ValueError(f"--prompts is an empty list; give at least one prompt: {example}.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"--prompts item {i} is a {type(p).__name__} ({p!r}), expected a string. Quote it.")
    return prompts


def parse_dialogs(value: Any) -> list[Dialog]:
    """``--dialogs``: a JSON list of dialogs, each a list of {"role", "content"} messages."""
    example = """a JSON list of dialogs, e.g. --dialogs '[[{"role": "user", "content": "Hi!"}]]'"""
    dialogs = _load_json(value, "--dialogs", example)
    if isinstance(dialogs, tuple):
        dialogs = list(dialogs)
    if not isinstance(dialogs, list) or not dialogs:
        raise ValueError(f"--dialogs must be {example}; found {dialogs!r}.")
    if all(isinstance(d, dict) for d in dialogs):
        raise ValueError(
            "--dialogs holds messages, not dialogs: it looks like one dialog. Wrap it in another list. "
            f"Expected {example}."
        )
    for i, dialog in enumerate(dialogs):
        try:
            validate_dialog(dialog)
        except ValueError as e:
            raise ValueError(f"--dialogs item {i}: {e}") from None
    return dialogs


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"--{name} must be a positive integer, found {value!r}.")
    return value


def check_generation_flags(
    *,
    temperature: Any,
    top_p: Any,
    max_seq_len: Any,
    max_batch_size: Any,
    max_gen_len: Any,
    num_slices: Any,
    gpu_memory_gb: Any = None,
) -> tuple[float, float]:
    """Validate the flags every command shares; return (temperature, top_p) as floats."""
    _positive_int("max_seq_len", max_seq_len)
    _positive_int("max_batch_size", max_batch_size)
    if max_gen_len is not None:
        _positive_int("max_gen_len", max_gen_len)
    if num_slices is not None:
        _positive_int("num_slices", num_slices)
    if gpu_memory_gb is not None:
        if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) or gpu_memory_gb <= 0:
            raise ValueError(f"--gpu_memory_gb must be a positive number of GiB, found {gpu_memory_gb!r}.")
        if num_slices is not None:
            raise ValueError("Give either --gpu_memory_gb or --num_slices, not both: the budget decides how many "
                             "blocks stay resident and how the rest is paged.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"--temperature must be a number >= 0 (0 means greedy), found {temperature!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be a number in (0, 1], found {top_p!r}.")
    return float(temperature), float(top_p)


def start_model_parallel() -> tuple[int, int]:
    """Under torchrun with N > 1 processes: join them into one model-parallel group (one GPU each) and let
    only rank 0 print to stdout; return (rank, N). One process: nothing to do, (0, 1)."""
    if parallel.requested_world_size() == 1:
        return 0, 1
    rank, world_size = parallel.init_model_parallel()
    parallel.quiet_other_ranks()
    return rank, world_size


def build_llama(
    ckpt_dir: Optional[str],
    tokenizer_path: Optional[str],
    *,
    max_seq_len: int,
    max_batch_size: int,
    offload: bool = True,
    num_slices: Optional[int] = None,
    gpu_memory_gb: Optional[float] = None,
    device: Optional[str] = None,
    dtype: Optional[str | torch.dtype] = None,
    seed: int = 1,
    chat_format: Optional[str] = None,
) -> Llama:
    """``Llama.build`` from command-line flags; no ckpt_dir means the default model. Under torchrun with
    several processes, the model is split over them (see start_model_parallel)."""
    torch_dtype = parse_dtype(dtype)  # before resolve_paths, which may spend seconds making the default model
    start_model_parallel()
    ckpt, tokenizer = resolve_paths(ckpt_dir, tokenizer_path)
    return Llama.build(
        ckpt, tokenizer, max_seq_len, max_batch_size, offload=bool(offload), num_slices=num_slices,
        gpu_memory_gb=None if gpu_memory_gb is None else float(gpu_memory_gb),
        device=None if device is None else str(device), dtype=torch_dtype, seed=int(seed),
        chat_format=None if chat_format is None else str(chat_format),
    )


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


RULE = "\n==================================\n"


def run_text_completion(
    llama: Llama, prompts: Sequence[str], *, temperature: float, top_p: float, max_gen_len: Optional[int]
) -> None:
    """Complete ``prompts`` in batches of max_batch_size, printing each result, then each batch's stats."""
    for batch in _batches(prompts, llama.max_batch_size):
        results = llama.text_completion(list(batch), temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        for prompt, result in zip(batch, results):
            print(prompt)
            print(f"> {result['generation']}")
            print(RULE)
        print(llama.last_stats.summary(), flush=True)


def run_chat_completion(
    llama: Llama, dialogs: Sequence[Dialog], *, temperature: float, top_p: float, max_gen_len: Optional[int]
) -> None:
    """Answer ``dialogs`` in batches of max_batch_size, printing each dialog and answer, then each batch's stats."""
    for batch in _batches(dialogs, llama.max_batch_size):
        results = llama.chat_completion(list(batch), temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        for dialog, result in zip(batch, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            answer = result["generation"]
            print(f"> {answer['role'].capitalize()}: {answer['content']}")
            print(RULE)
        print(llama.last_stats.summary(), flush=True)


def fire_main(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str) -> None:
    """``fire.Fire`` with user errors shown as one line (exit 1) instead of a traceback.

    Set LLAMA_OFFLOAD_TRACEBACK=1 to see the traceback anyway. Under torchrun only rank 0 prints results.

    Under torchrun with several processes, a rank that fails must not leave the others waiting in a
    collective: it prints its own error to stderr (every rank that fails does, tagged with its rank) and
    ends with ``os._exit(1)``, and torchrun then stops the other ranks, so the run exits non-zero instead
    of hanging. A successful run leaves the process group cleanly.
    """
    if parallel.requested_world_size() > 1:
        _fire_main_model_parallel(component, name)
        return
    try:
        fire.Fire(component, name=name)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if os.environ.get("LLAMA_OFFLOAD_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{name}: error: {e}", file=sys.stderr)
            print(f"{name}: (set LLAMA_OFFLOAD_TRACEBACK=1 to see where it came from)", file=sys.stderr)
        sys.exit(1)


def _fire_main_model_parallel(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str) -> None:
    show = bool(os.environ.get("LLAMA_OFFLOAD_TRACEBACK"))
    try:
        fire.Fire(component, name=name)
    except SystemExit as e:  # fire's own exits (--help, bad flags): every rank makes the same one
        if e.code not in (None, 0):
            code = e.code if isinstance(e.code, int) else 1
            parallel.exit_after_error(f"{name}: exited with status {e.code}", code=code)
        parallel.shutdown()
        raise
    except KeyboardInterrupt:
        parallel.exit_after_error(f"{name}: interrupted", code=130)
    except USER_ERRORS as e:
        hint = "" if show else f"\n{name}: (set LLAMA_OFFLOAD_TRACEBACK=1 to see where it came from)"
        parallel.exit_after_error(f"{name}: error: {e}{hint}", show_traceback=show)
    except BaseException as e:  # a bug: keep its traceback, and still bring the whole group down
        parallel.exit_after_error(f"{name}: {type(e).__name__}: {e}", show_traceback=True)
    parallel.shutdown()
