"""The ``llama-offload`` command: ``complete``, ``chat``, ``serve``, ``info``, ``convert``, ``quantize``, ``merge`` and
``tokenize``.

    llama-offload complete "Once upon a time" "The capital of France is" --ckpt_dir DIR
    llama-offload chat --ckpt_dir DIR --system "Answer briefly."
    llama-offload serve --ckpt_dir DIR --port 8000          (OpenAI-compatible HTTP API)
    llama-offload info --ckpt_dir DIR --max_seq_len 4096 --max_batch_size 1
    llama-offload convert model.gguf --out checkpoints/NAME      (or a Hugging Face Llama directory)
    llama-offload quantize --ckpt_dir checkpoints/NAME --out checkpoints/NAME-int4 --bits 4
    llama-offload merge --ckpt_dir checkpoints/NAME --lora ADAPTER_DIR --out checkpoints/NAME-tuned
    llama-offload tokenize --tokenizer_path tokenizer.model --text "Hello"    (or --dialog '[...]')

Without --ckpt_dir every command uses the default model (SmolLM2-135M-Instruct, made on first use).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from llama_offload.model.args import ModelArgs
from llama_offload.text.chat_format import (
    SPECIAL_TAGS_ERROR, Dialog, default_chat_format_name, get_chat_format, validate_dialog,
)
from llama_offload.checkpoint.load import checkpoint_context_length, describe_quantization, find_shards
from llama_offload.checkpoint.meta import describe_source, read_checkpoint_meta
from llama_offload.convert.gguf import convert_gguf
from llama_offload.convert.hf import convert_hf
from llama_offload.convert.default_model import find_tokenizer, resolve_paths
from llama_offload.generate.generation import Llama
from llama_offload.cli.options import (
    build_llama, check_generation_flags, fire_main, load_json_flag, run_options_command, run_text_completion,
)
from llama_offload.offload.plan import available_host_bytes, plan_host, plan_offload
from llama_offload.offload.lanes import lanes_for_run
from llama_offload.checkpoint.quant_load import read_quantization
from llama_offload.model.lora import lora_cpu_blocks
from llama_offload.checkpoint.lora_merge import check_lora, describe as describe_lora
from llama_offload.generate.preflight import check_before_load, check_context_length, stored_spec, stored_weight_bytes
from llama_offload.generate.run_options import RunOptions
from llama_offload.text.text_input import (
    TextInputError, a_type, check_dialog, check_text, decode_text, read_stdin_lines, tolerate_undecodable_stdin,
)
from llama_offload.text.tokenizer import check_vocab_size, load_tokenizer
from llama_offload.train.command import finetune_command

__all__ = ["chat", "chat_repl", "complete", "convert", "empty_completion_hint", "info", "main", "merge",
           "param_counts", "quantize", "serve", "token_ids", "tokenize", "version"]


@run_options_command(defaults=dict(max_seq_len=128, max_batch_size=4))
def complete(
    *prompts: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = 64,
    options: RunOptions,
) -> None:
    """Complete each prompt (arguments, or one per line on stdin), in batches of max_batch_size.

    Args:
        prompts: the texts to continue; without any, prompts are read from stdin, one per line.
        temperature: 0 means greedy.
        top_p: nucleus sampling threshold.
        max_gen_len: most new tokens per prompt.
        max_batch_size: prompts run together; more are run in several batches.
    """
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    # fire turns a bare `42` or `True` into a number or a bool; a prompt is text whatever it looks like.
    # Every text is checked here, before the model is loaded: invalid UTF-8 is named by where it came from.
    texts = [decode_text(p if isinstance(p, (str, bytes)) else str(p), f"argument {i}")
             for i, p in enumerate(prompts, 1)]
    if not texts:
        if sys.stdin.isatty():
            print("Reading prompts from stdin, one per line; end with Ctrl-D.", file=sys.stderr)
        texts = [line for line in read_stdin_lines() if line.strip()]
        if not texts:
            raise ValueError(
                "No prompts: pass them as arguments (llama-offload complete \"Once upon a time\") "
                "or one per line on stdin (blank lines are skipped)."
            )
    llama = build_llama(options, prompts=texts)  # prompt lengths checked before the weights are read
    completions: list[str] = []
    text_completion = llama.text_completion

    def recorded(*args, **kwargs):  # run_text_completion prints the results; the hint below needs them too
        results = text_completion(*args, **kwargs)
        completions.extend(r["generation"] for r in results)
        return results

    llama.text_completion = recorded  # type: ignore[method-assign]
    run_text_completion(llama, texts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    hint = empty_completion_hint(llama, completions, ckpt_dir=options.ckpt_dir)
    if hint:
        print(f"llama-offload: note: {hint}", file=sys.stderr)


def empty_completion_hint(llama: Llama, completions: list[str], *, ckpt_dir: Optional[str] = None) -> Optional[str]:
    """A hint for ``complete`` when some completions came back empty from a chat model, else None.

    A chat model given a bare question often ends its "answer" at once (it expects a chat prompt around
    it), which leaves an empty line and no clue. A model counts as a chat model when its checkpoint records
    a chat format (llama_offload.json) or its tokenizer ships a chat template.
    """
    empty = sum(1 for c in completions if not c.strip())
    if not empty:
        return None
    ckpt = llama.options.ckpt_dir if llama.options is not None else None
    recorded = read_checkpoint_meta(Path(ckpt)).get("chat_format") if ckpt else None
    if not recorded and not getattr(llama.tokenizer, "chat_template", None):
        return None
    which = f"{empty} of the {len(completions)} completions" if len(completions) > 1 else "the completion"
    fmt = f" (chat format {recorded})" if recorded else ""
    command = "llama-offload chat" + (f" --ckpt_dir {ckpt_dir}" if ckpt_dir else "")
    return (f"{which} came back empty: this is a chat model{fmt}, which answers messages rather than "
            f"continuing text and may end a bare question at once. Ask it with `{command}`.")


HELP = "Commands: /reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer."


def chat_repl(
    llama: Llama,
    *,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    read: Callable[[str], str] = input,
) -> Dialog:
    """Talk with ``llama`` until /exit, end of input or Ctrl-C at the prompt; return the final dialog.

    Ctrl-C during an answer stops it. What was already shown stays in the dialog as the assistant's turn,
    so the conversation the model sees is the one on the screen; if nothing was shown yet, the question is
    dropped too, as if it had not been asked.
    """
    fresh: Dialog = [{"role": "system", "content": check_text(system, "--system")}] if system else []
    dialog: Dialog = list(fresh)
    if read is input:  # an undecodable line comes back with surrogate escapes, to be reported below
        tolerate_undecodable_stdin()
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print()
            return dialog
        except KeyboardInterrupt as e:
            if _is_sigterm(e):  # SIGTERM ends the command as it ends every other one: one line, exit 143
                raise
            print()
            return dialog
        except UnicodeDecodeError as e:  # a reader that decodes strictly: the line is lost, the session is not
            print(f"That line is not valid UTF-8 ({e.reason} at byte {e.start}); it was not sent. Type it again "
                  "as UTF-8.")
            continue
        try:
            line = decode_text(line, "That line")
        except TextInputError as e:
            print(f"{e} It was not sent; the conversation goes on.")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return dialog
        if text == "/reset":
            dialog = list(fresh)
            print("(conversation cleared)")
            continue
        if text.startswith("/") and " " not in text:
            print(f"Unknown command {text}. {HELP}")
            continue

        asked: Dialog = dialog + [{"role": "user", "content": text}]
        if llama.chat_format.contains_special_tags(asked):
            print(f"{SPECIAL_TAGS_ERROR} The message was not sent; rephrase it without the chat format's "
                  f"control tags ({llama.chat_format.name}).")
            continue
        prompt_len = len(llama.chat_format.encode_dialog_prompt(asked))
        if prompt_len >= llama.max_seq_len:
            print(f"The conversation is {prompt_len} tokens long with this message, and max_seq_len is "
                  f"{llama.max_seq_len}: no room is left for an answer. Type /reset to start a new conversation, "
                  "or restart with a larger --max_seq_len.")
            continue

        pieces: list[str] = []
        interrupted = False
        stream = llama.stream_chat(asked, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        try:
            for piece in stream:
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt as e:
            if _is_sigterm(e):
                stream.close()
                print()
                raise
            interrupted = True
        finally:
            stream.close()  # runs the generator's cleanup, which records the stats of what was produced
        print()
        answer = "".join(pieces)
        if interrupted:
            print("[answer stopped]" if answer else "[answer stopped before it began; the question was dropped]")
        if answer or not interrupted:
            dialog = asked + [{"role": "assistant", "content": answer}]
        print(llama.last_stats.summary(), flush=True)
        if not interrupted and prompt_len + llama.last_stats.new_tokens >= llama.max_seq_len:
            print(f"(The answer was cut at max_seq_len = {llama.max_seq_len} tokens. Type /reset to start over, "
                  "or restart with a larger --max_seq_len.)")


def _is_sigterm(e: BaseException) -> bool:
    import signal

    return getattr(e, "signum", None) == signal.SIGTERM


@run_options_command(defaults=dict(max_seq_len=512), fixed=dict(max_batch_size=1),
                     leading=("ckpt_dir", "tokenizer_path"))
def chat(
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    *,
    options: RunOptions,
) -> None:
    """Interactive chat; the answer streams as it is generated. /reset, /exit; Ctrl-C stops an answer.

    One conversation at a time: the batch is 1 (there is no --max_batch_size), which keeps the KV cache as
    small as it can be.

    Args:
        ckpt_dir: Meta checkpoint directory (a chat model, e.g. llama-2-7b-chat); unset: the default model.
        system: system prompt that starts every conversation (kept by /reset).
        temperature: 0 means greedy.
        top_p: nucleus sampling threshold.
        max_gen_len: most new tokens per answer (default: until the end of the answer or of max_seq_len).
        max_seq_len: the whole conversation must fit in this many tokens; /reset when it is full.
        seed: sampling seed (the same conversation gets the same answer).
    """
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    try:  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    except ImportError:
        pass
    from llama_offload.files.cleanup import exit_on_signal

    system = None if system is None else check_text(str(system), "--system")
    # SIGTERM (at the prompt, mid-answer or while loading) exits 143 with one line, as every command does;
    # Ctrl-C keeps its chat meaning (stop the answer; quit at the prompt).
    with exit_on_signal("llama-offload chat"):
        llama = build_llama(options, system=system)  # the system prompt is checked before any weight is read
        chat_repl(llama, system=system, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)


@run_options_command(defaults=dict(max_seq_len=1024, max_batch_size=4), leading=("ckpt_dir", "tokenizer_path"))
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 64,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    shutdown_timeout: float = 10.0,
    max_body_mb: float = 16.0,
    *,
    options: RunOptions,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health) whose
    concurrent requests share each decode pass. Loads the model once and prints the URL; SIGINT/SIGTERM stop it.

    Args:
        ckpt_dir: Meta checkpoint directory; unset: the default model.
        host: the address to listen on; the default answers this machine only (put a reverse proxy in front, or
            give 0.0.0.0 together with --api_key, to serve others).
        port: the TCP port.
        max_batch_size: requests decoded together in one pass; more wait in the queue.
        max_queue: requests that may wait for a free batch row; beyond that the server answers 429.
        api_key: require 'Authorization: Bearer KEY' (else 401); the LLAMA_OFFLOAD_API_KEY environment variable
            sets it too, without showing it in the process list.
        model_name: the name clients send as "model" (default: the checkpoint directory's name).
        shutdown_timeout: seconds that in-flight requests get to finish after SIGINT/SIGTERM; the ones still
            running then end with an OpenAI error (streams: an error event, then [DONE]).
        max_body_mb: the largest request body accepted, in MB; a larger one gets 413 before it is parsed.
    """
    import os

    host, model_name = str(host).strip(), None if model_name is None else str(model_name).strip()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port must be a TCP port between 1 and 65535, found {port!r}.")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"--max_queue must be a whole number of requests, 0 or more, found {max_queue!r}.")
    if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
        raise ValueError(f"--shutdown_timeout must be a number of seconds, 0 or more, found {shutdown_timeout!r}.")
    if isinstance(max_body_mb, bool) or not isinstance(max_body_mb, (int, float)) or not max_body_mb > 0:
        raise ValueError(f"--max_body_mb must be a size in MB, more than 0, found {max_body_mb!r}.")
    if not host:
        raise ValueError("--host is empty: give an address to listen on, e.g. 127.0.0.1.")
    api_key = os.environ.get("LLAMA_OFFLOAD_API_KEY") if api_key is None else str(api_key)
    if api_key is not None and not api_key.strip():
        raise ValueError("--api_key is empty: give a key, or leave the flag out to serve without one.")
    if model_name == "":
        raise ValueError("--model_name is empty: give the name clients will send, or leave the flag out.")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"llama-offload serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install fastapi uvicorn.") from None
    _check_port_free(host, port)  # before the model loads: a port in use fails now, not after a minute
    llama = build_llama(options)
    from llama_offload.serve.server import run

    run(llama, model_name=model_name or Path(llama.options.ckpt_dir or "model").name, host=host, port=port,
        max_queue=max_queue, api_key=api_key, shutdown_timeout=float(shutdown_timeout),
        max_body_mb=float(max_body_mb))


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on ({e}).") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"Cannot listen on {host}:{port}: {e.strerror}. Another server may be using the port; "
                             "stop it or give another --port.") from None


