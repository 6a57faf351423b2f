"""How long a run trains: ``train.max_steps`` optimizer steps, or ``train.epochs`` passes over the training samples
as the :class:`~dtune.data.batching.StepSampler` draws them (full steps of micro_batch_size x grad_accum_steps x
ranks samples; packed rows with ``data.packing``; the ragged tail of each pass dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dtune.errors import ConfigError
from dtune.schema import DEFAULT_EPOCHS, DtuneConfig


@dataclass(frozen=True)
class RunLength:
    max_steps: int
    """Optimizer steps the run trains (unless it stops early)."""
    steps_per_epoch: int | None
    """Optimizer steps in one pass over the training samples; None for a stream (data.streaming: not known)."""
    source: str
    """Which setting decided: train.max_steps, train.epochs, or the default."""

    @property
    def epochs(self) -> float | None:
        """``max_steps`` in passes over the training samples (None for a stream)."""
        return None if self.steps_per_epoch is None else self.max_steps / self.steps_per_epoch

    @classmethod
    def of(cls, cfg: DtuneConfig, steps_per_epoch: int | None) -> RunLength:
        """The run length ``cfg`` asks for, given the sampler's ``steps_per_epoch`` (>= 1; None for a stream, whose
        length must be train.max_steps).

        ``train.epochs``: ceil(epochs x steps_per_epoch) steps, so a fractional pass is trained up to its last
        started step. Raises ConfigError when the derived length is shorter than ``optim.warmup_steps`` (the check
        :func:`dtune.config.validate` makes for a given max_steps).
        """
        train = cfg.train
        if steps_per_epoch is None and train.max_steps is None:
            raise ConfigError("train.max_steps: data.streaming needs it (a stream's length is not known in advance)")
        if train.max_steps is not None:
            length = cls(train.max_steps, steps_per_epoch, f"train.max_steps={train.max_steps}")
        else:
            epochs = train.epochs if train.epochs is not None else DEFAULT_EPOCHS
            # Rounded to 9 places first: 0.3 x 10 is 3.0000000000000004 in floats, and means 3 steps.
            steps = max(1, math.ceil(round(epochs * steps_per_epoch, 9)))
            source = f"train.epochs={epochs:g}" if train.epochs is not None else f"train.epochs (default {DEFAULT_EPOCHS:g})"
            length = cls(steps, steps_per_epoch, source)
        if cfg.optim.warmup_steps > length.max_steps:
            raise ConfigError(
                f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds the {length.max_steps} steps of {length.source}"
            )
        return length

    def describe(self, samples: int | None, per_step: int) -> str:
        """``train.epochs=1.5: 12 optimizer steps = 1.5 epochs of 8 steps (32 samples, 4 per step)``; for a stream
        (``samples`` None) ``train.max_steps=100: 100 optimizer steps of 16 streamed samples``."""
        if samples is None or self.epochs is None:
            return f"{self.source}: {self.max_steps} optimizer steps of {per_step} streamed samples"
        return (
            f"{self.source}: {self.max_steps} optimizer steps = {self.epochs:.4g} epochs of {self.steps_per_epoch} steps "
            f"({samples} training samples, {per_step} per step"
            + (f", {samples % per_step} left out of each epoch)" if samples % per_step else ")")
        )
