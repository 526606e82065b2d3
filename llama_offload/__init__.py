"""Run Meta-format LLaMA checkpoints that are larger than the GPU by paging blocks from host memory."""

from .args import ModelArgs
from .chat_format import Dialog, Message
from .generation import Llama

__all__ = ["Dialog", "Llama", "Message", "ModelArgs"]
