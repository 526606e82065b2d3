"""Flag handling shared by the ``llama-offload`` command and the example scripts.

The model and offload flags are the fields of ``RunOptions`` (run_options.py): ``run_options_command``
turns them into flags of a command, with their help, and hands the command one checked ``RunOptions``;
``build_llama`` loads a model from it. The sampling flags stay each command's own (their rules are
run_options.py's too). ``fire_main`` runs a command through fire's public entry point, ``fire.Fire``, and
nothing else of fire's: help is printed, not paged, because the fire call gets a $PAGER that hands the
screen back to be printed.

fire hands over whatever the shell gave it, parsed as Python literals where that works: ``--prompts``
may arrive as a list or as a JSON string, ``--temperature 0`` as an int, ``--dtype`` as any word. Everything
is checked here, before a model is loaded, so a typo costs a second and not a checkpoint load; so is every
flag's name (``check_flag_names``), which fire itself would only question after running the command.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import io
import json
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import fire

from llama_offload.model import parallel
from llama_offload.text.chat_format import Dialog, default_chat_format_name, get_chat_format, validate_dialog
from llama_offload.checkpoint.meta import read_checkpoint_meta
from llama_offload.convert.default_model import resolve_paths
from llama_offload.files.cleanup import interrupt_exit_code, interrupt_message
from llama_offload.generate.generation import ChatPrediction, CompletionPrediction, Llama
from llama_offload.text.text_input import a_type, check_dialog, check_texts
from llama_offload.generate.run_options import RunOptions, check_sampling_flags, flag_parameters, with_flag_help
from llama_offload.model.dtypes import DTYPES, parse_dtype
from llama_offload.text.tokenizer import load_tokenizer

__all__ = [
    "DTYPES",
    "RunOptions",
    "build_llama",
    "FlagError",
    "check_flag_names",
    "check_generation_flags",
    "check_prompts",
    "fire_main",
    "load_json_flag",
    "parse_dialogs",
    "parse_dtype",
    "parse_prompts",
    "run_chat_completion",
    "run_options_command",
    "run_text_completion",
    "start_model_parallel",
]

# What a user can fix from the message alone. Anything else (TypeError, AssertionError, ...) is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)

T = TypeVar("T")


def load_json_flag(value: Any, flag: str, example: str) -> Any:
    """A JSON-valued flag: the string parsed as JSON (or the value fire already parsed); ``example`` in the error."""
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
    prompts = load_json_flag(value, "--prompts", example)
    if isinstance(prompts, tuple):
        prompts = list(prompts)
    if not isinstance(prompts, list):
        raise ValueError(f"--prompts must be {example}; found {a_type(prompts)}: {prompts!r}.")
    if not prompts:
        raise ValueError(f"--prompts is an empty list; give at least one prompt: {example}.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"--prompts item {i} is {a_type(p)} ({p!r}), expected a string. Quote it.")
    return check_texts(prompts, "--prompts")


def parse_dialogs(value: Any) -> list[Dialog]:
    """``--dialogs``: a JSON list of dialogs, each a list of {"role", "content"} messages."""
    example = """a JSON list of dialogs, e.g. --dialogs '[[{"role": "user", "content": "Hi!"}]]'"""
    dialogs = load_json_flag(value, "--dialogs", example)
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
        check_dialog(dialog, f"--dialogs item {i}")
    return dialogs


# The sampling flags' rules live beside RunOptions' (run_options.py); the commands and scripts call them by this name.
check_generation_flags = check_sampling_flags


def start_model_parallel() -> tuple[int, int]:
    """Under torchrun with N > 1 processes: join them into one model-parallel group (one GPU each) and let
    only rank 0 print to stdout; return (rank, N). One process: nothing to do, (0, 1)."""
    if parallel.requested_world_size() == 1:
        return 0, 1
    rank, world_size = parallel.init_model_parallel()
    parallel.quiet_other_ranks()
    return rank, world_size


def build_llama(options: Optional[RunOptions] = None, *, prompts: Optional[Sequence[str]] = None,
                dialogs: Optional[Sequence[Dialog]] = None, system: Optional[str] = None, **flags: Any) -> Llama:
    """``Llama.build`` with ``options`` (``flags``, RunOptions field names, change some); no ckpt_dir means the
    default model, made on first use. Under torchrun with several processes, the model is split over them
    (see start_model_parallel). The Llama keeps the options it was built with, the resolved paths in them.
    ``prompts`` (texts) and ``dialogs`` the run will be given are checked against the tokenizer and
    max_seq_len before any weight is read (see check_prompts)."""
    options = RunOptions.from_flags(flags, base=options)  # checked before resolve_paths, which may take seconds
    start_model_parallel()
    ckpt, tokenizer = resolve_paths(options.ckpt_dir, options.tokenizer_path)
    options = options.replace(ckpt_dir=str(ckpt), tokenizer_path=str(tokenizer))
    if prompts is not None or dialogs is not None or system is not None:
        check_prompts(options, prompts=prompts, dialogs=dialogs, system=system)
    return Llama.build(ckpt, tokenizer, options=options)


def check_prompts(options: RunOptions, *, prompts: Optional[Sequence[str]] = None,
                  dialogs: Optional[Sequence[Dialog]] = None, system: Optional[str] = None) -> None:
    """Refuse empty prompts and prompts that leave no room to generate within max_seq_len, with only the
    tokenizer loaded (``options`` with resolved paths). Dialogs are encoded in the chat format the run uses;
    a chat's ``system`` prompt must leave room for a question and an answer."""
    assert options.tokenizer_path is not None
    tokenizer = load_tokenizer(options.tokenizer_path)
    encoded: list[tuple[str, list[int]]] = []
    for i, text in enumerate(prompts or ()):
        if not str(text).strip():
            raise ValueError(f"Prompt {i + 1} is empty: give it some text (blank prompts are not completed).")
        encoded.append((f"Prompt {i + 1}", tokenizer.encode(str(text), bos=True, eos=False)))
    if system is not None:
        dialogs = [*(dialogs or ()), [{"role": "system", "content": system}, {"role": "user", "content": "?"}]]
    if dialogs:
        recorded = read_checkpoint_meta(options.ckpt_dir).get("chat_format") if options.ckpt_dir else None
        name = options.chat_format or recorded or default_chat_format_name(tokenizer)
        chat_format = get_chat_format(name, tokenizer)
        encoded += [("--system (with a one-word question)" if system is not None and i == len(dialogs) - 1
                     else f"Dialog {i + 1}", chat_format.encode_dialog_prompt(d)) for i, d in enumerate(dialogs)]
    for what, tokens in encoded:
        if not tokens:
            raise ValueError(f"{what} is empty: it has no tokens. Give it some text.")
        if len(tokens) >= options.max_seq_len:
            raise ValueError(f"{what} is {len(tokens)} tokens long, but --max_seq_len is {options.max_seq_len} and at "
                             "least one position must be left to generate into. Shorten it, or raise --max_seq_len.")


