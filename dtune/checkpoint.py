"""Adapters and training checkpoints, written atomically.

``save_adapter`` writes into a temporary sibling directory, verifies that the safetensors file holds every LoRA
tensor of the model with the right shapes, and only then renames it over the destination. A crash at any point
leaves the previous adapter (if any) intact.

A checkpoint (``<output_dir>/checkpoints/step-00000120/``) holds everything a run needs to go on as if it had
never stopped::

    adapter/              the adapter so far, PEFT format (fp32 master values), loadable on its own
    best_adapter/         with train.keep_best: a copy of <output_dir>/best_adapter as of this step (the best
                          evaluation so far), put back when the run resumes
    optimizer.pt          optimizer states and fp32 parameters as full tensors keyed by parameter name, and the
                          optimizer's step count: independent of the strategy and world size that wrote them
    rng.pt                every rank's random generators (python, torch, CUDA)
    config.yaml           the resolved config of the run that wrote it
    trainer_state.json    step, data-sampler position, LR schedule, loss scaler, tokens seen, W&B run id, the
                          evaluation before training, the best evaluation and patience count; written last

It is assembled in a hidden temporary directory and renamed into place, so a checkpoint directory either is
complete or does not exist; a writer killed half-way leaves only a ``.step-*.tmp-*`` directory, which resuming
ignores and the next save removes. The newest ``train.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.data.render import prompt_format
from dtune.errors import DtuneError
from dtune.fsutil import atomic_write_text, recover, staged_dir
from dtune.schema import DtuneConfig

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
CONFIG = "config.yaml"
PROMPT_FORMAT = "prompt_format.json"
BEST_ADAPTER = "best_adapter"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def adapter_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` under their module names: what PEFT's save_pretrained takes as
    ``state_dict``, once the engine has made them full CPU tensors (``Engine.optimizer_state``)."""
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


def save_adapter(
    model: nn.Module,
    dest: Path,
    state: dict[str, torch.Tensor] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the adapter of ``model`` (a PeftModel) to ``dest`` atomically; return ``dest``.

    ``state``: full CPU tensors of :func:`adapter_state` (required when parameters are sharded). ``extra``: writes
    more files into the folder before it is published (the tokenizer and prompt format of a run's final adapter).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu() for k, v in adapter_state(model).items()} if state is None else state
    # The base's embeddings are frozen and never resized: not saved. (PEFT's "auto" would look the recorded base -- a
    # Hub id or built-in name -- up on the Hub at every save to compare vocabulary sizes.)
    expected = {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False).items()
    }
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True, save_embedding_layers=False)
        if extra is not None:
            extra(tmp)
        verify_adapter(tmp, expected)
    return dest


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder) as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` points at, or None to start from scratch.

    ``auto``: the newest complete checkpoint in this run's output dir, if any. A path: that checkpoint, or the newest
    one of that run dir -- unless this run's output dir holds checkpoints already (it was started from the path
    and then stopped), which come first. null: start fresh, but refuse to when this output dir already holds
    checkpoints (a fresh run would mix its checkpoints and metrics with theirs).
    """
    if (output_dir / CHECKPOINTS).is_dir():
        recover(output_dir / CHECKPOINTS)
    here = checkpoints(output_dir / CHECKPOINTS)
    if resume is None or resume in ("none", "never", "false"):
        if here:
            raise DtuneError(
                f"train.resume: null, but {output_dir / CHECKPOINTS} holds checkpoints (newest: step {here[-1][0]}); "
                "resume with train.resume=auto or write to another train.output_dir"
            )
        return None
    if here:
        # A run's own checkpoints come first, also when train.resume names another run's: a requeued or restarted
        # job goes on from where it got to, not from where it began.
        if resume != "auto":
            log.info("train.resume=%s: %s holds newer checkpoints of this run; resuming from those", resume, output_dir)
        return here[-1][1]
    if resume == "auto":
        return None
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    found = checkpoints(path / CHECKPOINTS) or checkpoints(path)
    if not found:
        raise DtuneError(f"train.resume: {path} is neither a checkpoint nor a run directory holding complete checkpoints")
    return found[-1][1]


def save_checkpoint(
    root: Path,
    step: int,
    *,
    peft_model: nn.Module,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    best_adapter: Path | None = None,
) -> Path:
    """Write a checkpoint for ``step`` atomically under ``root``; keep the newest ``keep``. Rank 0 only.

    ``best_adapter``: an adapter folder (the run's best so far) copied in as ``best_adapter/``."""
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    for stale in root.glob(".step-*.tmp-*"):  # a killed writer's (the run holds its output dir's lock)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    # The same step saved again (a finished run resumed) replaces it.
    with staged_dir(final) as tmp:
        save_adapter(peft_model, tmp / "adapter", adapter)
        if best_adapter is not None:
            shutil.copytree(best_adapter, tmp / BEST_ADAPTER)
        torch.save(optimizer, tmp / OPTIMIZER)
        torch.save(rng, tmp / RNG)
        (tmp / CONFIG).write_text(config_yaml)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    for _, old in checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything :func:`save_checkpoint` wrote, tensors on the CPU. Only tensors and plain data are unpickled."""
    try:
        return {
            "trainer_state": json.loads((path / TRAINER_STATE).read_text()),
            "optimizer": torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True),
            "rng": torch.load(path / RNG, map_location="cpu", weights_only=True),
            "config": (path / CONFIG).read_text(),
        }
    except (OSError, ValueError, RuntimeError) as err:
        raise DtuneError(f"{path}: cannot read checkpoint ({err})") from err


# Settings a checkpoint's training state depends on: resuming under other values would silently train another model.
MUST_MATCH = (
    "model",
    "lora",
    "quant.quant_type",
    "quant.double_quant",
    "quant.experts",
    "data",
    "train.seed",
    "optim.loraplus_lr_ratio",
)
IGNORED = ("data.cache", "data.num_proc")  # how the data is made, not what it is


def check_resumable(saved_yaml: str, cfg: Any, path: Path) -> list[str]:
    """Raise DtuneError naming each setting that must match the checkpoint and does not; return the names of other
    settings that changed (optimizer, max_steps, precision, engine...), which a resumed run may change."""
    from omegaconf import OmegaConf

    # Over the schema's defaults: a checkpoint of an older dtune lacks the fields added since (their defaults held).
    saved = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(DtuneConfig), OmegaConf.create(saved_yaml)), resolve=True)
    now = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for key, value in tree.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: tree}

    old, new = flat(saved), flat(now)
    for settings in (old, new):  # a fraction beside a held-out file went unused (refused since): no difference
        if settings.get("data.eval_source") is not None:
            settings["data.eval_fraction"] = None
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(IGNORED))
    fatal = [k for k in changed if k.startswith(MUST_MATCH)]
    if fatal:
        detail = "; ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in fatal[:5])
        raise DtuneError(
            f"train.resume: {path} was trained with other settings ({detail}); "
            "resume with the same model, lora, quant, data, seed and LoRA+ ratio (the optimizer's parameter groups), or start "
            "fresh in another train.output_dir"
        )
    return changed


def export_prompt_format(cfg: DtuneConfig, tokenizer: Any, folder: Path) -> None:
    """The tokenizer with the chat template training rendered with, and how prompts were rendered
    (``prompt_format.json``: :func:`~dtune.data.render.prompt_format`), into ``folder`` (beside an adapter)."""
    tokenizer.save_pretrained(folder)
    atomic_write_text(folder / PROMPT_FORMAT, json.dumps(prompt_format(cfg, tokenizer), indent=2) + "\n")
