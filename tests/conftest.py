"""Shared test set-up: offline everything, one cached copy of the built-in models, small real data fixtures."""

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

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dtune.config import DtuneConfig, conf_dir, to_dataclass

REPO = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str] | None = None) -> DtuneConfig:
    """The typed config that `dtune train <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return to_dataclass(compose(config_name="config", overrides=list(overrides or [])))


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A seconds-long QLoRA run on the tiny random Llama, writing into tmp_path."""
    return ["debug=smoke", f"train.output_dir={tmp_path}", "train.precision=fp32", *extra]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from dtune.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
