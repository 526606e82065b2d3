"""Chat completion with a Meta-format chat checkpoint, flags as in Meta's llama repo.

    torchrun --nproc_per_node 1 scripts/example_chat_completion.py \
        --ckpt_dir checkpoints/llama-2-7b-chat/ --tokenizer_path checkpoints/tokenizer.model \
        --max_seq_len 512 --max_batch_size 4
    python scripts/example_chat_completion.py                     # the default model, SmolLM2-135M-Instruct
    python scripts/example_chat_completion.py --dialogs '[[{"role": "user", "content": "Hi!"}]]'

Each dialog is [system], user, assistant, user, ..., user; the model writes the next assistant turn.

Several GPUs (model parallelism): each of N processes holds 1/N of every block on its own GPU and pages it
there; --gpu_memory_gb is then each GPU's budget. N must divide the model's heads (and kv heads).

    torchrun --nproc_per_node 2 scripts/example_chat_completion.py \
        --ckpt_dir checkpoints/llama-2-13b-chat/ --tokenizer_path checkpoints/tokenizer.model \
        --max_seq_len 512 --max_batch_size 4

Only rank 0 prints. If one rank fails, it prints its error (tagged [rank N]) and exits at once, and torchrun
stops the others: the run ends with a non-zero status instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llama_offload.text.chat_format import Dialog
from llama_offload.cli.options import (
    build_llama, check_generation_flags, fire_main, parse_dialogs, run_chat_completion, run_options_command,
    start_model_parallel,
)
from llama_offload.generate.run_options import RunOptions

META_FLAGS = ("ckpt_dir", "tokenizer_path", "temperature", "top_p", "max_seq_len", "max_batch_size", "max_gen_len",
              "dialogs")

EXAMPLE_DIALOGS: list[Dialog] = [
    [{"role": "user", "content": "What should I pack for a weekend of hiking in the hills?"}],
    [
        {"role": "user", "content": "Suggest a name for a grey cat."},
        {"role": "assistant", "content": "How about Pebble? It is short, friendly and suits a grey coat."},
        {"role": "user", "content": "Something more dignified, please."},
    ],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Why does bread go stale?"},
    ],
    [
        {"role": "system", "content": "You are a patient maths tutor. Explain one step at a time."},
        {"role": "user", "content": "How do I add fractions with different denominators?"},
    ],
]

# The example dialogs' answers, most of them a few sentences, end by this length: without a limit one answer that
# runs on would hold the whole batch until max_seq_len. User dialogs keep Meta's default (no limit but the context).
EXAMPLE_MAX_GEN_LEN = 256


# Meta's flags first, in Meta's order, with Meta's defaults; then our run options (offload, dtype, ...).
@run_options_command(defaults=dict(max_seq_len=512, max_batch_size=4), leading=META_FLAGS)
def main(
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    dialogs: Any = None,
    *,
    options: RunOptions,
) -> None:
    """Answer the example dialogs (or --dialogs, a JSON list of dialogs) and print them with the answers.

    Without --ckpt_dir the default model (SmolLM2-135M-Instruct) is used, made on first use.

    Args:
        temperature: 0 means greedy.
        top_p: nucleus sampling threshold.
        max_batch_size: dialogs run together; more are run in several batches.
        max_gen_len: most new tokens per answer (default: until the end of the answer or of max_seq_len; for
            the example dialogs 256).
        dialogs: a JSON list of dialogs, each a list of {"role", "content"} messages, instead of the examples.
        chat_format: overrides the format the checkpoint records: llama2, chatml or llama3.
    """
    start_model_parallel()  # under torchrun --nproc_per_node N > 1: split the model over N GPUs; else nothing
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    chats = EXAMPLE_DIALOGS if dialogs is None else parse_dialogs(dialogs)
    if dialogs is None and max_gen_len is None:
        max_gen_len = EXAMPLE_MAX_GEN_LEN
    generator = build_llama(options, dialogs=chats)
    run_chat_completion(generator, chats, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
