"""Fine-tuning: LoRA adapters, the paged training step, the loss and the data."""
