"""One typed home for the flags that say how a model is loaded and run.

``RunOptions`` is what ``llama-offload complete|chat|info``, the example scripts and ``Llama.build`` share: a
new flag is one field here, with its help line in ``metadata["help"]`` (``flag(default, help)``). The command-line
layer builds the flags and their help from these fields (``flag_parameters``, ``with_flag_help``, which
``FinetuneOptions`` uses too), and ``Llama.build`` takes the object (or the same names as keywords).
Sampling flags (temperature, top_p, max_gen_len) belong to each call, not to the loaded model; their rules are
here too (``check_sampling_flags``), so every rule about a run flag's value is decided in this module.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llama_offload.text.chat_format import CHAT_FORMATS
from llama_offload.offload.plan import DEFAULT_PREFILL_CHUNK
from llama_offload.model.dtypes import parse_dtype
from llama_offload.model.quant import QuantSpec
from llama_offload.checkpoint.adapter import read_config
from llama_offload.generate.speculative import DEFAULT_DRAFT_TOKENS


def flag(default: Any, help: str) -> Any:
    """A dataclass field that is a command-line flag: its default, and its help line (one sentence or a few, as
    ``-- --help`` shows it)."""
    return field(default=default, metadata={"help": help})


def flag_parameters(cls: type, names: Iterable[str], *, kind: Any = inspect.Parameter.KEYWORD_ONLY,
                    defaults: Optional[Mapping[str, Any]] = None) -> list[inspect.Parameter]:
    """One ``inspect.Parameter`` per field of the dataclass ``cls`` in ``names``: its default (or ``defaults``'),
    its type resolved (not the string ``from __future__ import annotations`` leaves in the field)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    return [inspect.Parameter(name, kind, default=defaults.get(name, fields[name].default),
                              annotation=hints.get(name, fields[name].type)) for name in names]


_ARGS_ENTRY = re.compile(r"^(\s+)(\*{0,2}\w+)\s*(?:\([^)]*\))?:")


def with_flag_help(doc: str, cls: type, names: Iterable[str]) -> str:
    """``doc`` (Google style, as fire reads it) with an Args entry for each field of ``cls`` in ``names`` that it
    does not describe already (a command's own wording wins), its help from the field's ``metadata["help"]``."""
    lines = inspect.cleandoc(doc).splitlines() if doc.strip() else []
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        lines += ["", "Args:"] if lines else ["Args:"]
        start = len(lines) - 1
    end = start + 1  # the section ends at the first line as little indented as "Args:" itself
    indent = len(lines[start]) - len(lines[start].lstrip())
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    described = {m.group(2).lstrip("*") for line in lines[start + 1 : end] if (m := _ARGS_ENTRY.match(line))}
    # One line each: fire's docstring reader ignores indentation, so a continuation line with a colon in it would
    # be read as the start of another entry, and the rest of that line dropped from the help.
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
    pad = " " * (indent + 4)
    added = [f"{pad}{name}: {' '.join(help_text[name].split())}" for name in names if name not in described]
    return "\n".join(lines[:end] + added + lines[end:])


@dataclass(frozen=True)
class RunOptions:
    ckpt_dir: Optional[str] = flag(None, "Meta checkpoint directory (params.json, consolidated.NN.pth); unset: "
                                          "the default model.")
    tokenizer_path: Optional[str] = flag(None, "tokenizer.model or tokenizer.json; unset: looked for in ckpt_dir, "
                                                "then in its parent.")
    max_seq_len: int = flag(512, "prompt + completion length the KV cache is sized for.")
    max_batch_size: int = flag(4, "sequences run together (the KV cache holds this many).")
    offload: bool = flag(True, "page blocks through the GPU (False: the whole model on the GPU).")
    num_slices: Optional[int] = flag(None, "groups the blocks are paged in (default: one block per slice, the "
                                            "least GPU memory).")
    gpu_memory_gb: Optional[float] = flag(None, "GPU memory budget in GiB: as many blocks as fit stay resident, "
                                                 "the rest are paged (instead of num_slices).")
    device: Optional[str] = flag(None, "cuda, cuda:N or cpu (default: cuda if available).")
    dtype: Optional[str] = flag(None, "float16, bfloat16 or float32 (default: the checkpoint's on a GPU, "
                                       "float32 on the CPU).")
    seed: int = flag(1, "sampling seed.")
    chat_format: Optional[str] = flag(None, "llama2, chatml or llama3 (default: what the checkpoint records, else "
                                             "what the tokenizer implies).")
    cuda_graphs: bool = flag(True, "replay decode steps as CUDA graphs (False: launch every kernel, for "
                                    "debugging).")
    prefill_chunk: Optional[int] = flag(None, "prompt positions per prefill pass; longer prompts are prefilled "
                                               "in chunks, bounding activation memory (default: min(max_seq_len, "
                                               "2048)).")
    quantize: Optional[str] = flag(None, "int8 or int4: quantize the blocks' matrices while loading (fewer bytes "
                                          "paged per token; a checkpoint written by llama-offload quantize needs "
                                          "no flag). Default: the checkpoint as stored.")
    group_size: Optional[int] = flag(None, "weights per int4 group (32, 64 or 128; default 64); int8 is scaled per "
                                            "output channel.")
    quantize_embeddings: bool = flag(False, "with --quantize, the embedding and output head in int8 too (default: "
                                             "they keep 16 bits).")
    lora: Optional[str] = flag(None, "a LoRA adapter directory (adapter_config.json, adapter.safetensors, as "
                                      "llama-offload finetune writes it), merged into the 16-bit weights while "
                                      "loading, before --quantize and offloading. Needs an unquantized checkpoint "
                                      "in one process (else: llama-offload merge, then run the merged checkpoint). "
                                      "Default: none.")
    draft: Optional[str] = flag(None, "speculative decoding: ngram (drafts copied from earlier text), int4 or int8 "
                                       "(the model's own quantized copy, kept on the GPU), or a draft checkpoint "
                                       "directory with the same tokenizer (kept on the GPU); auto: the draft that "
                                       "measured fastest for this kind of run (none on the CPU, where drafts are "
                                       "slower than plain decoding). Output is the model's own; several tokens per "
                                       "pass when drafts are kept. Default: none.")
    num_draft_tokens: Optional[int] = flag(None, "with --draft, tokens drafted per sequence and pass (default 8).")
    cpu_blocks: Optional[int] = flag(None, "of the blocks not resident on the GPU, how many the host's cores compute "
                                            "while the others stream over PCIe (0: stream them all). Default: the "
                                            "split a short calibration of this machine finds fastest.")
    cpu_threads: Optional[int] = flag(None, "threads computing the CPU blocks (default: every core but one).")
    allow_long_context: bool = flag(False, "accept a max_seq_len above the context length the model was trained "
                                            "for (its llama_offload.json, or known from its architecture): the "
                                            "model was not trained for it, and its output degrades past that "
                                            "length. Default: refused.")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_flags(cls, flags: dict[str, Any], base: Optional["RunOptions"] = None) -> "RunOptions":
        """Options from keyword flags (unknown names refused), checked and normalised."""
        unknown = sorted(set(flags) - set(cls.names()))
        if unknown:
            raise ValueError(f"Unknown run option(s) {', '.join(unknown)}: expected some of {', '.join(cls.names())}.")
        return dataclasses.replace(base or cls(), **flags).checked()

    def replace(self, **flags: Any) -> "RunOptions":
        return RunOptions.from_flags(flags, base=self)

    def checked(self) -> "RunOptions":
        """Refuse values no run can use, before anything is loaded; normalise fire's loose types."""
        positive_int("max_seq_len", self.max_seq_len)
        positive_int("max_batch_size", self.max_batch_size)
        if self.num_slices is not None:
            positive_int("num_slices", self.num_slices)
        if self.prefill_chunk is not None:
            positive_int("prefill_chunk", self.prefill_chunk)
        if self.gpu_memory_gb is not None:
            g = self.gpu_memory_gb
            if isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 0:
                raise ValueError(f"--gpu_memory_gb must be a positive number of GiB, found {g!r}.")
            if self.num_slices is not None:
                raise ValueError("Give either --gpu_memory_gb or --num_slices, not both: the budget decides how "
                                 "many blocks stay resident and how the rest is paged.")
        switches = {name: _bool_flag(name, getattr(self, name))
                    for name in ("offload", "cuda_graphs", "allow_long_context", "quantize_embeddings")}
        spec = self._quant_spec(switches["quantize_embeddings"])
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"--seed must be an integer, found {self.seed!r}.")
        if self.num_draft_tokens is not None:
            positive_int("num_draft_tokens", self.num_draft_tokens)
            if self.draft is None:
                raise ValueError("--num_draft_tokens applies to --draft, which was not given. Add --draft ngram (or "
                                 "int4, int8, a draft checkpoint directory), or drop --num_draft_tokens.")
        if self.draft is not None:
            check_draft_name(str(self.draft))
        if self.lora is not None:
            check_lora_dir(self.lora)
        if self.cpu_blocks is not None and (isinstance(self.cpu_blocks, bool) or not isinstance(self.cpu_blocks, int)
                                            or self.cpu_blocks < 0):
            raise ValueError(f"--cpu_blocks must be a whole number of blocks, 0 or more, found {self.cpu_blocks!r} "
                             "(leave it unset for the calibrated split).")
        if self.cpu_threads is not None:
            positive_int("cpu_threads", self.cpu_threads)
            if self.cpu_blocks == 0:
                raise ValueError("--cpu_threads sets the CPU lane's threads, but --cpu_blocks 0 turns the lane off. "
                                 "Drop one of them.")
        torch_dtype = parse_dtype(self.dtype, flag="--dtype")
        text = {n: getattr(self, n) for n in ("ckpt_dir", "tokenizer_path", "device", "chat_format", "draft", "lora")}
        if self.device is not None:
            check_device_name(str(self.device))
        if self.chat_format is not None and str(self.chat_format) not in CHAT_FORMATS:
            raise ValueError(f"Unknown --chat_format {self.chat_format!r}: expected one of "
                             f"{', '.join(sorted(CHAT_FORMATS))} (or leave it unset for the checkpoint's own).")
        return dataclasses.replace(
            self, gpu_memory_gb=None if self.gpu_memory_gb is None else float(self.gpu_memory_gb),
            dtype=None if torch_dtype is None else str(torch_dtype).removeprefix("torch."), **switches,
            quantize=None if spec is None else f"int{spec.bits}", group_size=None if spec is None else spec.group_size,
            **{n: None if v is None else str(v) for n, v in text.items()},
        )

    def _quant_spec(self, embeddings: bool) -> Optional[QuantSpec]:
        if self.quantize is None:
            if self.group_size is not None or embeddings:
                flag = "--group_size" if self.group_size is not None else "--quantize_embeddings"
                raise ValueError(f"{flag} applies to --quantize int8|int4, which was not given. Add --quantize int4 "
                                 f"(or int8), or drop {flag}.")
            return None
        return QuantSpec.parse(self.quantize, self.group_size, embeddings)

    @property
    def quant_spec(self) -> Optional[QuantSpec]:
        """``--quantize`` as a QuantSpec; None: the checkpoint as stored."""
        return self._quant_spec(self.quantize_embeddings)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.dtype, flag="--dtype")

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per sequence and pass under --draft."""
        return self.num_draft_tokens or DEFAULT_DRAFT_TOKENS

    def chunk(self) -> int:
        """Prompt positions per prefill pass."""
        return min(self.max_seq_len, self.prefill_chunk or DEFAULT_PREFILL_CHUNK)


SELF_DRAFTS = ("ngram", "int4", "int8")
AUTO_DRAFT = "auto"  # resolved per run by drafts.choose_draft, before anything is loaded


def check_draft_name(draft: str) -> str:
    """``--draft``: auto, ngram, int4, int8, or a directory that exists (what it holds is checked when it is loaded)."""
    from pathlib import Path

    if draft in SELF_DRAFTS or draft == AUTO_DRAFT or Path(draft).expanduser().is_dir():
        return draft
    raise ValueError(f"--draft {draft!r} is neither {AUTO_DRAFT}, {', '.join(SELF_DRAFTS)} nor an existing directory: "
                     "expected auto (the draft that measured fastest for the run), ngram (prompt lookup), int4 or int8 "
                     "(the model's own quantized copy), or the directory of a draft checkpoint that shares the model's "
                     "tokenizer.")


def check_lora_dir(lora: Any) -> str:
    """``--lora``: a directory holding an adapter whose config reads and checks (its shape is checked against the
    checkpoint's in the run plan, its tensors when it is loaded)."""
    from pathlib import Path

    if isinstance(lora, bool) or not isinstance(lora, (str, int, float, Path)) or not str(lora).strip():
        raise ValueError(f"--lora takes a LoRA adapter directory (as llama-offload finetune writes it), found "
                         f"{lora!r}. For example --lora checkpoints/my-adapter.")
    read_config(str(lora))  # missing directory, missing files, a damaged or foreign config: one line each
    return str(lora)


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_name(device: str) -> str:
    """``--device`` as written: cpu, cuda or cuda:N (whether that GPU exists is checked when a model is built)."""
    if not _DEVICE.match(device):
        raise ValueError(f"--device {device!r} is not a device this runs on: expected cpu, cuda or cuda:N "
                         "(N the GPU's index), or leave it unset for cuda if available, else cpu.")
    return device


def positive_int(name: str, value: Any) -> int:
    """``--name``: an int above 0 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"--{name} must be a positive integer, found {value!r}.")
    return value


def check_sampling_flags(*, temperature: Any, top_p: Any, max_gen_len: Any) -> tuple[float, float]:
    """The sampling flags, which belong to each call rather than to RunOptions: refused in one line, else
    (temperature, top_p) as floats."""
    if max_gen_len is not None:
        positive_int("max_gen_len", max_gen_len)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"--temperature must be a number >= 0 (0 means greedy), found {temperature!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be a number in (0, 1], found {top_p!r}.")
    return float(temperature), float(top_p)


_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _bool_flag(name: str, value: Any) -> bool:
    """True or False; also the words fire leaves as text (``--cuda_graphs false``) and 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)) and str(value).strip().lower() in _WORDS:
        return _WORDS[str(value).strip().lower()]
    raise ValueError(f"--{name} must be True or False (or --no{name}), found {value!r}.")
