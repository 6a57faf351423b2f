"""Hydra sweeps (``dtune train --multirun ...``): W&B grouping of a sweep's runs, the objective a run returns to the
sweeper, and the summary table at the sweep's end.

Each run of a sweep logs to W&B in one group (the sweep directory), named by its overrides, with the overrides in
its config. Each run returns :func:`objective` of its results (what an Optuna sweep minimises). When the sweep ends,
:class:`SweepSummary` (a Hydra callback, listed in conf/config.yaml) reads every run's results.json and writes
``summary.md`` and ``summary.json`` into the sweep directory, ranked by the same objective, best first; runs without
results (failed, or still waiting to be requeued) are listed after them. After an Optuna sweep the summary also
names the best trial the sweeper recorded (its ``optimization_results.yaml``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def sweep_job() -> dict[str, Any] | None:
    """For a run inside a Hydra multirun: its sweep's group name, its own name and overrides. None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return {
        "group": str(hydra_cfg.sweep.dir),
        "name": hydra_cfg.job.override_dirname,
        "overrides": list(hydra_cfg.overrides.task),
    }


def best_loss(best: Any) -> float | None:
    """The held-out loss of the best evaluation a run kept (results.json ``best``: ``{"metric": "eval/loss",
    "value": ...}``, written when train.keep_best or early stopping judged by loss); None otherwise."""
    if not isinstance(best, Mapping):
        return None
    if best.get("metric") == "eval/loss":
        return best.get("value")
    return best.get("eval_loss", best.get("eval/loss"))


def objective(results: Mapping[str, Any]) -> float | None:
    """The number a sweep minimises, from a run's results (results.json, or what :func:`dtune.train.run` returned):
    the held-out loss of the best evaluation the run kept (:func:`best_loss`), else the final
    one (``after["eval/loss"]``). None when the results hold neither; +inf when the loss is not finite (a run that
    diverged is the worst trial, not an error: Optuna refuses NaN)."""
    loss = best_loss(results.get("best"))
    if not isinstance(loss, (int, float)):
        after = results.get("after")
        loss = after.get("eval/loss") if isinstance(after, Mapping) else None
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        return None
    return float(loss) if math.isfinite(loss) else math.inf


def run_objective(output_dir: Path, results: Mapping[str, Any]) -> float | None:
    """:func:`objective` of the run in ``output_dir``: from its results.json (the file the summary ranks by) where
    this process can read it, else from ``results`` (ranks other than 0 do not write the file)."""
    path = output_dir / "results.json"
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("sweep objective from the returned results: %s unreadable (%s)", path, err)
    return objective(results)


def _overrides(job_dir: Path) -> list[str]:
    """The job's overrides: ``.hydra/overrides.yaml``, or the newest start's (``.hydra/<start>/``, see
    :func:`dtune.config.hydra_subdir`)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        starts = list((job_dir / ".hydra").rglob("overrides.yaml"))
        if not starts:
            return []
        path = max(starts, key=lambda p: p.stat().st_mtime)
    return [str(o) for o in OmegaConf.load(path)]


OUTPUT_POINTER = "output_dir.txt"
"""In a job's Hydra folder whose run wrote its outputs elsewhere (``train.output_dir``): that folder's path."""


def point_to_outputs(job_dir: Path, output_dir: Path) -> None:
    """Leave in ``job_dir`` (Hydra's folder of the job) where the run's outputs go when that is elsewhere, for
    :func:`summarize` (a sweep whose runs each set ``train.output_dir``). The first rank of the job writes it."""
    if output_dir.resolve() != job_dir.resolve() and os.environ.get("RANK", "0") == "0":
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / OUTPUT_POINTER).write_text(f"{output_dir.resolve()}\n")


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run directory of the sweep (those holding .hydra/), best eval loss first; a run's results and
    checkpoints are read where it wrote them (its folder, or the ``train.output_dir`` it points to)."""
    rows = []
    for job_dir in sorted(p.parent for p in sweep_dir.glob("*/.hydra")):
        row: dict[str, Any] = {"run": job_dir.name, "overrides": " ".join(_overrides(job_dir))}
        pointer = job_dir / OUTPUT_POINTER
        out = Path(pointer.read_text().strip()) if pointer.is_file() else job_dir
        results = out / "results.json"
        if results.is_file():
            data = json.loads(results.read_text())
            after, before = data.get("after", {}), data.get("before", {})
            row.update(
                status="done",
                objective=objective(data),
                eval_loss=after.get("eval/loss"),
                best_eval_loss=best_loss(data.get("best")),
                eval_loss_before=before.get("eval/loss"),
                eval_accuracy=after.get("eval/accuracy"),
                steps=data.get("steps"),
                tokens_per_s=data.get("tokens_per_s"),
            )
        else:
            newest = sorted((out / "checkpoints").glob("step-*"))
            row["status"] = f"stopped at {newest[-1].name}" if newest else "failed"
        rows.append(row)

    # What the sweep varied, per run; the overrides all runs share go in the table's heading.
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    for row in rows:
        row["swept"] = " ".join(o for o in row["overrides"].split() if o not in common)

    def key(row: dict[str, Any]) -> tuple[int, float]:
        loss = row.get("objective")
        return (0, loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else (1, math.inf)

    return sorted(rows, key=key)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summarize`'s rows."""
    show_acc = any(r.get("eval_accuracy") is not None for r in rows)
    show_best = any(r.get("best_eval_loss") is not None for r in rows)
    header = ["rank", "run", "swept", "eval loss", "before"] + (["best kept"] if show_best else [])
    header += (["accuracy"] if show_acc else []) + ["tokens/s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows, 1):

        def num(key: str, fmt: str, row: dict[str, Any] = r) -> str:
            value = row.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else "-"

        swept = r.get("swept", r["overrides"])
        cells = [
            str(i),
            r["run"],
            f"`{swept}`" if swept else "",
            num("eval_loss", ".4f"),
            num("eval_loss_before", ".4f"),
        ]
        if show_best:
            cells.append(num("best_eval_loss", ".4f"))
        if show_acc:
            cells.append(num("eval_accuracy", ".1%"))
        cells += [num("tokens_per_s", ",.0f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def optuna_best(sweep_dir: Path) -> str:
    """A line naming the best trial an Optuna sweep recorded (``optimization_results.yaml``, written by
    hydra-optuna-sweeper before the summary), and whether it is the summary's rank 1; empty for other sweeps."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return ""
    found = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(found, dict) or "best_params" not in found:
        return f"Optuna's results: `{path.name}`.\n\n"
    params = " ".join(f"{k}={v}" for k, v in found["best_params"].items())
    return f"Optuna's best trial (`{path.name}`): `{params}`, objective {found.get('best_value')}.\n\n"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = summarize(sweep_dir)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    common = sorted(set(rows[0]["overrides"].split()) - set(rows[0]["swept"].split())) if rows else []
    shared = f"All runs: `{' '.join(common)}`.\n\n" if common else ""
    order = "Best first by eval loss (the best kept evaluation where a run kept one, else the final)."
    text = f"# Sweep {sweep_dir}\n\n{order} {shared}{optuna_best(sweep_dir)}\n{format_table(rows)}\n"
    (sweep_dir / "summary.md").write_text(text)
    return rows


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, the sweep's summary table (see module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info("sweep summary (%d runs), best first, in %s:\n%s", len(rows), sweep_dir / "summary.md", format_table(rows))
