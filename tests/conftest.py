"""Test set-up: offline everything, the Triton interpreter without a GPU, and the session fixtures.

Importable helpers live in tests/helpers.py."""

from __future__ import annotations

import hashlib
import os
import sys

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
    # Its CPU comm op (shm_comm) is JIT-built into torch's extensions folder with this venv's paths in its flags: a
    # folder shared with another venv (another checkout, the GPU-kit rehearsal) is rebuilt, 35-140 s on two cores,
    # each time the other one used it last. One folder per venv.
    _venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(f"~/.cache/torch_extensions/dtune-{_venv}"))

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from dtune.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the tiny random model of a family in tests/families.py, built once per session."""
    from tests.families import build_family

    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(f"family-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_tokenizer(family_dir):
    """``family_tokenizer(name)``: the tokenizer (with its family's chat template) of ``family_dir(name)``."""
    from transformers import AutoTokenizer

    return lambda name: AutoTokenizer.from_pretrained(family_dir(name))
