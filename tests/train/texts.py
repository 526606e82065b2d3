"""The sentence the fine-tuning tests learn."""

TEXT = "The lighthouse keeper counts the ships every night and writes their names in a blue book."
