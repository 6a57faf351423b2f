"""Test set-up: offline everything, the Triton interpreter without a GPU, and the session fixtures.

Importable helpers live in tests/helpers.py."""

from __future__ import annotations

import os

# Before any library import: no network, W&B offline, quiet tokenizers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors; it must be on before any
# @triton.jit function is defined. With a GPU they run compiled, on CUDA.
# DeepSpeed picks its accelerator on first import: the CPU one only where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from dtune.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
