"""Stage 2: fine-tune the collaborative tower on labels."""

from finetune.module import CTRModule

__all__ = ["CTRModule"]