# --- commands whose flags are RunOptions' fields ----------------------------------------------------


_P = inspect.Parameter
_KINDS = (_P.POSITIONAL_OR_KEYWORD, _P.VAR_POSITIONAL, _P.KEYWORD_ONLY)


def run_options_command(
    *,
    defaults: Optional[Mapping[str, Any]] = None,
    fixed: Optional[Mapping[str, Any]] = None,
    exclude: Sequence[str] = (),
    leading: Sequence[str] = (),
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Make ``fn(..., *, options: RunOptions)`` a fire command whose flags are its own parameters plus one
    per RunOptions field: a field added to RunOptions is a flag of every such command, with its help.

    The command's ``__signature__`` (Python's documented way for a wrapper to state its parameters: what
    ``inspect.signature`` gives, so what fire parses and ``-- --help`` lists, and what Python callers see)
    is ``fn``'s parameters without ``options``, then the fields with their defaults, in RunOptions' order:
    keyword-only where ``fn`` has ``*args`` or keyword-only parameters of its own, else positional-or-keyword.
    Each field's ``metadata["help"]`` is appended to the Args section of the docstring, unless ``fn``'s
    docstring already describes that name (a command-specific wording wins).
    A call binds the arguments to that signature and builds ``options`` with ``RunOptions.from_flags``, so
    every run option is checked (one-line ValueError) before ``fn`` runs, let alone loads a model.

    Args:
        defaults: this command's defaults for some fields (complete: max_seq_len=128).
        fixed: fields the command sets itself, not flags (chat: max_batch_size=1).
        exclude: fields the command has no use for, not flags; they keep RunOptions' defaults.
        leading: names, of fields or of ``fn``'s parameters, that come first, in this order, as
            positional-or-keyword parameters: the Meta scripts' ckpt_dir, tokenizer_path, temperature, ...
    """
    defaults, fixed = dict(defaults or {}), dict(fixed or {})
    fields = RunOptions.names()
    for what, names in (("defaults", defaults), ("fixed", fixed), ("exclude", exclude)):
        unknown = sorted(set(names) - set(fields))
        if unknown:
            raise TypeError(f"run_options_command {what}: {unknown} are not RunOptions fields.")
    if set(fixed) & set(exclude) or set(defaults) & (set(fixed) | set(exclude)):
        raise TypeError("run_options_command: a field is either a flag (defaults), fixed or excluded.")
    flags = [name for name in fields if name not in fixed and name not in exclude]

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        own_signature = inspect.signature(fn)
        own = dict(own_signature.parameters)
        if "options" not in own or own["options"].kind is not _P.KEYWORD_ONLY:
            raise TypeError(f"{fn.__name__} must take a keyword-only parameter `options` (the RunOptions).")
        del own["options"]
        if any(p.kind not in _KINDS for p in own.values()):
            raise TypeError(f"{fn.__name__}: only positional-or-keyword, *args and keyword-only parameters.")
        clash = sorted(set(own) & set(fields))
        if clash:
            raise TypeError(f"{fn.__name__}: {clash} are RunOptions fields; they come in through `options`.")
        missing = [name for name in leading if name not in own and name not in flags]
        if missing:
            raise TypeError(f"{fn.__name__}: leading names {missing} are neither its parameters nor flags.")
        if any(own[name].kind is not _P.POSITIONAL_OR_KEYWORD for name in leading if name in own):
            raise TypeError(f"{fn.__name__}: leading parameters must be positional-or-keyword ones.")

        params = [own[name].replace(kind=_P.POSITIONAL_OR_KEYWORD) if name in own
                  else flag_parameters(RunOptions, [name], kind=_P.POSITIONAL_OR_KEYWORD, defaults=defaults)[0]
                  for name in leading]
        params += [p for name, p in own.items() if name not in leading]
        # One kind for every flag: fire's help picks one-letter shortcuts within each kind, its parser across
        # both, so a mix would show shortcuts that the parser finds ambiguous.
        keyword_only = any(p.kind is not _P.POSITIONAL_OR_KEYWORD for p in own.values())
        params += flag_parameters(RunOptions, [name for name in flags if name not in leading],
                                  kind=_P.KEYWORD_ONLY if keyword_only else _P.POSITIONAL_OR_KEYWORD,
                                  defaults=defaults)
        signature = own_signature.replace(parameters=params)

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> T:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            options = RunOptions.from_flags({**{name: values.pop(name) for name in flags}, **fixed})
            call_args: list[Any] = []
            call_kwargs: dict[str, Any] = {}
            for name, p in own.items():
                if p.kind is _P.VAR_POSITIONAL:
                    call_args.extend(values[name])
                else:
                    call_kwargs[name] = values[name]
            return fn(*call_args, **call_kwargs, options=options)

        command.__signature__ = signature  # type: ignore[attr-defined]
        command.__doc__ = with_flag_help(fn.__doc__ or "", RunOptions, flags)
        return command

    return decorate


def _batches(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


RULE = "\n==================================\n"


def _announce(start: int, batch: Sequence[Any], total: int, what: str) -> None:
    # A CPU run takes seconds to minutes per batch: say what is under way before the first answer comes.
    which = f"{start + 1}" if len(batch) == 1 else f"{start + 1}-{start + len(batch)}"
    print(f"llama_offload: generating {what} {which} of {total}; each is printed as soon as it is finished",
          file=sys.stderr, flush=True)


def run_text_completion(
    llama: Llama, prompts: Sequence[str], *, temperature: float, top_p: float, max_gen_len: Optional[int]
) -> None:
    """Complete ``prompts`` in batches of max_batch_size, printing each prompt with its completion as soon as it
    is finished (numbered, since a short one finishes before a long one), then each batch's stats."""
    for start, batch in _batches(prompts, llama.max_batch_size):
        _announce(start, batch, len(prompts), "completion")

        def show(i: int, result: CompletionPrediction) -> None:
            print(f"[{start + i + 1}/{len(prompts)}] {batch[i]}")
            print(f"> {result['generation']}")
            print(RULE, flush=True)

        llama.text_completion(list(batch), temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                              on_result=show)
        print(llama.last_stats.summary(), flush=True)