def param_counts(args: ModelArgs, *, tied: bool = False) -> dict[str, int]:
    """Parameters per part of the model, from the shapes alone (the bytes come from ``plan_offload``).

    ``tied``: the output head is the token embedding (SmolLM2's tie_word_embeddings). ``total`` then counts
    that matrix once, as the model's own parameter count does, while ``held`` still counts both copies: the
    checkpoint stores the head as a matrix of its own, and that is what is loaded and takes memory.
    Without ``tied`` the two are equal.
    """
    if args.vocab_size <= 0:
        raise ValueError("Counting parameters needs the real vocab_size; fill params.json's -1 from the tokenizer.")
    dim, hidden = args.dim, args.ffn_hidden_dim
    q_out, kv_out = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    per_block = (
        dim * q_out + 2 * dim * kv_out + q_out * dim  # wq, wk + wv, wo
        + 3 * dim * hidden  # w1, w2, w3
        + 2 * dim  # attention_norm, ffn_norm
    )
    resident = args.vocab_size * dim + dim + dim * args.vocab_size  # tok_embeddings, norm, output
    blocks = args.n_layers * per_block
    held = blocks + resident
    total = held - args.vocab_size * dim if tied else held
    return dict(per_block=per_block, blocks=blocks, resident=resident, total=total, held=held)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(ckpt_dir: Path) -> tuple[torch.dtype, int]:
    """(dtype, number of shards), reading only shard 00's index: mmap leaves the weights on disk."""
    shards = find_shards(ckpt_dir)
    try:
        sd = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch.load raises many types on a damaged file
        raise RuntimeError(f"Could not read {shards[0]} ({type(e).__name__}: {e}). Re-download it, or pass "
                           "--dtype to plan without reading the weights.") from e
    tensors = [v for v in sd.values() if isinstance(v, torch.Tensor)] if isinstance(sd, dict) else []
    if not tensors:
        raise RuntimeError(f"{shards[0]} holds no tensors. Re-download it, or pass --dtype to plan without it.")
    # The final norm: a quantized checkpoint's embedding may be int8, its norms keep the run's width.
    return sd.get("norm.weight", tensors[0]).dtype, len(shards)


