"""Text and chat completion over a plain or offloaded model, following Meta's ``llama/generation.py``."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypedDict

import torch

from llama_offload.model import parallel
from llama_offload.text.chat_format import (
    SPECIAL_TAGS_ERROR, ChatFormat, Dialog, Message, get_chat_format,
)
from llama_offload.checkpoint.load import load_model
from llama_offload.generate.decode import BatchDecoder, Decoding, sample_top_p  # noqa: F401  (sample_top_p: part of the API)
from llama_offload.generate.drafts import build_draft, check_draft_tokenizer
from llama_offload.offload.offloaded import offload as offload_model
from llama_offload.offload.plan import DEFAULT_PREFILL_CHUNK
from llama_offload.generate.run_plan import RunPlan, plan_run
from llama_offload.checkpoint.record import read_checkpoint
from llama_offload.checkpoint.adapter import load_adapter
from llama_offload.generate.run_options import RunOptions
from llama_offload.generate.speculative import Draft, SpeculativeDecoder
from llama_offload.text.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # only with logprobs
    logprobs: list[float]  # only with logprobs


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # only with logprobs
    logprobs: list[float]  # only with logprobs


@dataclass
class GenerationStats:
    """Of the last generate call: what the CLI and scripts print after each answer."""

    new_tokens: int = 0
    seconds: float = 0.0
    peak_gpu_bytes: Optional[int] = None
    tokens_per_pass: Optional[float] = None  # with --draft: tokens per sequence and decode pass (kept drafts + 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        mem = "n/a (CPU)" if self.peak_gpu_bytes is None else f"{self.peak_gpu_bytes / 2**30:.2f} GiB"
        per_pass = "" if not self.tokens_per_pass else f", {self.tokens_per_pass:.2f} tokens per pass"
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s, {self.tokens_per_s:.1f} tokens/s{per_pass}, "
                f"peak GPU memory {mem}")


@dataclass
class Llama:
    model: torch.nn.Module  # Transformer or OffloadedTransformer: step(Step) -> logits
    tokenizer: Tokenizer
    chat_format: ChatFormat
    max_seq_len: int
    max_batch_size: int
    device: torch.device
    seed: int = 1
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    options: RunOptions = field(default_factory=RunOptions)
    last_stats: GenerationStats = field(default_factory=GenerationStats)
    draft: Optional[Draft] = None  # --draft: decode passes verify drafted tokens (speculative.py)
    _decoder: Optional[BatchDecoder] = field(default=None, repr=False)  # the last stream's, for its stats
    plan: Optional[RunPlan] = field(default=None, repr=False)  # what build carried out (run_plan.py)

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path,
        max_seq_len: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        *,
        options: Optional[RunOptions] = None,
        vocab_parallel_embedding: Optional[bool] = None,
        **flags: Any,
    ) -> "Llama":
        """Load a Meta checkpoint, run as ``options`` say (a RunOptions; its fields may also be given as keywords,
        e.g. ``gpu_memory_gb=8``). On a GPU its blocks are paged by OffloadModel (``offload=True``: all of them
        in ``num_slices`` slices, or as many kept resident as ``gpu_memory_gb`` allows) or all kept on the GPU
        (``offload=False``); without a GPU the packed blocks run on the CPU, in float32 unless ``dtype`` says
        otherwise. ``chat_format`` defaults to the one a converted checkpoint records in llama_offload.json,
        else the one the tokenizer implies (Llama 3 header tokens: llama3; <|im_start|>: chatml; else llama2).

        Under torchrun with N > 1 processes the model is split over them (model/parallel.py): each rank loads and
        pages 1/N of every block on GPU LOCAL_RANK, ``gpu_memory_gb`` is each rank's budget, and every rank
        samples with the same seed from the same gathered logits, so all of them produce the same tokens.
        ``vocab_parallel_embedding`` overrides how the embedding is split (see checkpoint/load.py).

        ``lora=ADAPTER_DIR`` merges a LoRA adapter into the 16-bit weights while they load, before ``quantize`` and
        offloading: the model computes with exactly the weights ``llama-offload merge`` would write (one process,
        an unquantized checkpoint; see convert/merge.py). A ``draft`` of int4/int8 is made from the merged
        weights too."""
        sizes = {k: v for k, v in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)) if v is not None}
        opts = RunOptions.from_flags({**sizes, **flags, "ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path)},
                                     base=options)
        start = time.perf_counter()
        if parallel.requested_world_size() > 1:
            parallel.init_model_parallel()
            torch.manual_seed(opts.seed)  # as Meta's reference does: every rank draws the same numbers
        # The one plan of this run (run_plan.py), made before a shard is read: every refusal comes from it, and
        # what follows carries it out. The checkpoint directory is read once, into the record everything takes.
        plan = plan_run(read_checkpoint(ckpt_dir), tokenizer_path, opts,
                        model_parallel_size=parallel.model_parallel_world_size())
        opts, target, tokenizer = plan.options, plan.device, plan.tokenizer
        if opts.draft not in (None, "ngram") and parallel.model_parallel_world_size() > 1:
            raise ValueError(f"--draft {opts.draft} is not supported with several processes yet; use --draft ngram, "
                             "or run the model in one process.")
        if opts.draft not in (None, "ngram", "int4", "int8"):
            check_draft_tokenizer(Path(opts.draft).expanduser(), tokenizer)  # before any weight is read
        # Its tensors are read (and checked against its config) before the shards.
        adapter = load_adapter(opts.lora, "cpu") if opts.lora is not None else None
        model = load_model(plan.checkpoint, max_seq_len=opts.max_seq_len, max_batch_size=opts.max_batch_size,
                           dtype=plan.load_dtype, vocab_size=tokenizer.n_words, show_progress=parallel.is_rank0(),
                           vocab_parallel_embedding=vocab_parallel_embedding, quantize=opts.quant_spec,
                           quantize_device=target if target.type == "cuda" else None, lora=adapter)
        if target.type == "cuda" and target.index is None and model.model_parallel_size > 1:
            target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU: LOCAL_RANK
        draft, _ = build_draft(opts, plan.checkpoint, tokenizer, target, lora=adapter)
        model = offload_model(model, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len, device=target,
                              cuda_graphs=opts.cuda_graphs, plan=plan.offload, cpu_threads=plan.cpu_threads)
        if parallel.is_rank0():
            print(f"llama_offload: loaded in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        return Llama(model, tokenizer, get_chat_format(plan.chat_format, tokenizer), opts.max_seq_len,
                     opts.max_batch_size, target, opts.seed, opts.chunk(), opts, draft=draft, plan=plan)

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int) -> None:
        if not prompt_tokens:
            raise ValueError("No prompts given: pass at least one prompt.")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts were given, but max_batch_size is {self.max_batch_size}. "
                             "Pass fewer prompts at once, or build with a larger max_batch_size.")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be at least 1, found {max_gen_len}.")

    def decoder(self, temperature: float = 0.6, top_p: float = 0.9, *, seed: Optional[int] = None,
                logprobs: bool = False, echo_logprobs: bool = False) -> BatchDecoder:
        """A BatchDecoder over this model's KV cache rows: sequences join it and decode at their own positions
        (with ``--draft``, a SpeculativeDecoder: each pass verifies drafted tokens)."""
        kw = dict(max_batch_size=self.max_batch_size, max_seq_len=self.max_seq_len, device=self.device,
                  temperature=temperature, top_p=top_p, seed=self.seed if seed is None else seed,
                  prefill_chunk=self.prefill_chunk, logprobs=logprobs, echo_logprobs=echo_logprobs)
        if self.draft is not None:
            return SpeculativeDecoder(self.model, self.draft, num_draft_tokens=self.options.draft_tokens, **kw)
        return BatchDecoder(self.model, **kw)

    @torch.inference_mode()
    def stream(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        stop_ids: Optional[set[int]] = None,
        seed: Optional[int] = None,
        logprobs: bool = False,
        echo_logprobs: bool = False,
    ) -> Iterator[list[Decoding]]:
        """Decode the prompts together, each at its own position; after each pass (the prefill, then every
        decode step) yield the sequences, one per prompt, with the tokens they have so far."""
        self._check_prompts(prompt_tokens, max_gen_len)
        decoder = self._decoder = self.decoder(temperature, top_p, seed=seed, logprobs=logprobs,
                                               echo_logprobs=echo_logprobs)
        seqs = decoder.join(prompt_tokens, max_gen_len, stop_ids or self.tokenizer.stop_ids)
        yield seqs
        while decoder.active:
            decoder.step()
            yield seqs

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        stop_ids: Optional[set[int]] = None,
        seed: Optional[int] = None,
        on_done: Optional[Callable[[int, list[int], Optional[list[float]]], None]] = None,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Generated token ids per prompt (cut at the first stop token), and their log-probabilities.
        With ``echo`` the prompt comes first, and its log-probabilities start with 0 for the first token.
        ``on_done(i, tokens, logprobs)`` is called for prompt i as soon as it is finished, while the others go on:
        a batch lasts as long as its longest answer, and the finished ones need not wait for it."""
        start = self._start_stats()
        seqs: list[Decoding] = []
        finished: set[int] = set()
        out = lambda s: ((s.prompt if echo else []) + s.tokens,  # noqa: E731
                         ([0.0] + s.prompt_logprobs if echo else []) + s.logprobs if logprobs else None)
        for seqs in self.stream(prompt_tokens, max_gen_len, temperature, top_p, stop_ids=stop_ids, seed=seed,
                                logprobs=logprobs, echo_logprobs=logprobs and echo):
            for i, s in enumerate(seqs):
                if on_done is not None and s.done and i not in finished:
                    finished.add(i)
                    on_done(i, *out(s))
        self._end_stats(start, sum(len(s.tokens) for s in seqs))
        results = [out(s) for s in seqs]
        return [t for t, _ in results], ([lp for _, lp in results] if logprobs else None)

    def _start_stats(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _end_stats(self, start: float, new_tokens: int) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        per_pass = getattr(self._decoder, "tokens_per_pass", None)
        self.last_stats = GenerationStats(new_tokens, time.perf_counter() - start, peak, per_pass)

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        *,
        on_result: Optional[Callable[[int, CompletionPrediction], None]] = None,
    ) -> list[CompletionPrediction]:
        """Meta's text completion; ``on_result(i, prediction)``: prompt i's result as soon as it is finished."""
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        make = lambda i, t, lp: self._prediction(t, lp, {"generation": self.tokenizer.decode(t)})  # noqa: E731
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, echo, seed=seed, on_done=_reporting(make, on_result))
        return [make(i, t, lps[i] if lps else None) for i, t in enumerate(tokens)]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        seed: Optional[int] = None,
        *,
        on_result: Optional[Callable[[int, ChatPrediction], None]] = None,
    ) -> list[ChatPrediction]:
        """Meta's chat completion; ``on_result(i, prediction)``: dialog i's answer as soon as it is finished."""
        # Meta answers a dialog that smuggles in special tags with an error result instead of failing the batch.
        unsafe = [self.chat_format.contains_special_tags(d) for d in dialogs]
        prompt_tokens = [self.chat_format.encode_dialog_prompt(d) for d in dialogs]

        def make(i: int, t: list[int], lp: Optional[list[float]]) -> ChatPrediction:
            content = SPECIAL_TAGS_ERROR if unsafe[i] else self.tokenizer.decode(t)
            return self._prediction(t, lp, {"generation": {"role": "assistant", "content": content}})

        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, stop_ids=self.chat_format.stop_ids, seed=seed,
                                    on_done=_reporting(make, on_result))
        return [make(i, t, lps[i] if lps else None) for i, t in enumerate(tokens)]

    def _prediction(self, toks: list[int], lps: Optional[list[float]], result: dict) -> dict:
        if lps is not None:
            result["tokens"] = [self.tokenizer.decode([x]) for x in toks]
            result["logprobs"] = lps
        return result

    def stream_text(
        self,
        prompt_tokens: list[int],
        max_gen_len: Optional[int] = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        stop_ids: Optional[set[int]] = None,
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece, as its tokens are produced."""
        stop_ids = stop_ids or self.tokenizer.stop_ids
        start, produced, shown = self._start_stats(), [], ""
        try:
            for (seq,) in self.stream([prompt_tokens], self._default_gen_len(max_gen_len), temperature, top_p,
                                      stop_ids=stop_ids, seed=seed):
                if len(seq.tokens) == len(produced):
                    break  # a stop token: nothing new
                produced = list(seq.tokens)
                # Decode the whole answer so far: SentencePiece spacing and multi-byte characters
                # only come out right in context.
                text = self.tokenizer.decode(produced)
                if text.startswith(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown) :]
                    shown = text
        finally:
            self._end_stats(start, len(produced))

    def stream_chat(self, dialog: Dialog, **kwargs) -> Iterator[str]:
        if self.chat_format.contains_special_tags(dialog):
            yield SPECIAL_TAGS_ERROR
            return
        yield from self.stream_text(self.chat_format.encode_dialog_prompt(dialog),
                                    stop_ids=self.chat_format.stop_ids, **kwargs)


def _reporting(make: Callable[[int, list[int], Optional[list[float]]], Any],
               on_result: Optional[Callable[[int, Any], None]]) -> Optional[Callable[..., None]]:
    """generate's ``on_done`` that hands ``on_result`` the finished prediction (None: nothing to report)."""
    if on_result is None:
        return None
    return lambda i, tokens, lps: on_result(i, make(i, tokens, lps))