def run_chat_completion(
    llama: Llama, dialogs: Sequence[Dialog], *, temperature: float, top_p: float, max_gen_len: Optional[int]
) -> None:
    """Answer ``dialogs`` in batches of max_batch_size, printing each dialog with its answer as soon as it is
    finished (numbered, since a short answer finishes before a long one), then each batch's stats."""
    for start, batch in _batches(dialogs, llama.max_batch_size):
        _announce(start, batch, len(dialogs), "answer")

        def show(i: int, result: ChatPrediction) -> None:
            print(f"[{start + i + 1}/{len(dialogs)}]")
            for msg in batch[i]:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            answer = result["generation"]
            print(f"> {answer['role'].capitalize()}: {answer['content']}")
            print(RULE, flush=True)

        llama.chat_completion(list(batch), temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                              on_result=show)
        print(llama.last_stats.summary(), flush=True)


class FlagError(ValueError):
    """A flag the command does not take: exit status 2, as for any usage error."""


HELP_FLAGS = ("-h", "--help")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fire(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str) -> None:
    argv = sys.argv[1:]
    check_flag_names(component, argv, name)
    with _help_printed_not_paged(asked_for_help=any(a in HELP_FLAGS for a in argv)):
        fire.Fire(_readable_types(component), name=name)


