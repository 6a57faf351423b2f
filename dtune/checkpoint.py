"""Saving the adapter: PEFT format, written atomically and checked right after it is written.

``save_adapter`` writes into a temporary sibling directory, verifies that the safetensors file holds every LoRA
tensor of the model with the right shapes, and only then renames it over the destination. A crash at any point
leaves the previous adapter (if any) intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dtune.errors import DtuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` under their module names: what PEFT's save_pretrained takes as
    ``state_dict``, once the engine has made them full CPU tensors (``Engine.full_state``)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def verify_adapter(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise DtuneError unless ``path`` holds a loadable PEFT adapter with exactly the expected tensors."""
    from safetensors import safe_open

    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise DtuneError(f"{path}: adapter incomplete (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    json.loads(config.read_text())
    with safe_open(str(weights), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if not found or any(math.prod(shape) == 0 for shape in found.values()):
        raise DtuneError(f"{weights}: adapter holds no tensors, or empty ones (parameters saved while partitioned?)")
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])[:3]
        raise DtuneError(f"{weights}: adapter does not match the model (missing {missing}, wrong shapes {wrong})")


def save_adapter(model: nn.Module, dest: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` (a PeftModel) to ``dest`` atomically; return ``dest``.

    ``state``: full CPU tensors of :func:`adapter_state` (required when parameters are sharded).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu() for k, v in adapter_state(model).items()} if state is None else state
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, state_dict=state).items()}
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        verify_adapter(tmp, expected)
        old = None
        if dest.exists():
            old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
