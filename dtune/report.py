"""How metrics are shown to a person: one line per evaluation, and the before/after table (training's before and
after, ``dtune eval``'s base and adapter) with one definition of "change"."""

from __future__ import annotations

from collections.abc import Mapping


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``loss 1.2345  accuracy 81.25%``: the last part of each key, accuracies in percent."""
    return "  ".join(
        f"{k.split('/')[-1]} {v:.2%}" if k.endswith("accuracy") else f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()
    )


def _change(key: str, before: float, after: float) -> str:
    """Accuracy: the difference in percentage points; anything else: the difference and its size relative to before."""
    if key.endswith("accuracy"):
        return f"{(after - before) * 100:+.1f} pts"
    relative = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{after - before:+.4g}{relative}"


def comparison_table(
    rows: list[tuple[str, Mapping[str, float], Mapping[str, float]]], names: tuple[str, str] = ("before", "after")
) -> str:
    """A fixed-width table: for each (label, before, after) row and each metric both have, the two values and the
    change. ``names``: the headers of the two value columns (e.g. base, adapter)."""
    label_width = max([len("set"), *(len(label) for label, _, _ in rows)]) + 2
    width = max([14, *(len(k) for _, before, _ in rows for k in before)]) + 2  # metric names: eval/logps_rejected
    lines = [f"{'set':<{label_width}}{'metric':<{width}}{names[0]:>12}{names[1]:>12}   change"]
    for label, before, after in rows:
        for key, b in before.items():
            if key not in after:
                continue
            a = after[key]
            if key.endswith("accuracy"):
                lines.append(f"{label:<{label_width}}{key:<{width}}{b:>12.1%}{a:>12.1%}   {_change(key, b, a)}")
            else:
                lines.append(f"{label:<{label_width}}{key:<{width}}{b:>12.4g}{a:>12.4g}   {_change(key, b, a)}")
    return "\n".join(lines)