# What info leaves out: it plans the offloaded run on a GPU, without loading anything.
INFO_IGNORES = ("offload", "device", "seed", "chat_format", "cuda_graphs", "draft", "num_draft_tokens")


@run_options_command(exclude=INFO_IGNORES, leading=("ckpt_dir", "tokenizer_path"))
def info(*, options: RunOptions) -> None:
    """Model shape, parameter count and the memory an offloaded run needs, without loading the weights.

    Takes the run options that change the plan; not --offload, --device, --seed, --chat_format, --cuda_graphs,
    --draft, --num_draft_tokens (a model draft's GPU memory is measured when it is loaded).

    Args:
        ckpt_dir: Meta checkpoint directory; unset: the default model.
        tokenizer_path: tokenizer.model (only read when params.json has vocab_size -1).
        max_seq_len: sizes the KV cache, as in complete/chat.
        max_batch_size: sizes the KV cache, as in complete/chat.
        num_slices: groups the blocks are paged in (default: one block per slice).
        gpu_memory_gb: plan for this GPU memory budget in GiB instead (resident blocks first, the rest paged).
        dtype: float16, bfloat16 or float32 to plan for (default: the checkpoint's, read from shard 00).
        prefill_chunk: prompt positions per prefill pass, which size the activation estimate (default:
            min(max_seq_len, 2048)).
        cpu_blocks: blocks the host's cores compute while the others stream (default: the calibrated split,
            on a machine with a GPU).
        cpu_threads: the CPU lane's threads (default: every core but one).
    """
    ckpt_dir, tokenizer_path, num_slices = options.ckpt_dir, options.tokenizer_path, options.num_slices
    max_seq_len, max_batch_size = options.max_seq_len, options.max_batch_size
    want_dtype = options.torch_dtype
    if ckpt_dir is None:
        ckpt, tok = resolve_paths(None, tokenizer_path)
    else:
        ckpt = Path(ckpt_dir).expanduser()
        tok = None if tokenizer_path is None else Path(tokenizer_path).expanduser()
        if not ckpt.is_dir():
            find_shards(ckpt)  # the error that names the directory and explains the layout
    args = ModelArgs.from_json(ckpt / "params.json", max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    vocab_note = ""
    if tok is None:
        try:
            _, tok = resolve_paths(ckpt, None)
        except FileNotFoundError:
            if args.vocab_size == -1:
                raise  # params.json leaves the vocabulary to the tokenizer: nothing to plan without one
    if tok is not None:  # its vocabulary must be the checkpoint's (checked without weights, like the run does)
        tokenizer = load_tokenizer(tok)
        if args.vocab_size == -1:
            args = dataclasses.replace(args, vocab_size=tokenizer.n_words)
            vocab_note = f" (params.json says -1: taken from {tok})"
        else:
            check_vocab_size(tokenizer, args.vocab_size, source=str(ckpt / "params.json"))
    # --lora: its config and its shape against params.json; merged into 16-bit weights, beside quantized ones.
    lora = None if options.lora is None else check_lora(options.lora, ckpt, args, merging=False)
    attached = lora is not None and read_quantization(ckpt) is not None
    # The shard files must be there with the sizes params.json implies (a quantized one: its tensors must fit it).
    _, sizes = stored_weight_bytes(ckpt, args, options.quant_spec, want_dtype)
    context, context_source = checkpoint_context_length(ckpt, args)
    if want_dtype is None:
        model_dtype, n_shards = _checkpoint_dtype(ckpt)
        dtype_note = f"{_dtype_name(model_dtype)} (as stored in {n_shards} shard(s))"
    else:
        model_dtype, dtype_note = want_dtype, f"{_dtype_name(want_dtype)} (from --dtype)"
    n_layers = args.n_layers
    if num_slices is not None and num_slices > n_layers:
        raise ValueError(f"--num_slices {num_slices} is more than the {n_layers} blocks there are to page; "
                         f"choose 1..{n_layers}.")
    # The same plan offload() follows when the model is loaded with these flags; on a GPU machine the CPU lane's
    # calibration (cached) gives the split and the expected time per token.
    lanes = None
    cpu_blocks = lora_cpu_blocks(options.cpu_blocks) if attached else options.cpu_blocks
    if torch.cuda.is_available():
        lanes, _ = lanes_for_run(cpu_blocks, options.cpu_threads, args, model_dtype, torch.device("cuda"),
                                 offload=True, spec=stored_spec(ckpt, options.quant_spec))
    plan = plan_offload(args, model_dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        gpu_memory_gb=options.gpu_memory_gb, num_slices=num_slices, prefill_chunk=options.prefill_chunk,
                        cpu_blocks=cpu_blocks, lanes=lanes,
                        sizes=sizes if want_dtype is not None else stored_weight_bytes(ckpt, args, options.quant_spec,
                                                                                        model_dtype)[1])
    counts, size = param_counts(args, tied=bool(read_checkpoint_meta(ckpt).get("tied_embeddings"))), model_dtype.itemsize

    meta = read_checkpoint_meta(ckpt)
    quantization = read_quantization(ckpt)
    print(f"checkpoint     {ckpt}")
    if meta:
        print(f"converted from {describe_source(meta.get('source'))}; chat format "
              f"{meta.get('chat_format') or 'none recorded'}")
    for merged in meta.get("lora_merged") or []:
        if isinstance(merged, dict):
            print(f"merged adapter LoRA rank {merged.get('rank', '?')}, targets "
                  f"{','.join(map(str, merged.get('targets') or [])) or '?'}, from {merged.get('path', '?')}")
    if lora is not None:
        how = ("attached beside the quantized matrices (resident on the GPU; no CPU lane)" if attached else
               "merged into the weights while loading" + (", before --quantize" if options.quant_spec is not None else ""))
        print(f"adapter        {options.lora}: {describe_lora(lora)}; {how}")
    if quantization is not None:
        # The blocks' own bytes, measured from the shard's tensors: the storage a run reads, not the compute dtype.
        measured = n_layers * plan.block_bytes * 8 / max(1, n_layers * counts["per_block"])
        print(f"storage        {describe_quantization(quantization)}; {measured:.2f} bits/weight over the blocks, "
              "measured")
        source = "from --dtype" if want_dtype is not None else "the dtype its norms are stored in"
        print(f"dtype          compute {_dtype_name(model_dtype)} ({source}); the quantized matrices are "
              "dequantized to it as they are used")
    else:
        print(f"dtype          {dtype_note}")
    print(f"model          dim {args.dim}, {n_layers} layers, {args.n_heads} heads, {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, ffn hidden {args.ffn_hidden_dim}, vocab {args.vocab_size}{vocab_note}, "
          f"rope_theta {args.rope_theta:g}{', scaled RoPE' if args.use_scaled_rope else ''}")
    print(f"parameters     {_fmt_count(counts['total'])}: {_fmt_count(counts['per_block'])} per block, "
          f"{_fmt_count(counts['resident'])} in embedding + norm + output head")
    held = (counts['held'] * size if plan.quantization is None
            else n_layers * plan.block_bytes + plan.fixed_bytes["embedding"] + plan.fixed_bytes["output head + norm"])
    quantized = f" ({plan.quantization})" if plan.quantization else ""
    print(f"weights        {_fmt_bytes(plan.block_bytes)} per block{quantized}, {_fmt_bytes(n_layers * plan.block_bytes)} "
          f"for all {n_layers} blocks, {_fmt_bytes(held)} in all")
    print(f"run size       max_batch_size {max_batch_size} x max_seq_len {max_seq_len} (sizes the KV cache)")
    print(f"paged          {plan.paged_layers} of {n_layers} blocks, in {plan.num_slices} slice(s), from "
          f"{_fmt_bytes(plan.streamed_bytes)} of pinned host memory; {plan.resident_layers} block(s) resident")
    if plan.cpu_blocks:
        print(f"CPU lane       {plan.cpu_blocks} of {n_layers} blocks computed by the host's cores while the paged "
              f"ones stream (placement: {''.join(w[0].upper() for w in plan.placement())}; R resident, P paged, C CPU)")
    elif lanes is None and cpu_blocks is None:
        print("CPU lane       not planned: the split is calibrated on a machine with a GPU (or give --cpu_blocks N)")
    print("GPU memory plan (the CUDA context, a few hundred MiB, comes on top):")
    print(plan.describe())
    print(f"context        {f'{context} tokens, from {context_source}' if context else 'not known (nothing records it)'}")
    try:  # info shows the plan anyway; the run's own check below refuses it
        check_context_length(max_seq_len, context, context_source, options.allow_long_context)
    except ValueError as e:
        print(f"  warning: {e}")
    cpu_dtype = options.torch_dtype or torch.float32
    cpu_plan = plan_offload(args, cpu_dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                            prefill_chunk=options.prefill_chunk, all_resident=True,
                            sizes=stored_weight_bytes(ckpt, args, options.quant_spec, cpu_dtype)[1])
    available = available_host_bytes()
    for title, host in (("offloaded on a GPU", plan_host(plan, on_cpu=False)),
                        ("on the CPU, in float32 unless --dtype", plan_host(cpu_plan, on_cpu=True))):
        print(f"Host memory plan, {title}:")
        print(host.describe())
        if available is not None and host.total_bytes > available:
            print(f"  warning: more than the {available / 2**30:.2f} GiB available now (MemAvailable): "
                  f"{host.advice()}")
    if not torch.cuda.is_available():
        print("note           PyTorch sees no CUDA GPU here: on this machine the blocks would run on the CPU.")
    # The checks complete, chat and serve make before loading, with these flags on this machine: info exits
    # non-zero (after showing the plan) wherever a run would be refused.
    if tok is None:
        raise FileNotFoundError(f"a run would be refused: no tokenizer was found for {ckpt}. Pass --tokenizer_path "
                                "with the tokenizer that came with the checkpoint.")
    try:
        preflight = check_before_load(ckpt, tok, options, check_memory=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"a run with these flags would be refused: {e}") from None
    if preflight.plan.host_kernel is not None:  # the run is on the CPU: how its matrices multiply here
        print(f"CPU kernel     {preflight.plan.host_kernel.describe()}")


def convert(source: str, out: str, dtype: Optional[str] = None, force: bool = False) -> None:
    """Convert a GGUF file or a Hugging Face Llama directory into a checkpoint directory llama-offload runs.

    Args:
        source: a .gguf file (Llama architecture), or a directory with config.json and *.safetensors.
        out: the checkpoint directory to write, e.g. checkpoints/NAME; an existing one needs --force.
        dtype: float16, bfloat16 or float32, every weight dequantized or cast to it. Default: a GGUF's quantized
            matrices kept as they are (exactly) and its other tensors at their width, a Hugging Face model's dtype.
        force: replace an existing output directory, only one holding a checkpoint written by a conversion
            (llama_offload.json), and only once the new one is complete.
    """
    from llama_offload.files.cleanup import exit_on_signal

    src = Path(source).expanduser()
    # SIGTERM and Ctrl-C remove the partial output and exit 143 / 130 with one line.
    with exit_on_signal("llama-offload convert"):
        if src.is_dir():
            done = convert_hf(src, out, dtype=dtype, force=bool(force))
        else:
            done = convert_gguf(src, out, dtype=dtype, force=bool(force))
    print(f"converted {src} -> {done}")
    print(f"run it with: llama-offload chat --ckpt_dir {done}")


def quantize(ckpt_dir: str, out: str, bits: Optional[int] = None, group_size: Optional[int] = None,
             quantize_embeddings: bool = False, tokenizer_path: Optional[str] = None, force: bool = False) -> None:
    """Write a quantized copy of a Meta checkpoint: int8 or int4 blocks, one consolidated.00.pth.

    Args:
        ckpt_dir: the 16-bit (or float32) checkpoint directory; sharded ones (13B, 70B) are merged.
        out: the directory to write, outside ckpt_dir; an existing one needs --force.
        bits: 8 (int8 per output channel, ~8.0 bits a weight) or 4 (int4 in groups, 4.5 bits with groups of 64).
        group_size: 32, 64 or 128 inputs per int4 group (default 64); not with --bits 8.
        quantize_embeddings: the token embedding and output head in int8 too (else they keep 16 bits).
        tokenizer_path: the tokenizer to copy (default: the one found in ckpt_dir or beside it).
        force: replace an existing output directory, only one holding a checkpoint this tool wrote
            (llama_offload.json), and only once the new one is complete.
    """
    from llama_offload.files.cleanup import exit_on_signal
    from llama_offload.convert.quantize import quantize_checkpoint, spec_from_flags

    spec = spec_from_flags(bits, group_size, quantize_embeddings)
    with exit_on_signal("llama-offload quantize"):
        done = quantize_checkpoint(Path(ckpt_dir).expanduser(), out, spec, tokenizer_path=tokenizer_path,
                                   force=bool(force))
    print(f"quantized {Path(ckpt_dir).expanduser()} -> {done} ({spec.name})")
    print(f"run it with: llama-offload chat --ckpt_dir {done}")


def merge(ckpt_dir: str, lora: str, out: str, tokenizer_path: Optional[str] = None, force: bool = False) -> None:
    """Write a copy of a Meta checkpoint with a LoRA adapter merged into its weights (its dtype and shards kept).

    Args:
        ckpt_dir: the 16-bit (or float32) checkpoint the adapter was trained on; a quantized one is refused (merge
            into its unquantized original, then quantize the result).
        lora: the adapter directory (adapter_config.json, adapter.safetensors) llama-offload finetune wrote.
        out: the directory to write, neither ckpt_dir nor inside it; an existing one needs --force.
        tokenizer_path: the tokenizer to copy (default: the one found in ckpt_dir or beside it).
        force: replace an existing output directory, only one holding a checkpoint llama_offload wrote
            (llama_offload.json), and only once the new one is complete.
    """
    from llama_offload.files.cleanup import exit_on_signal
    from llama_offload.convert.merge import merge_checkpoint

    for name, value in (("ckpt_dir", ckpt_dir), ("lora", lora), ("out", out)):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
            raise ValueError(f"--{name} takes a directory, found {value!r}.")
    with exit_on_signal("llama-offload merge"):
        done = merge_checkpoint(Path(str(ckpt_dir)).expanduser(), Path(str(lora)).expanduser(), str(out),
                                tokenizer_path=tokenizer_path, force=bool(force))
    print(f"merged {Path(str(lora)).expanduser()} into {Path(str(ckpt_dir)).expanduser()} -> {done}")
    print(f"run it with: llama-offload chat --ckpt_dir {done}")


_DIALOG_EXAMPLE = """a JSON list of messages, e.g. --dialog '[{"role": "user", "content": "Hi!"}]'"""


def _text_flag(text: object) -> str:
    # main() passes --text through as typed; a positional text is still evaluated by fire (42 -> int), and a
    # bare --text arrives as True.
    if isinstance(text, (str, bytes)):
        return decode_text(text, "--text")
    if isinstance(text, bool) or not isinstance(text, (int, float)):
        raise ValueError(
            f"--text must be a string, but it arrived as {a_type(text)} ({text!r}). Give it a value "
            """with the flag: --text "Hello, world"."""
        )
    print(f"llama-offload: note: the text was read as the number {text!r}; tokenizing {str(text)!r}. "
          "Pass it with --text to have it exactly as typed.", file=sys.stderr)
    return str(text)


def _dialog_flag(dialog: object) -> Dialog:
    value = load_json_flag(dialog, "--dialog", _DIALOG_EXAMPLE)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, dict):
        raise ValueError(f"--dialog is one message, not a dialog: wrap it in a list. Expected {_DIALOG_EXAMPLE}.")
    if not isinstance(value, list):
        raise ValueError(f"--dialog must be {_DIALOG_EXAMPLE}; found {a_type(value)}: {value!r}.")
    if value and all(isinstance(d, list) for d in value):
        raise ValueError(f"--dialog holds a list of dialogs; give one dialog, {_DIALOG_EXAMPLE}.")
    try:
        validate_dialog(value)
    except ValueError as e:
        raise ValueError(f"--dialog: {e}") from None
    return value


