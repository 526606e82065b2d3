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

import sys
from pathlib import Path
from typing import Any, Optional

try:
    import llama_offload  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_offload.chat_format import Dialog
from llama_offload.options import (
    build_llama, check_generation_flags, fire_main, parse_dialogs, run_chat_completion, start_model_parallel,
)

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


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    dialogs: Any = None,
    offload: bool = True,
    num_slices: Optional[int] = None,
    gpu_memory_gb: Optional[float] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    seed: int = 1,
    chat_format: Optional[str] = None,
) -> None:
    """Answer the example dialogs (or --dialogs, a JSON list of dialogs) and print them with the answers.

    Without --ckpt_dir the default model (SmolLM2-135M-Instruct) is used, made on first use.
    --chat_format llama2|chatml overrides the format the checkpoint records.
    """
    start_model_parallel()  # under torchrun --nproc_per_node N > 1: split the model over N GPUs; else nothing
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size, max_gen_len=max_gen_len,
                                                num_slices=num_slices, gpu_memory_gb=gpu_memory_gb)
    chats = EXAMPLE_DIALOGS if dialogs is None else parse_dialogs(dialogs)
    generator = build_llama(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            offload=offload, num_slices=num_slices, gpu_memory_gb=gpu_memory_gb, device=device,
                            dtype=dtype, seed=seed, chat_format=chat_format)
    run_chat_completion(generator, chats, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
