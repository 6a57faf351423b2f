"""The figures of a training step: throughput and MFU, and what the progress bar shows."""

from __future__ import annotations


def throughput(step_flops: dict[str, float], elapsed: float, devices: int, peak: float | None) -> dict[str, float]:
    """Achieved TFLOP/s per device on the frozen-base basis, and MFU on both bases when the device peak is known.

    ``step_flops``: :meth:`dtune.flops.FlopCounts.step`'s FLOPs of the step; ``elapsed``: seconds; ``peak``: FLOP/s
    of one device (None: unknown).
    """
    out = {"train/tflops_per_device": step_flops["frozen_base"] / elapsed / devices / 1e12}
    if peak:
        out["train/mfu"] = step_flops["frozen_base"] / elapsed / devices / peak
        out["train/mfu_6n"] = step_flops["six_n"] / elapsed / devices / peak
    return out


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows beside its ETA."""
    out = {
        "loss": f"{metrics['train/loss']:.4f}",
        "lr": f"{metrics['train/lr']:.2e}",
        "epoch": f"{metrics['train/epoch']:.2f}",
        "tok/s/dev": f"{metrics['train/tokens_per_s_per_device']:,.0f}",
    }
    if "train/accuracy" in metrics:  # preference accuracy of the step's pairs
        out["acc"] = f"{metrics['train/accuracy']:.2f}"
    if "train/mfu" in metrics:
        out["mfu"] = f"{metrics['train/mfu']:.1%}"
    if "train/peak_mem_gib" in metrics:
        out["mem"] = f"{metrics['train/peak_mem_gib']:.1f}G"
    return out
