"""Text completion with a Meta-format checkpoint, flags as in Meta's llama repo.

    torchrun --nproc_per_node 1 scripts/example_text_completion.py \
        --ckpt_dir checkpoints/llama-2-7b/ --tokenizer_path checkpoints/tokenizer.model \
        --max_seq_len 128 --max_batch_size 4
    python scripts/example_text_completion.py                     # the default model, SmolLM2-135M-Instruct
    python scripts/example_text_completion.py --prompts '["Once upon a time"]' --temperature 0

Pretrained (not chat) models continue text: each prompt is written so that its natural continuation
is the answer.

Several GPUs (model parallelism): each of N processes holds 1/N of every block on its own GPU and pages it
there; --gpu_memory_gb is then each GPU's budget. N must divide the model's heads (and kv heads).

    torchrun --nproc_per_node 2 scripts/example_text_completion.py \
        --ckpt_dir checkpoints/llama-2-13b/ --tokenizer_path checkpoints/tokenizer.model \
        --max_seq_len 128 --max_batch_size 4

Only rank 0 prints. If one rank fails, it prints its error (tagged [rank N]) and exits at once, and torchrun
stops the others: the run ends with a non-zero status instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llama_offload.cli.options import (
    build_llama, check_generation_flags, fire_main, parse_prompts, run_options_command, run_text_completion,
    start_model_parallel,
)
from llama_offload.generate.run_options import RunOptions

META_FLAGS = ("ckpt_dir", "tokenizer_path", "temperature", "top_p", "max_seq_len", "max_batch_size", "max_gen_len",
              "prompts")

EXAMPLE_PROMPTS: list[str] = [
    # Plain continuation
    "The best way to learn a new language is",
    "Put simply, a lighthouse keeps ships safe by ",
    # Few-shot: the pattern tells the model what to produce
    """Turn each word into its plural:

cat => cats
mouse => mice
leaf => leaves
child =>""",
    # A frame to fill in
    """A short note thanking a neighbour for watering the plants:

Hi Sam,

""",
]


# Meta's flags first, in Meta's order, with Meta's defaults; then our run options (offload, dtype, ...).
@run_options_command(defaults=dict(max_seq_len=128, max_batch_size=4), leading=META_FLAGS)
def main(
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = 64,
    prompts: Any = None,
    *,
    options: RunOptions,
) -> None:
    """Complete the example prompts (or --prompts, a JSON list of strings) and print the results.

    Without --ckpt_dir the default model (SmolLM2-135M-Instruct) is used, made on first use.

    Args:
        temperature: 0 means greedy.
        top_p: nucleus sampling threshold.
        max_batch_size: prompts run together; more are run in several batches.
        max_gen_len: most new tokens per prompt.
        prompts: a JSON list of strings to complete instead of the example prompts.
    """
    start_model_parallel()  # under torchrun --nproc_per_node N > 1: split the model over N GPUs; else nothing
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    texts = EXAMPLE_PROMPTS if prompts is None else parse_prompts(prompts)
    generator = build_llama(options, prompts=texts)
    run_text_completion(generator, texts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
