"""One optimizer step: count the step's tokens (once, from the CPU batches, one all-reduce), forward and backward
each micro-batch with the loss normalised by the step's labelled tokens on all ranks, clip and step.

Normalising by the step's total (not each micro-batch's mean) gives every token the same weight however tokens
fall into micro-batches and ranks, so accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dtune.data.examples import IGNORE
from dtune.distributed.engine import Engine
from dtune.flops import attention_pairs

Batch = dict[str, torch.Tensor]


@dataclass
class StepResult:
    loss: float
    """Mean token loss of the step, all ranks."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Real (non-padding) tokens of the step, all ranks."""
    labelled: int
    """Tokens that carry loss, all ranks."""
    attention_pairs: int
    """Query-key pairs attended, all ranks (for the FLOP count)."""
    stats: dict[str, float] | None = None
    """Preference objectives: the step's mean of each figure in :data:`dtune.preference.STAT_KEYS`, all ranks."""


def labelled_tokens(batch: Batch) -> torch.Tensor:
    """Positions whose next token carries loss (the label shifted by one, as the loss sees it)."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def accumulate_gradients(
    loss_model: nn.Module, micro: list[Batch], engine: Engine, step_tokens: torch.Tensor | None = None
) -> float | tuple[float, dict[str, float]]:
    """Forward and backward each micro-batch of one optimizer step (on ``engine.device``); return the step's mean
    token loss over all ranks -- with a preference loss (whose output has ``stats``), the mean pair loss and the
    mean of each figure of :data:`~dtune.preference.STAT_KEYS`.

    ``step_tokens``: what the loss is normalised by over all ranks: the step's labelled tokens (counted and reduced
    here when not given), or its pairs.
    """
    if step_tokens is None:
        step_tokens = engine.sum(sum(labelled_tokens(m) for m in micro))
    step_tokens = step_tokens.to(engine.device).clamp(min=1)
    total = torch.zeros((), device=engine.device)
    stats: torch.Tensor | None = None
    for m in micro:
        with engine.accumulate(loss_model), engine.autocast():
            out = loss_model(**m)
            total += engine.backward(out["loss_sum"].sum(), step_tokens)
        if "stats" in out:
            summed = out["stats"].double().sum(dim=0)
            stats = summed if stats is None else stats + summed
    if stats is None:
        return float(engine.sum(total))
    from dtune.preference import STAT_KEYS

    reduced = engine.sum(torch.cat([total.double().reshape(1), stats])).cpu()
    means = (reduced[1:] / float(step_tokens)).tolist()
    return float(reduced[0]), dict(zip(STAT_KEYS, means, strict=True))


def train_step(
    loss_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    engine: Engine,
    max_grad_norm: float | None,
    per_pair: bool = False,
) -> StepResult:
    """One optimizer step over this rank's ``batches`` (CPU tensors, ``train.grad_accum_steps`` micro-batches).
    ``per_pair``: the batches hold preference pairs (2 rows each) and the loss is normalised by the step's pairs.

    Raises ValueError when ``len(batches)`` is not the engine's ``grad_accum_steps`` (the contract of
    :meth:`~dtune.distributed.engine.Engine.backward`). The learning-rate schedule is the caller's to step.
    """
    if len(batches) != engine.grad_accum_steps:
        raise ValueError(f"train_step: {len(batches)} micro-batches for grad_accum_steps={engine.grad_accum_steps}")
    # Counted on the CPU batches (no device synchronisation), reduced over ranks in one all-reduce.
    counts = torch.tensor(
        [
            [int(b["attention_mask"].sum()), int(labelled_tokens(b)), attention_pairs(b), b["input_ids"].shape[0] // 2]
            for b in batches
        ]
    )
    tokens, labelled, pairs, preference_pairs = (int(v) for v in engine.sum(counts.sum(dim=0).to(engine.device)))
    micro = [{k: v.to(engine.device) for k, v in b.items()} for b in batches]
    out = accumulate_gradients(loss_model, micro, engine, torch.tensor(preference_pairs if per_pair else labelled))
    loss, stats = out if isinstance(out, tuple) else (out, None)
    grad_norm = engine.step(loss_model, optimizer, max_grad_norm)
    return StepResult(loss, grad_norm, tokens, labelled, pairs, stats)
