"""Saving the adapter: PEFT format, written atomically and checked right after it is written.

``save_adapter`` writes into a temporary sibling directory, verifies that the safetensors file holds every LoRA
tensor of the model with the right shapes, and only then renames it over the destination. A crash at any point
leaves the previous adapter (if any) intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from dtune.errors import DtuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _lora_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def verify_adapter(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise DtuneError unless ``path`` holds a loadable PEFT adapter with exactly the expected tensors."""
    from safetensors import safe_open

    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise DtuneError(f"{path}: adapter incomplete (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    json.loads(config.read_text())
    with safe_open(str(weights), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if not found:
        raise DtuneError(f"{weights}: adapter holds no tensors")
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])[:3]
        raise DtuneError(f"{weights}: adapter does not match the model (missing {missing}, wrong shapes {wrong})")


def save_adapter(model: nn.Module, dest: Path) -> Path:
    """Write ``model``'s adapter (a PeftModel) to ``dest`` atomically; return ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = _lora_shapes(model)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
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
