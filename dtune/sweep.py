"""Hydra sweeps (``dtune train --multirun ...``): W&B grouping of a sweep's runs and the summary table at its end.

Each run of a sweep logs to W&B in one group (the sweep directory), named by its overrides, with the overrides in
its config. When the sweep ends, :class:`SweepSummary` (a Hydra callback, listed in conf/config.yaml) reads every
run's results.json and writes ``summary.md`` and ``summary.json`` into the sweep directory, best final eval loss
first; runs without results (failed, or still waiting to be requeued) are listed after them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run directory of the sweep (those holding .hydra/ or results.json), best eval loss first."""
    rows = []
    for job_dir in sorted(p.parent for p in sweep_dir.glob("*/.hydra")):
        row: dict[str, Any] = {"run": job_dir.name, "overrides": " ".join(_overrides(job_dir))}
        results = job_dir / "results.json"
        if results.is_file():
            data = json.loads(results.read_text())
            after, before = data.get("after", {}), data.get("before", {})
            row.update(
                status="done",
                eval_loss=after.get("eval/loss"),
                eval_loss_before=before.get("eval/loss"),
                eval_accuracy=after.get("eval/accuracy"),
                steps=data.get("steps"),
                tokens_per_s=data.get("tokens_per_s"),
            )
        else:
            newest = sorted((job_dir / "checkpoints").glob("step-*"))
            row["status"] = f"stopped at {newest[-1].name}" if newest else "failed"
        rows.append(row)

    # What the sweep varied, per run; the overrides all runs share go in the table's heading.
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    for row in rows:
        row["swept"] = " ".join(o for o in row["overrides"].split() if o not in common)

    def key(row: dict[str, Any]) -> tuple[int, float]:
        loss = row.get("eval_loss")
        return (0, loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else (1, math.inf)

    return sorted(rows, key=key)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summarize`'s rows."""
    show_acc = any(r.get("eval_accuracy") is not None for r in rows)
    header = ["rank", "run", "swept", "eval loss", "before"] + (["accuracy"] if show_acc else []) + ["tokens/s", "status"]
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
        if show_acc:
            cells.append(num("eval_accuracy", ".1%"))
        cells += [num("tokens_per_s", ",.0f"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = summarize(sweep_dir)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    common = sorted(set(rows[0]["overrides"].split()) - set(rows[0]["swept"].split())) if rows else []
    shared = f"All runs: `{' '.join(common)}`.\n\n" if common else ""
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\nBest final eval loss first. {shared}\n{format_table(rows)}\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, the sweep's summary table (see module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info("sweep summary (%d runs), best first, in %s:\n%s", len(rows), sweep_dir / "summary.md", format_table(rows))
