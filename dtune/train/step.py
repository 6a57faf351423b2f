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


def labelled_tokens(batch: Batch) -> torch.Tensor:
    """Positions whose next token carries loss (the label shifted by one, as the loss sees it)."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def accumulate_gradients(
    loss_model: nn.Module, micro: list[Batch], engine: Engine, step_tokens: torch.Tensor | None = None
) -> float:
    """Forward and backward each micro-batch of one optimizer step (on ``engine.device``); return the step's mean
    token loss over all ranks.

    ``step_tokens``: the step's labelled tokens over all ranks (counted and reduced here when not given).
    """
    if step_tokens is None:
        step_tokens = engine.sum(sum(labelled_tokens(m) for m in micro))
    step_tokens = step_tokens.to(engine.device).clamp(min=1)
    total = torch.zeros((), device=engine.device)
    for m in micro:
        with engine.accumulate(loss_model), engine.autocast():
            out = loss_model(**m)
            total += engine.backward(out["loss_sum"].sum(), step_tokens)
    return float(engine.sum(total))


def train_step(
    loss_model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], engine: Engine, max_grad_norm: float | None
) -> StepResult:
    """One optimizer step over this rank's ``batches`` (CPU tensors, ``train.grad_accum_steps`` micro-batches).

    Raises ValueError when ``len(batches)`` is not the engine's ``grad_accum_steps`` (the contract of
    :meth:`~dtune.distributed.engine.Engine.backward`). The learning-rate schedule is the caller's to step.
    """
    if len(batches) != engine.grad_accum_steps:
        raise ValueError(f"train_step: {len(batches)} micro-batches for grad_accum_steps={engine.grad_accum_steps}")
    # Counted on the CPU batches (no device synchronisation), reduced over ranks in one all-reduce.
    counts = torch.tensor([[int(b["attention_mask"].sum()), int(labelled_tokens(b)), attention_pairs(b)] for b in batches])
    tokens, labelled, pairs = (int(v) for v in engine.sum(counts.sum(dim=0).to(engine.device)))
    micro = [{k: v.to(engine.device) for k, v in b.items()} for b in batches]
    loss = accumulate_gradients(loss_model, micro, engine, torch.tensor(labelled))
    grad_norm = engine.step(loss_model, optimizer, max_grad_norm)
    return StepResult(loss, grad_norm, tokens, labelled, pairs)