@contextlib.contextmanager
def _help_printed_not_paged(*, asked_for_help: bool) -> Iterator[None]:
    """Help is output like any other, never paged, and help that was asked for goes to stdout.

    fire shows a screen (help, the command list, a usage error's synopsis) through $PAGER when stdin and
    stdout are terminals (``less`` by default, which also leaves SIGINT's handler reset), else writes it
    to the stream it chose: stderr for help. So, for the fire call: $PAGER is a command that writes the screen
    to a file, printed once fire is done (stdout; stderr for a usage error), and SIGINT's handler is put back;
    when help was asked for, stderr is collected, and the screen in it (from its NAME line on) goes to stdout
    while fire's notes ("INFO: Showing help with the command ...") stay on stderr. Everything else a command
    writes is unchanged; help can be read, scrolled, searched or piped as the user's terminal allows."""
    screen = Path(tempfile.gettempdir()) / f"llama_offload-help-{os.getpid()}-{secrets.token_hex(4)}.txt"
    pager = os.environ.get("PAGER")
    os.environ["PAGER"] = f"cat > {shlex.quote(str(screen))}"
    sigint = signal.getsignal(signal.SIGINT)
    collected = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stderr(collected) if asked_for_help else contextlib.nullcontext():
            yield
    except SystemExit as e:
        failed = e.code not in (None, 0)
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if pager is None:
            os.environ.pop("PAGER", None)
        else:
            os.environ["PAGER"] = pager
        if signal.getsignal(signal.SIGINT) != sigint:
            with contextlib.suppress(ValueError, TypeError):  # ValueError: not the main thread
                signal.signal(signal.SIGINT, sigint)
        lines = collected.getvalue().splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if _ANSI.sub("", line).strip() == "NAME"), len(lines))
        sys.stderr.write("".join(lines[:start]))
        sys.stdout.write("".join(lines[start:]))
        if screen.exists():
            text = screen.read_bytes().decode("utf-8", "replace")
            screen.unlink()
            (sys.stderr if failed and not asked_for_help else sys.stdout).write(text)
        sys.stdout.flush()
        sys.stderr.flush()