def token_ids(
    text: Optional[object] = None,
    dialog: Optional[object] = None,
    tokenizer_path: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    chat_format: Optional[str] = None,
) -> list[int]:
    """The ids ``tokenize`` prints: what the model is given for ``text`` (text completion, BOS included when
    the tokenizer adds one) or for ``dialog`` (the chat prompt of ``chat_completion``)."""
    if (text is None) == (dialog is None):
        raise ValueError("Give exactly one of --text (a text completion prompt) and --dialog (a chat, "
                         f"{_DIALOG_EXAMPLE}); found {'both' if text is not None else 'neither'}.")
    if chat_format is not None and dialog is None:
        raise ValueError("--chat_format only applies to --dialog; text completion prompts use no chat format.")
    # The flags are checked before anything is loaded (without a path that may mean preparing the default model).
    prompt = _text_flag(text) if text is not None else None
    messages = _dialog_flag(dialog) if dialog is not None else None
    if messages is not None:
        check_dialog(messages, "--dialog")
    recorded = None
    if tokenizer_path is not None:
        tok_path = Path(tokenizer_path).expanduser()
    elif ckpt_dir is not None:
        ckpt = Path(ckpt_dir).expanduser()
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--ckpt_dir {ckpt} is not a directory. Pass the checkpoint directory, or "
                                    "--tokenizer_path with the tokenizer file itself.")
        found = find_tokenizer(ckpt)
        if found is None:
            raise FileNotFoundError(
                f"No tokenizer (tokenizer.model or tokenizer.json) was found in {ckpt}, nor tokenizer.model in its "
                f"parent {ckpt.parent}. Pass --tokenizer_path with the tokenizer that came with the checkpoint."
            )
        tok_path = found
    else:
        _, tok_path = resolve_paths(None, None)  # the default model, as in the other commands
    if ckpt_dir is not None:
        recorded = read_checkpoint_meta(Path(ckpt_dir).expanduser()).get("chat_format")

    tokenizer = load_tokenizer(tok_path)
    if prompt is not None:
        return tokenizer.encode(prompt, bos=True, eos=False)  # as text_completion does
    assert messages is not None
    # The same choice generation makes: the flag, else what a converted checkpoint records, else by tokenizer.
    name = str(chat_format) if chat_format is not None else recorded or default_chat_format_name(tokenizer)
    return get_chat_format(name, tokenizer).encode_dialog_prompt(messages)


