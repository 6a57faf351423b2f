"""The best held-out evaluation so far and the patience count: what ``train.early_stopping`` and ``train.keep_best``
decide on.

The evaluations that count are those of a trained adapter: every ``train.eval_every`` steps and the final one (the
evaluation before training is the base's). The best is the strictly best value of the metric (the earliest on a
tie); patience counts the evaluations in a row that did not beat the best before them by more than ``min_delta``
-- the rule of Keras' ``EarlyStopping`` and Hugging Face's ``EarlyStoppingCallback`` (threshold on the best so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from dtune.schema import EarlyStoppingConfig

METRIC_KEYS = {"loss": "eval/loss", "accuracy": "eval/accuracy"}
"""train.early_stopping.metric -> the evaluation's key."""
HIGHER_IS_BETTER = {"loss": False, "accuracy": True}


@dataclass(frozen=True)
class Best:
    """Immutable: :meth:`after` returns the next value, so it is computed once (on rank 0) and sent to every rank."""

    step: int | None = None
    """Step of the best evaluation so far (None: none yet)."""
    value: float | None = None
    """Its metric value."""
    stale: int = 0
    """Evaluations in a row since the metric last beat the best by more than min_delta."""
    metric: str | None = None
    """The train.early_stopping.metric this was judged by (another one, set on resume, starts afresh)."""

    def after(self, metrics: dict[str, float], step: int, cfg: EarlyStoppingConfig) -> Best:
        """The best and patience count once the evaluation ``metrics`` of ``step`` is taken into account. Raises
        KeyError when ``metrics`` lacks the metric (accuracy without data.choices: refused by the config check)."""
        value = metrics[METRIC_KEYS[cfg.metric]]
        if self.metric != cfg.metric:
            return Best(metric=cfg.metric).after(metrics, step, cfg)
        if not math.isfinite(value):  # a diverged run never improves
            return replace(self, stale=self.stale + 1)
        if self.value is None:
            return Best(step, value, 0, cfg.metric)
        gain = (value - self.value) if HIGHER_IS_BETTER[cfg.metric] else (self.value - value)
        stale = 0 if gain > cfg.min_delta else self.stale + 1
        return Best(step, value, stale, cfg.metric) if gain > 0 else replace(self, stale=stale)

    def exhausted(self, cfg: EarlyStoppingConfig) -> bool:
        """Early stopping is on and its patience has run out."""
        return cfg.enabled and self.stale >= cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value, "stale": self.stale, "metric": self.metric}

    @classmethod
    def from_state(cls, saved: dict[str, Any] | None) -> Best:
        """From :meth:`state_dict` (None: a checkpoint written before dtune tracked the best)."""
        return cls(**saved) if saved else cls()
