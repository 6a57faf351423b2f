"""What a run carries from one optimizer step to the next, beside the model, optimizer, schedule and data order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtune.train.best import Best


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Real (non-padding) tokens trained on, all ranks, since the run began (resumes included)."""
    segment_tokens: int = 0
    """Real tokens trained on since this process started or resumed (for the throughput of this segment)."""
    before: dict[str, float] | None = None
    """The held-out evaluation before training (kept across resumes: the table at the end compares with it)."""
    resumed_from_step: int | None = None
    """The checkpoint step this process went on from; None for a fresh run."""
    wandb_id: str | None = None
    """The W&B run to continue (the same run resumed: its id; another run's checkpoint: None, a new W&B run)."""
    peak_memory: float = 0.0
    """Peak memory of the training steps so far, bytes, the fullest rank."""
    best: Best = field(default_factory=Best)
    """The best evaluation so far and the patience count (train.early_stopping, train.keep_best)."""
    last_eval: dict[str, Any] | None = None
    """The latest evaluation of a trained adapter: {"step": N, "metrics": {...}} (the final evaluation of a run that
    stopped right after one reuses it)."""

    def state_dict(self) -> dict[str, Any]:
        """The fields a checkpoint keeps (trainer_state.json)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "before": self.before,
            "best": self.best.state_dict(),
            "last_eval": self.last_eval,
        }

    @classmethod
    def resumed(cls, saved: dict[str, Any], same_run: bool) -> TrainState:
        """The state a checkpoint's trainer_state describes; ``same_run``: the checkpoint is this output dir's own."""
        return cls(
            step=saved["step"],
            tokens_seen=saved["tokens_seen"],
            before=saved["before"],
            resumed_from_step=saved["step"],
            wandb_id=saved.get("wandb_id") if same_run else None,
            best=Best.from_state(saved.get("best")),
            last_eval=saved.get("last_eval"),
        )
