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

from dtune.fsutil import atomic_write_text
from dtune.schema import DtuneConfig, LoggerConfig
from dtune.sweep import sweep_job

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
    """Rank 0's recorder. ``resume_step``: the run goes on from a checkpoint of that step -- metrics.jsonl keeps its
    records up to that step and grows from there, and ``run_id`` (the W&B run of the checkpoint) is continued."""

    def __init__(self, cfg: DtuneConfig, output_dir: Path, resume_step: int | None = None, run_id: str | None = None) -> None:
        self.output_dir = output_dir
        self.cfg = cfg.logger
        path = output_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            # Steps after the checkpoint were logged by the run that stopped; they are run again now.
            self.history = [r for r in _read_jsonl(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
        # Line-buffered, so the file is readable while the run goes on.
        self._metrics = open(path, "a" if resume_step is not None else "w", buffering=1)  # noqa: SIM115 (closed in finish)
        self.wandb_run = None
        mode = self._mode = wandb_mode(cfg.logger)
        if mode != "disabled":
            import wandb

            sweep = sweep_job()
            config = asdict(cfg)
            if sweep:
                config["overrides"] = sweep["overrides"]
            self.wandb_run = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                # Runs of one sweep share a group (the sweep dir) and carry their overrides in their name.
                group=cfg.logger.group or (sweep["group"] if sweep else None),
                tags=list(cfg.logger.tags),
                name=f"{cfg.name}[{sweep['name']}]" if sweep and sweep["name"] else cfg.name,
                mode=mode,
                dir=str(output_dir),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
            )
            log.info("wandb: %s run %s in %s%s", mode, self.wandb_run.id, self.wandb_run.dir, " (resumed)" if run_id else "")

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def info(self) -> dict[str, Any] | None:
        """The W&B run's id, name, group and mode (for results.json), or None without W&B."""
        if self.wandb_run is None:
            return None
        return {"id": self.wandb_run.id, "name": self.wandb_run.name, "group": self.wandb_run.group, "mode": self._mode}

    def preempted(self) -> None:
        """Tell W&B the run stops to be resumed (shown as preempted rather than failed or finished)."""
        if self.wandb_run is not None:
            self.wandb_run.mark_preempting()

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

    run_id = None
    info = None

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def preempted(self) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the kill that stopped the run
            continue
    return records


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