class _TypeName:
    """A parameter's type as help shows it. fire shows an annotation's ``__qualname__``, or its repr where it has
    none (as this has not), and wraps the type of a flag whose default is None in Optional[...] itself."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _type_name(annotation: Any, default: Any) -> _TypeName:
    text = (annotation if isinstance(annotation, str) else annotation.__qualname__ if isinstance(annotation, type)
            else repr(annotation)).replace("typing.", "")
    if default is None and text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1]  # fire adds it back
    return _TypeName(text)


def _readable_types(component: Any) -> Any:
    """What fire is given: each command as a plain wrapper whose ``__signature__`` has the same parameters with
    their types readable in help (``Optional[int]``; not ``'Optional[int]'``, the string ``from __future__ import
    annotations`` leaves, nor ``Optional[Optional[int]]``)."""
    if isinstance(component, dict):
        return {name: _readable_types(fn) for name, fn in component.items()}
    if not inspect.isroutine(component):
        return component
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):
        return component
    try:
        resolved = inspect.get_annotations(inspect.unwrap(component), eval_str=True)
    except Exception:  # a name only imported for type checkers: show the annotation as written
        resolved = {}
    params = [p if p.annotation is p.empty else
              p.replace(annotation=_type_name(resolved.get(p.name, p.annotation) if isinstance(p.annotation, str)
                                              else p.annotation, p.default))
              for p in signature.parameters.values()]

    @functools.wraps(component)
    def command(*args: Any, **kwargs: Any) -> Any:
        return component(*args, **kwargs)

    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def check_flag_names(component: Callable[..., Any] | dict[str, Callable[..., Any]], argv: Sequence[str],
                     name: str) -> None:
    """Refuse a ``--flag`` the command does not take, before it runs.

    fire calls the command with the flags it could use and complains about the others only afterwards, so
    a misspelt flag would cost a whole model load (or a chat session) before its error. Values are the
    commands' to check; what comes after a bare ``--`` is fire's own (--help, --trace).
    """
    args = list(argv)
    command = name
    if isinstance(component, dict):
        if not args or args[0] not in component:
            return  # fire lists the commands
        command, fn, args = f"{name} {args[0]}", component[args[0]], args[1:]
    else:
        fn = component
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_POSITIONAL]
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--") or arg == "--help":
            continue
        flag = arg[2:].split("=", 1)[0].replace("-", "_")
        if flag in known or (flag.startswith("no") and flag[2:] in known and "=" not in arg):
            continue
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise FlagError(f"--{flag} is not a flag of {command}{hint}; `{command} -- --help` lists them.")


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
        _fire(component, name)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM once cleanup.py's handler is installed
        print(file=sys.stderr)
        print(interrupt_message(e, name), file=sys.stderr)
        sys.exit(interrupt_exit_code(e))
    except USER_ERRORS as e:
        if os.environ.get("LLAMA_OFFLOAD_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{name}: error: {e}", file=sys.stderr)
            if not isinstance(e, FlagError):
                print(f"{name}: (set LLAMA_OFFLOAD_TRACEBACK=1 to see where it came from)", file=sys.stderr)
        sys.exit(2 if isinstance(e, FlagError) else 1)


def _fire_main_model_parallel(component: Callable[..., Any] | dict[str, Callable[..., Any]], name: str) -> None:
    show = bool(os.environ.get("LLAMA_OFFLOAD_TRACEBACK"))
    try:
        _fire(component, name)
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
        parallel.exit_after_error(f"{name}: error: {e}{hint}", show_traceback=show,
                                  **({"code": 2} if isinstance(e, FlagError) else {}))
    except BaseException as e:  # a bug: keep its traceback, and still bring the whole group down
        parallel.exit_after_error(f"{name}: {type(e).__name__}: {e}", show_traceback=True)
    parallel.shutdown()
