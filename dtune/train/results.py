"""What a finished training run reports: ``results.json`` and the tracker's final summary."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from dtune.checkpoint import BEST_ADAPTER
from dtune.data.examples import DataStats
from dtune.distributed.engine import Engine
from dtune.flops import FlopCounts, peak_memory_bytes
from dtune.schema import DtuneConfig
from dtune.tracking import NullTracker, Tracker
from dtune.train.best import METRIC_KEYS
from dtune.train.checkpointer import Checkpointer, Stateful
from dtune.train.length import RunLength
from dtune.train.state import TrainState


class FinishedRun(Protocol):
    """What the report reads of a run (:class:`dtune.train.loop.Trainer`)."""

    cfg: DtuneConfig
    output_dir: Path
    engine: Engine
    state: TrainState
    length: RunLength
    parts: Stateful
    flops: FlopCounts
    data_stats: DataStats
    checkpointer: Checkpointer
    held: dict[str, int]
    tracker: Tracker | NullTracker


def run_results(trainer: FinishedRun, after: dict[str, float], stopped_early: bool, train_time: float) -> dict[str, Any]:
    """The run's ``results.json`` (without the adapter's path, which rank 0 adds once it is written).

    ``after``: the final held-out metrics; ``train_time``: seconds of this start's training. ``train_tokens`` is the
    whole run's; ``train_time_s``, ``tokens_per_s`` and ``segment_tokens`` are this start's (since a resume)."""
    state, engine = trainer.state, trainer.engine
    rate = state.segment_tokens / max(train_time, 1e-9)
    results: dict[str, Any] = {
        "before": state.before,
        "after": after,
        "steps": state.step,
        "max_steps": trainer.length.max_steps,
        "epochs": round(trainer.parts.sampler.epochs_done, 6),
        "steps_per_epoch": trainer.length.steps_per_epoch,
        "stopped_early": stopped_early,
        "resumed_from_step": state.resumed_from_step,
        "train_tokens": state.tokens_seen,
        "segment_tokens": state.segment_tokens,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(rate, 1),
        "tokens_per_s_per_device": round(rate / engine.world_size, 1),
        # Over the logged training steps, the fullest rank: CUDA max_memory_allocated, or the process's peak RSS.
        "peak_memory": {"bytes": int(state.peak_memory), "kind": peak_memory_bytes(engine.device)[1]},
        "flop_counts": asdict(trainer.flops),
        "data": asdict(trainer.data_stats),
        "data_sources": trainer.checkpointer.sources,  # what dtune eval compares the files with
        "param_bytes_rank0": trainer.held,
        "wandb": trainer.tracker.info,
    }
    if state.best.step is not None and state.best.metric is not None:
        results["best"] = {"step": state.best.step, "metric": METRIC_KEYS[state.best.metric], "value": state.best.value}
        if trainer.cfg.train.keep_best:
            results["best"]["adapter"] = str(trainer.output_dir / BEST_ADAPTER)
    return results


def final_summary(trainer: FinishedRun, results: dict[str, Any]) -> dict[str, Any]:
    """The tracker's run summary: ``final/<metric>`` of the last evaluation, the step count, the data's figures and
    the best evaluation (``best/step``, ``best/<metric>``)."""
    summary: dict[str, Any] = {f"final/{k}": v for k, v in results["after"].items()}
    summary.update({"final/steps": results["steps"], "final/stopped_early": results["stopped_early"]})
    summary.update(trainer.data_stats.figures())
    if "best" in results:
        summary.update({"best/step": results["best"]["step"], f"best/{results['best']['metric']}": results["best"]["value"]})
    return summary
