"""Measured beside predicted: a few real optimizer steps of a config in this process, and the validation grid of
``dtune plan --validate``."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from dtune.config import compose
from dtune.distributed.engine import Engine
from dtune.errors import ConfigError
from dtune.loss import CompletionLoss
from dtune.model import build_model
from dtune.optim import build_optimizer
from dtune.plan.memory import labelled_fraction, make_plan
from dtune.plan.probe import LiveTensorBytes
from dtune.schema import DtuneConfig
from dtune.train.step import accumulate_gradients
from dtune.units import GiB


def measure(cfg: DtuneConfig, steps: int = 2) -> dict[str, int]:
    """Run ``steps`` optimizer steps of ``cfg`` in this process on full-length synthetic batches (the plan's worst
    case) and return the peak tensor memory: ``torch.cuda.max_memory_allocated`` on a GPU, live tensor bytes
    counted at the dispatcher on the CPU."""
    engine = Engine(cfg)
    cuda = engine.device.type == "cuda"
    gc.collect()  # what an earlier measurement in this process left
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(engine.device)
    model = build_model(cfg, engine.load_device)
    loss_model = CompletionLoss(model, cfg.train.loss_chunk_tokens)
    optimizer = build_optimizer(loss_model, cfg.optim)
    loss_model, optimizer = engine.prepare(loss_model, optimizer)
    vocab = model.get_base_model().config.vocab_size
    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=generator)
    labels = ids.clone()
    labels[:, : s - max(1, int(s * labelled_fraction(cfg)))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    live = LiveTensorBytes()
    for tensor in [*loss_model.parameters(), *loss_model.buffers()]:
        live.track(tensor)
    with live:
        for _ in range(steps):
            accumulate_gradients(loss_model, [batch] * cfg.train.grad_accum_steps, engine)
            engine.step(loss_model, optimizer, cfg.optim.max_grad_norm)
    if cuda:
        return {"measured (max_memory_allocated)": torch.cuda.max_memory_allocated(engine.device)}
    return {"measured (live tensors, CPU)": live.peak}


# SmolLM2 with checkpointing, as a bigger model would train (its model group turns it off for the 135M default job).
SMOLLM2_CKPT = ["model=smollm2_135m", "model.gradient_checkpointing=true"]

# Configs the validation benchmark runs (dtune plan --validate): small enough for a CPU, spanning what the plan models.
VALIDATION_GRID = (
    ("tiny, fp32", ["model=tiny_llama", "train.micro_batch_size=8", "data.max_seq_len=256", "train.precision=fp32"]),
    (
        "tiny, no checkpointing",
        ["model=tiny_llama", "train.micro_batch_size=4", "data.max_seq_len=512", "model.gradient_checkpointing=false"],
    ),
    ("SmolLM2-135M", [*SMOLLM2_CKPT, "train.micro_batch_size=2", "data.max_seq_len=256"]),
    (
        "SmolLM2-135M, no ckpt, all tokens",
        [
            "model=smollm2_135m",
            "train.micro_batch_size=2",
            "data.max_seq_len=256",
            "data.train_on=all",
            "model.gradient_checkpointing=false",
        ],
    ),
    (
        "SmolLM2-135M, attn LoRA r64",
        [*SMOLLM2_CKPT, "train.micro_batch_size=4", "data.max_seq_len=128", "lora=attn_only", "lora.r=64"],
    ),
    (
        "SmolLM2-135M, no double quant",
        [*SMOLLM2_CKPT, "train.micro_batch_size=8", "data.max_seq_len=64", "quant.double_quant=false"],
    ),
    (
        "SmolLM2-135M, 16-bit base",
        [*SMOLLM2_CKPT, "train.micro_batch_size=2", "data.max_seq_len=256", "quant=none"],
    ),
    (
        "tiny, 16-bit base, no ckpt",
        [
            "model=tiny_llama",
            "train.micro_batch_size=4",
            "data.max_seq_len=256",
            "quant=none",
            "model.gradient_checkpointing=false",
        ],
    ),
)


# On a GPU, --validate adds Llama-3-shaped models with random weights (builtin:shape-llama-*, built on first use):
# (size, micro-batch, sequence length).
GPU_VALIDATION_SHAPES = (("1b", 4, 2048), ("3b", 2, 2048), ("8b", 2, 2048), ("8b", 1, 4096))


def _shaped_row(size: str, micro: int, seq: int) -> tuple[str, list[str]]:
    return (
        f"Llama-{size.upper()}-shaped, {micro}x{seq}",
        [
            f"model.name_or_path=builtin:shape-llama-{size}",
            "model.gradient_checkpointing=true",
            f"train.micro_batch_size={micro}",
            f"data.max_seq_len={seq}",
        ],
    )


def validation_grid(which: str, shapes: list[str], cuda: bool) -> tuple[tuple[str, list[str]], ...]:
    """The configs ``--validate`` runs: ``cpu`` (VALIDATION_GRID), ``gpu`` (its tiny-model rows, which need no
    model package, then the Llama-shaped ``shapes``), ``auto`` (cpu, plus the shapes where ``cuda``).

    Raises:
        ConfigError: a shape that GPU_VALIDATION_SHAPES does not hold.
    """
    known = {size for size, _, _ in GPU_VALIDATION_SHAPES}
    if set(shapes) - known:
        raise ConfigError(f"--shapes: unknown {sorted(set(shapes) - known)}; choose from {sorted(known)}")
    shaped = tuple(_shaped_row(*shape) for shape in GPU_VALIDATION_SHAPES if shape[0] in shapes)
    if which == "cpu" or (which == "auto" and not cuda):
        return VALIDATION_GRID
    if which == "gpu":
        return tuple(row for row in VALIDATION_GRID if "model=tiny_llama" in row[1]) + shaped
    return VALIDATION_GRID + shaped


def validate_plans(
    grid: tuple[tuple[str, list[str]], ...], extra: list[str], on_row: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """Predicted beside measured peak for each config of ``grid`` (one process, this machine); ``on_row`` gets the
    rows so far after each one (a time-limited run keeps what it measured)."""
    rows = []
    for name, overrides in grid:
        cfg = compose(["logger=none", *overrides, *extra])
        predicted = make_plan(cfg, world_size=1).peak
        ((kind, measured),) = measure(cfg).items()
        rows.append({"config": name, "overrides": overrides, "predicted": predicted, "measured": measured, "kind": kind})
        print(f"{name:<36}{predicted / GiB:>10.3f} G{measured / GiB:>10.3f} G{measured / predicted:>9.1%}", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows
