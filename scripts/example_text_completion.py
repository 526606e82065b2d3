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

import sys
from pathlib import Path
from typing import Any, Optional

try:
    import llama_offload  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_offload.options import (
    build_llama, check_generation_flags, fire_main, parse_prompts, run_text_completion, start_model_parallel,
)

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


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = 64,
    prompts: Any = None,
    offload: bool = True,
    num_slices: Optional[int] = None,
    gpu_memory_gb: Optional[float] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    seed: int = 1,
) -> None:
    """Complete the example prompts (or --prompts, a JSON list of strings) and print the results.

    Without --ckpt_dir the default model (SmolLM2-135M-Instruct) is used, made on first use.
    """
    start_model_parallel()  # under torchrun --nproc_per_node N > 1: split the model over N GPUs; else nothing
    temperature, top_p = check_generation_flags(temperature=temperature, top_p=top_p, max_seq_len=max_seq_len,
                                                max_batch_size=max_batch_size, max_gen_len=max_gen_len,
                                                num_slices=num_slices, gpu_memory_gb=gpu_memory_gb)
    texts = EXAMPLE_PROMPTS if prompts is None else parse_prompts(prompts)
    generator = build_llama(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            offload=offload, num_slices=num_slices, gpu_memory_gb=gpu_memory_gb, device=device,
                            dtype=dtype, seed=seed)
    run_text_completion(generator, texts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)


if __name__ == "__main__":
    fire_main(main, name=Path(__file__).name)
