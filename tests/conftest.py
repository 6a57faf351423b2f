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

# pytest -n 2 (xdist, the README's test command): each worker computes on one core. Two workers of two OpenMP
# threads each on two cores spin against each other (in-process fine-tunes measured 3-7x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-Slurm tests first: under ``--dist loadscope`` their module goes to a worker at once, and its jobs'
    waits (requeues, scheduling passes) overlap the other worker's tests instead of running on alone at the end."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_slurm.py")
