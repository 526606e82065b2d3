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

import llama_offload
from llama_offload.text.chat_format import (
    SPECIAL_TAGS_ERROR, Dialog, chat_format_name, get_chat_format, validate_dialog,
)
from llama_offload.checkpoint.meta import read_checkpoint_meta
from llama_offload.convert.gguf import convert_gguf
from llama_offload.convert.hf import convert_hf
from llama_offload.convert.merge import merge_checkpoint
from llama_offload.convert.quantize import quantize_checkpoint, spec_from_flags
from llama_offload.convert.default_model import find_tokenizer, resolve_paths
from llama_offload.generate.generation import Llama
from llama_offload.cli.options import (
    build_llama, check_generation_flags, fire_main, load_json_flag, run_options_command, run_text_completion,
)
from llama_offload.generate.run_plan import check_context_length, plan_run
from llama_offload.checkpoint.record import read_checkpoint
from llama_offload.files.cleanup import exit_on_signal
from llama_offload.offload.plan import check_host_memory
from llama_offload.generate.run_options import RunOptions
from llama_offload.text.text_input import (
    TextInputError, a_type, check_dialog, check_text, decode_text, read_stdin_lines, tolerate_undecodable_stdin,
)
from llama_offload.text.tokenizer import load_tokenizer
from llama_offload.train.command import finetune_command

__all__ = ["chat", "chat_repl", "complete", "convert", "empty_completion_hint", "info", "main", "merge", "quantize", "serve", "token_ids", "tokenize", "version"]


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
    if getattr(llama, "plan", None) is not None:  # built from a checkpoint: its record holds llama_offload.json
        recorded = llama.plan.checkpoint.meta.get("chat_format")
    else:
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
    # Late: only serve needs FastAPI and uvicorn (checked above, with a one-line error, before the model loads).
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


# What info leaves out: none of these changes the plan.
INFO_IGNORES = ("seed", "cuda_graphs")


@run_options_command(exclude=INFO_IGNORES, leading=("ckpt_dir", "tokenizer_path"))
def info(*, options: RunOptions) -> None:
    """The plan of a run with these flags on this machine, without loading the weights: the model's shape and
    parameters, where each block runs (resident, paged, CPU lane), the GPU and host memory. ``Llama.build`` carries
    out exactly this plan; info exits non-zero (after showing it) wherever a run would be refused.

    Takes the run options, except --seed and --cuda_graphs, which do not change the plan; --device cuda plans a
    GPU run even on a machine without one.

    Args:
        ckpt_dir: Meta checkpoint directory; unset: the default model.
        tokenizer_path: the tokenizer (default: the one that came with the checkpoint).
        max_seq_len: sizes the KV cache, as in complete/chat.
        max_batch_size: sizes the KV cache, as in complete/chat.
        num_slices: groups the blocks are paged in (default: one block per slice).
        gpu_memory_gb: plan for this GPU memory budget in GiB instead (resident blocks first, the rest paged).
        dtype: float16, bfloat16 or float32 to plan for (default: the checkpoint's; float32 on the CPU).
        prefill_chunk: prompt positions per prefill pass, which size the activation estimate (default:
            min(max_seq_len, 2048)).
        cpu_blocks: blocks the host's cores compute while the others stream (default: the calibrated split,
            on a machine with a GPU).
        cpu_threads: the CPU lane's threads (default: every core but one).
    """
    ckpt = read_checkpoint(resolve_paths(options.ckpt_dir, None)[0] if options.ckpt_dir is None
                           else Path(options.ckpt_dir).expanduser())
    tok = (Path(options.tokenizer_path).expanduser() if options.tokenizer_path is not None
           else find_tokenizer(ckpt))
    if tok is None:
        raise FileNotFoundError(f"no tokenizer was found for {ckpt.path}: a run would be refused. Pass "
                                "--tokenizer_path with the tokenizer that came with the checkpoint.")
    n_layers = ckpt.model_args().n_layers
    if options.num_slices is not None and options.num_slices > n_layers:
        raise ValueError(f"--num_slices {options.num_slices} is more than the {n_layers} blocks there are to page; "
                         f"choose 1..{n_layers}.")
    options = dataclasses.replace(options, ckpt_dir=str(ckpt.path), tokenizer_path=str(tok))
    run = plan_run(ckpt, tok, options, planning_only=True)
    print(run.describe())
    # Shown above as warnings; a run with these flags refuses them before loading.
    try:
        check_context_length(run.options.max_seq_len, run.context_length, run.context_source,
                             run.options.allow_long_context)
        if run.device.type == "cpu" or torch.cuda.is_available():
            check_host_memory(run.host)
    except ValueError as e:
        raise ValueError(f"a run with these flags would be refused: {e}") from None


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
    name = chat_format_name(chat_format, {"chat_format": recorded}, tokenizer)
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
