"""Run Meta-format LLaMA checkpoints that are larger than the GPU by paging blocks from host memory."""
