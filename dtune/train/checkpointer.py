"""The run's checkpoints: when to write one (cadence), the collective write, and putting a run back.

Gathering the strategy-independent state is collective (every rank calls :meth:`Checkpointer.save`); rank 0 writes
the files (:mod:`dtune.checkpoint`, atomic) and the others wait at a barrier, so no rank goes on before the
checkpoint exists.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.checkpoint import (
    BEST_ADAPTER,
    CHECKPOINTS,
    check_resumable,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dtune.data.batching import StepSampler
from dtune.data.load import check_sources, source_stats
from dtune.data.stream import StreamSampler
from dtune.distributed.engine import Engine
from dtune.distributed.full_state import FullState
from dtune.fsutil import staged_dir
from dtune.schema import DtuneConfig
from dtune.train.best import Best
from dtune.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Stateful:
    """What a checkpoint saves and restores besides :class:`TrainState`."""

    model: nn.Module
    """The prepared (wrapped, maybe sharded) loss model; the PeftModel is its ``.model``."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: StepSampler | StreamSampler


class Checkpointer:
    def __init__(self, cfg: DtuneConfig, output_dir: Path, engine: Engine, config_yaml: str) -> None:
        self.cfg, self.output_dir, self.engine, self.config_yaml = cfg, output_dir, engine, config_yaml
        self.full = FullState(engine)
        self.every = cfg.train.checkpoint_every
        self.best_dir = output_dir / BEST_ADAPTER
        # The data files as the run starts reading them (rank 0 saves them; a streamed corpus is not hashed: too big)
        self.sources = source_stats(cfg.data, digest=engine.is_main and not cfg.data.streaming)

    def load(self) -> tuple[dict[str, Any], Path] | None:
        """The checkpoint ``train.resume`` asks for (chosen on rank 0, so that every rank loads the same one whatever
        its view of a shared filesystem), loaded on every rank; None to start fresh. Logs changed settings."""
        path = self.engine.on_main(lambda: find_resume_checkpoint(self.cfg.train.resume, self.output_dir))
        if path is None:
            return None
        saved = load_checkpoint(path)
        changed = check_resumable(saved["config"], self.cfg, path)
        remedy = f"put the file back as it was, or go on from this adapter (train.init_adapter={path / 'adapter'}) on the "
        remedy += "new data in another train.output_dir"
        recorded = saved["trainer_state"].get("data_sources", {})
        # On rank 0, raised on every rank: a rank that alone refused would leave the others waiting at a collective.
        self.engine.on_main(lambda: check_sources(recorded, self.sources, f"resuming from {path}", remedy))
        log.info("resuming from %s (step %d)", path, saved["trainer_state"]["step"])
        if changed:
            log.warning("resume: settings changed since the checkpoint: %s", ", ".join(changed))
        return saved, path

    def restore(self, saved: dict[str, Any], path: Path, parts: Stateful) -> TrainState:
        """Put a loaded checkpoint's optimizer, schedule, sampler position, loss scaler and random streams back."""
        state = saved["trainer_state"]
        self.full.load_optimizer_state(parts.model, parts.optimizer, saved["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(parts.scheduler.optimizer.param_groups, parts.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the schedule's state is restored, but the optimizer only hears of it at the next step
        parts.sampler.load_state_dict(state["sampler"])
        self.full.load_scaler_state(parts.optimizer, state.get("scaler"))
        rng = saved["rng"]
        if len(rng) != self.engine.world_size:
            log.warning(
                "resume: checkpoint written by %d ranks, resumed on %d: random streams are not continued",
                len(rng),
                self.engine.world_size,
            )
        self.full.set_rng_state(rng[self.engine.rank % len(rng)])
        same_run = path.parent.parent.resolve() == self.output_dir.resolve()
        resumed = TrainState.resumed(state, same_run)
        if self.cfg.train.keep_best:
            resumed.best = self.engine.on_main(lambda: self.restore_best_adapter(path, resumed.best))
        return resumed

    def restore_best_adapter(self, path: Path, best: Best) -> Best:
        """Put the checkpoint's ``best_adapter/`` back as the run's (rank 0): the folder in the output dir may be
        another run's, or hold a later best of the steps after the checkpoint, which are trained again now. Returns
        the best to go on with: forgotten (tracking starts afresh) when the checkpoint kept no best adapter."""
        saved = path / BEST_ADAPTER
        if saved.is_dir():
            with staged_dir(self.best_dir) as tmp:
                shutil.copytree(saved, tmp, dirs_exist_ok=True)
            return best
        if best.step is not None:
            log.warning(
                "resume: %s has no %s (train.keep_best was off): the best evaluation so far (step %d) is forgotten",
                path,
                BEST_ADAPTER,
                best.step,
            )
        return Best()

    def due(self, step: int) -> bool:
        """An interval checkpoint after ``step`` (the loop asks only when another step follows: the last step's
        checkpoint is the end of the run's)."""
        return bool(self.every) and step % self.every == 0

    def adapter(self, parts: Stateful) -> dict[str, torch.Tensor] | None:
        """The adapter's full fp32 tensors by PEFT name on rank 0 (None elsewhere): gathered as a checkpoint gathers
        them. Collective."""
        params = self.full.params(parts.model)
        return self._adapter_names(params) if self.engine.is_main else None

    @staticmethod
    def _adapter_names(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The loss wrapper holds the PeftModel as `.model`: the adapter's names are the parameters' names below it.
        return {name.removeprefix("model."): value for name, value in params.items()}

    def save(self, state: TrainState, parts: Stateful, reason: str) -> dict[str, torch.Tensor] | None:
        """Write the checkpoint of ``state.step``. Collective. Returns the adapter's full tensors on rank 0 (None
        elsewhere)."""
        t0 = time.perf_counter()
        opt_state = self.full.optimizer_state(parts.model, parts.optimizer)
        rng = self.engine.gather_objects(self.full.rng_state())
        sampler = parts.sampler.state_dict()  # on every rank: collective for a stream (each rank's own position)
        adapter = None
        if self.engine.is_main:
            adapter = self._adapter_names({name: entry["param"] for name, entry in opt_state["params"].items()})
            trainer_state = {
                **state.state_dict(),
                "reason": reason,
                "sampler": sampler,
                "scheduler": parts.scheduler.state_dict(),
                "scaler": self.full.scaler_state(parts.optimizer),
                "world_size": self.engine.world_size,
                "data_sources": self.sources,
                "wandb_id": state.wandb_id,
                "time": time.time(),
            }
            path = save_checkpoint(
                self.output_dir / CHECKPOINTS,
                state.step,
                peft_model=self.engine.unwrap(parts.model).model,
                adapter=adapter,
                optimizer=opt_state,
                rng=rng,
                trainer_state=trainer_state,
                config_yaml=self.config_yaml,
                keep=self.cfg.train.keep_checkpoints,
                best_adapter=self.best_dir if self.cfg.train.keep_best and state.best.step is not None else None,
            )
            log.info("checkpoint (%s) written to %s in %.1f s", reason, path, time.perf_counter() - t0)
        self.engine.barrier()
        return adapter
