"""dtune: QLoRA fine-tuning on multi-GPU clusters."""

__version__ = "0.1.0"
