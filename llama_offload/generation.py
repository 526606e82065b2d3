"""Text and chat completion over a plain or offloaded model, following Meta's ``llama/generation.py``."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, TypedDict

import torch
import torch.nn.functional as F

from . import parallel
from .chat_format import SPECIAL_TAGS_ERROR, ChatFormat, Dialog, Message, default_chat_format_name, get_chat_format
from .checkpoint import load_model
from .convert import read_checkpoint_meta
from .offload import offload as offload_model
from .tokenizer import Tokenizer, check_vocab_size, load_tokenizer


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

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        mem = "n/a (CPU)" if self.peak_gpu_bytes is None else f"{self.peak_gpu_bytes / 2**30:.2f} GiB"
        return f"{self.new_tokens} tokens in {self.seconds:.2f} s, {self.tokens_per_s:.1f} tokens/s, peak GPU memory {mem}"


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probabilities add up to more than ``p``."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (bs, vocab)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens after the nucleus is already complete
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bs, 1)
    return torch.gather(probs_idx, -1, next_token)  # (bs, 1)


@dataclass
class Llama:
    model: torch.nn.Module  # Transformer or OffloadedTransformer: forward(tokens, start_pos) -> logits
    tokenizer: Tokenizer
    chat_format: ChatFormat
    max_seq_len: int
    max_batch_size: int
    device: torch.device
    seed: int = 1
    last_stats: GenerationStats = field(default_factory=GenerationStats)

    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path,
        max_seq_len: int,
        max_batch_size: int,
        *,
        offload: bool = True,
        num_slices: Optional[int] = None,
        gpu_memory_gb: Optional[float] = None,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        chat_format: Optional[str] = None,
        seed: int = 1,
        vocab_parallel_embedding: Optional[bool] = None,
    ) -> "Llama":
        """Load a Meta checkpoint. On a GPU its blocks are paged by OffloadModel (``offload=True``: all of
        them in ``num_slices`` slices, or as many kept resident as ``gpu_memory_gb`` allows) or all moved to
        the GPU (``offload=False``); without a GPU the packed blocks run on the CPU. ``chat_format`` defaults
        to the one a converted checkpoint records in llama_offload.json, else the one the tokenizer implies
        (Llama 3 header tokens: llama3; <|im_start|>: chatml; otherwise llama2).

        Under torchrun with N > 1 processes the model is split over them (parallel.py): each rank loads and
        pages 1/N of every block on GPU LOCAL_RANK, ``gpu_memory_gb`` is each rank's budget, and every rank
        samples with the same seed from the same gathered logits, so all of them produce the same tokens.
        ``vocab_parallel_embedding`` overrides how the embedding is split (see checkpoint.py)."""
        start = time.perf_counter()
        if parallel.requested_world_size() > 1:
            parallel.init_model_parallel()
            torch.manual_seed(seed)  # as Meta's reference does: every rank draws the same numbers
        tokenizer = load_tokenizer(tokenizer_path)
        model = load_model(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size, dtype=dtype,
                           vocab_size=tokenizer.n_words, show_progress=parallel.is_rank0(),
                           vocab_parallel_embedding=vocab_parallel_embedding)
        check_vocab_size(tokenizer, model.vocab_size, source=str(Path(ckpt_dir) / "params.json"))
        target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if target.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but PyTorch sees no CUDA GPU. "
                               "Leave device unset to run on the CPU, or install a CUDA build of torch.")
        if target.type == "cuda" and target.index is None and model.model_parallel_size > 1:
            target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU: LOCAL_RANK
        if target.type == "cuda" and not offload:
            dtype_ = model.tok_embeddings.weight.dtype
            model = model.to(target)
            model.setup_caches(max_batch_size, max_seq_len, target, dtype_)
        else:
            model = offload_model(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                  num_slices=num_slices, gpu_memory_gb=gpu_memory_gb, device=target)
        if parallel.is_rank0():
            print(f"llama_offload: loaded in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        chat_format = (chat_format or read_checkpoint_meta(ckpt_dir).get("chat_format")
                       or default_chat_format_name(tokenizer))
        return Llama(model, tokenizer, get_chat_format(chat_format, tokenizer), max_seq_len, max_batch_size,
                     target, seed)

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int) -> None:
        if not prompt_tokens:
            raise ValueError("No prompts given: pass at least one prompt.")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts were given, but max_batch_size is {self.max_batch_size}. "
                             "Pass fewer prompts at once, or build with a larger max_batch_size.")
        for i, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ValueError(f"Prompt {i} is empty: it has no tokens. Give it some text.")
            if len(t) >= self.max_seq_len:
                raise ValueError(f"Prompt {i} is {len(t)} tokens long, but max_seq_len is {self.max_seq_len} and at "
                                 "least one position must be left to generate into. Shorten the prompt or build "
                                 "with a larger max_seq_len.")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be at least 1, found {max_gen_len}.")

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
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Meta's generation loop, one step at a time: yields (position, logits, tokens) after each step.

        Prompts of unequal length run together: decoding starts at the shortest prompt's end, and where a
        longer prompt still has tokens, its own token is kept instead of the sampled one.
        """
        self._check_prompts(prompt_tokens, max_gen_len)
        bsz = len(prompt_tokens)
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(self.max_seq_len, max_gen_len + max_prompt_len)
        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)  # (bs, total_len)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        input_text_mask = tokens != pad_id
        stop = torch.tensor(sorted(stop_ids or self.tokenizer.stop_ids), device=self.device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed if seed is None else seed)

        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos)  # (bs, cur_pos - prev_pos, vocab)
            if temperature > 0:
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p, generator).reshape(-1)  # (bs,)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)  # (bs,)
            # A prompt that is longer than cur_pos keeps its own token.
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            yield prev_pos, logits, tokens[:, : cur_pos + 1]
            eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, stop)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

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
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Generated token ids per prompt (cut at the first stop token), and their log-probabilities."""
        stop_ids = stop_ids or self.tokenizer.stop_ids
        start = self._start_stats()
        token_logprobs: list[torch.Tensor] = []  # per step: (bs, positions scored in that step)
        tokens = None
        for prev_pos, logits, tokens in self.stream(prompt_tokens, max_gen_len, temperature, top_p,
                                                    stop_ids=stop_ids, seed=seed):
            if logprobs:
                # Log-probability of each token given what precedes it; pad targets score 0.
                target = tokens[:, prev_pos + 1 :]  # (bs, positions)
                lp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
                token_logprobs.append(torch.where(target == self.tokenizer.pad_id, 0.0, lp))
        assert tokens is not None
        lp_all = torch.cat(token_logprobs, 1).tolist() if logprobs else None  # position j scores token j + 1
        out_tokens, out_logprobs = [], []
        new_tokens = 0
        for i, toks in enumerate(tokens.tolist()):
            start_at = 0 if echo else len(prompt_tokens[i])
            toks = toks[start_at : len(prompt_tokens[i]) + max_gen_len]
            for j, t in enumerate(toks):
                if j + start_at >= len(prompt_tokens[i]) and t in stop_ids:
                    toks = toks[:j]
                    break
            new_tokens += len(toks) - (len(prompt_tokens[i]) if echo else 0)
            out_tokens.append(toks)
            if lp_all is not None:
                # The first token has no prediction; Meta reports 0 for it when echoing.
                row = [0.0] + lp_all[i]
                out_logprobs.append(row[start_at : start_at + len(toks)])
        self._end_stats(start, new_tokens)
        return out_tokens, (out_logprobs if logprobs else None)

    def _start_stats(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def _end_stats(self, start: float, new_tokens: int) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self.last_stats = GenerationStats(new_tokens, time.perf_counter() - start, peak)

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
    ) -> list[CompletionPrediction]:
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, echo, seed=seed)
        return [self._prediction(t, lps[i] if lps else None, {"generation": self.tokenizer.decode(t)})
                for i, t in enumerate(tokens)]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        seed: Optional[int] = None,
    ) -> list[ChatPrediction]:
        # Meta answers a dialog that smuggles in special tags with an error result instead of failing the batch.
        unsafe = [self.chat_format.contains_special_tags(d) for d in dialogs]
        prompt_tokens = [self.chat_format.encode_dialog_prompt(d) for d in dialogs]
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, stop_ids=self.chat_format.stop_ids, seed=seed)
        results: list[ChatPrediction] = []
        for i, t in enumerate(tokens):
            content = SPECIAL_TAGS_ERROR if unsafe[i] else self.tokenizer.decode(t)
            results.append(self._prediction(t, lps[i] if lps else None,
                                            {"generation": {"role": "assistant", "content": content}}))
        return results

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
            for _, _, tokens in self.stream([prompt_tokens], self._default_gen_len(max_gen_len), temperature, top_p,
                                            stop_ids=stop_ids, seed=seed):
                token = int(tokens[0, -1])
                if token in stop_ids:
                    break
                produced.append(token)
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