def tokenize(
    text: Optional[str] = None,
    dialog: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    chat_format: Optional[str] = None,
) -> None:
    """Print the token ids the model sees, as one JSON list on one line.

    Args:
        text: a text completion prompt (BOS included when the tokenizer adds one, as in complete).
        dialog: instead of text, a chat as a JSON list of {"role", "content"} messages; prints the chat prompt.
        tokenizer_path: tokenizer.model (SentencePiece or Llama 3 tiktoken) or tokenizer.json.
        ckpt_dir: instead of tokenizer_path, a checkpoint directory: its tokenizer and recorded chat format.
            With neither, the default model's tokenizer is used.
        chat_format: llama2, llama3 or chatml for --dialog (default: what the checkpoint records, else the
            one that fits the tokenizer).
    """
    print(json.dumps(token_ids(text, dialog, tokenizer_path=tokenizer_path, ckpt_dir=ckpt_dir,
                               chat_format=chat_format)))


def _keep_as_text(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` with the values of ``flags`` written as Python string literals, which fire reads back as
    exactly the text typed. Otherwise fire evaluates them: "Hello, world" becomes a tuple, "(a)" becomes
    "a", "None" None, and JSON's true/null/"\\/" do not survive into --dialog."""
    out = list(argv)
    i = 0
    while i < len(out):
        arg = out[i]
        if arg == "--":  # what follows is for fire itself (--help, --trace)
            break
        for flag in flags:
            if arg.startswith(f"--{flag}="):
                out[i] = f"--{flag}={out[i].split('=', 1)[1]!r}"
            elif arg == f"--{flag}" and i + 1 < len(out) and not out[i + 1].startswith("--"):
                out[i + 1] = repr(out[i + 1])
                i += 1
        i += 1
    return out


def version() -> str:
    """The installed package's version (its metadata), else ``llama_offload.__version__`` where it has one."""
    from importlib import metadata

    try:
        return metadata.version("llama_offload")
    except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        import llama_offload  # the package root: its __version__ only

        return str(getattr(llama_offload, "__version__", "unknown (not installed)"))


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(f"llama-offload {version()}")
        return
    if sys.argv[1:2] == ["tokenize"]:  # its flags must reach it exactly as typed
        sys.argv[2:] = _keep_as_text(sys.argv[2:], ("text", "dialog"))
    fire_main({"complete": complete, "chat": chat, "serve": serve, "info": info, "convert": convert,
               "quantize": quantize, "merge": merge, "tokenize": tokenize, "finetune": finetune_command},
              name="llama-offload")


if __name__ == "__main__":
    main()
