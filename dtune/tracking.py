"""Where numbers go: ``metrics.jsonl`` in the output directory, W&B (one run per job, from rank 0), a loss plot.

Ranks other than 0 get a :class:`NullTracker`, so the training loop logs unconditionally.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dtune.config import DtuneConfig, LoggerConfig

log = logging.getLogger(__name__)


def wandb_mode(cfg: LoggerConfig) -> str:
    """``auto`` means online when an API key is configured (env or ~/.netrc), offline otherwise."""
    if not cfg.wandb:
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.path.expanduser("~/.netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Tracker:
    def __init__(self, cfg: DtuneConfig, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.cfg = cfg.logger
        self.history: list[dict[str, Any]] = []
        # Line-buffered, so the file is readable while the run goes on.
        self._metrics = open(output_dir / "metrics.jsonl", "w", buffering=1)  # noqa: SIM115 (closed in finish)
        self.wandb_run = None
        mode = wandb_mode(cfg.logger)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                name=cfg.name,
                mode=mode,
                dir=str(output_dir),
                config=asdict(cfg),
            )
            log.info("wandb: %s run %s in %s", mode, self.wandb_run.id, self.wandb_run.dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.history.append(record)
        self._metrics.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def finish(self) -> None:
        self._metrics.close()
        if self.cfg.plot:
            plot_losses(self.history, self.output_dir / "loss_curve.png")
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NullTracker:
    """What ranks other than 0 log to."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Training and eval loss per step; eval accuracy beside it when the run measured one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in history if "eval/loss" in r]
    accuracy = [(r["step"], 100 * r["eval/accuracy"]) for r in history if "eval/accuracy" in r]
    if not train and not evals:
        return
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(11 if accuracy else 7, 4), dpi=100, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per completion token")
    ax.grid(alpha=0.3)
    ax.legend()
    if accuracy:
        acc = axes[0, 1]
        acc.plot(*zip(*accuracy, strict=True), "o-", color="tab:green")
        acc.set_xlabel("optimizer step")
        acc.set_ylabel("eval accuracy (%)")
        acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
