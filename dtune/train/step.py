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
from dtune.flops import Counts, attention_pairs
from dtune.preference import REFERENCE_FREE, figures

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
    """Preference objectives: the step's figures (:func:`dtune.preference.figures`), all ranks."""
    reference: Counts = (0, 0, 0)
    """(tokens, labelled, attention pairs) the step's reference forwards ran, all ranks (for the FLOP count)."""
    policy_scored: Counts = (0, 0, 0)
    """The same for forwards of the policy without gradients (KTO's KL rows)."""


def labelled_tokens(batch: Batch, labels: str = "labels") -> torch.Tensor:
    """Positions whose next token carries loss (the label shifted by one, as the loss sees it)."""
    return (batch[labels][:, 1:] != IGNORE).sum()


def step_counts(batch: Batch, objective: str) -> list[int]:
    """What one micro-batch's forwards run through, for the FLOP count: (tokens, labelled, attention pairs) of its
    rows, then of its reference forwards (a preference objective's reference, unless precomputed: ``ref_logps``;
    and KTO's on its KL rows), then of the policy's forwards without gradients (KTO's KL rows); and its rows."""
    rows = [int(batch["attention_mask"].sum()), int(labelled_tokens(batch)), attention_pairs(batch)]
    kl = [0, 0, 0]
    if "kl_input_ids" in batch:
        mask = batch["kl_attention_mask"]
        kl = [int(mask.sum()), int(labelled_tokens(batch, "kl_labels")), attention_pairs({"attention_mask": mask})]
    referenced = objective not in ("sft", *REFERENCE_FREE) and "ref_logps" not in batch
    reference = [a + b for a, b in zip(rows if referenced else [0, 0, 0], kl, strict=True)]  # KL rows: always scored
    return [*rows, *reference, *kl, batch["input_ids"].shape[0]]


def accumulate_gradients(
    loss_model: nn.Module, micro: list[Batch], engine: Engine, step_tokens: torch.Tensor | None = None
) -> float | tuple[float, dict[str, float]]:
    """Forward and backward each micro-batch of one optimizer step (on ``engine.device``); return the step's mean
    token loss over all ranks -- with a preference loss (whose output has ``stats``), the mean pair loss and the
    mean of each of its ``stat_keys`` figures.

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
    reduced = engine.sum(torch.cat([total.double().reshape(1), stats])).cpu()
    means = (reduced[1:] / float(step_tokens)).tolist()
    return float(reduced[0]), dict(zip(engine.unwrap(loss_model).stat_keys, means, strict=True))


def train_step(
    loss_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    engine: Engine,
    max_grad_norm: float | None,
    objective: str = "sft",
) -> StepResult:
    """One optimizer step over this rank's ``batches`` (CPU tensors, ``train.grad_accum_steps`` micro-batches).
    ``objective`` (train.objective) says what the loss is normalised by over the step's micro-batches and ranks: the
    labelled tokens (sft), the pairs (2 rows each: dpo, orpo, simpo) or the rows (kto, whose reference point z0 is
    estimated first over the whole step: :func:`kl_estimate`).

    Raises ValueError when ``len(batches)`` is not the engine's ``grad_accum_steps`` (the contract of
    :meth:`~dtune.distributed.engine.Engine.backward`). The learning-rate schedule is the caller's to step.
    """
    if len(batches) != engine.grad_accum_steps:
        raise ValueError(f"train_step: {len(batches)} micro-batches for grad_accum_steps={engine.grad_accum_steps}")
    # Counted on the CPU batches (no device synchronisation), reduced over ranks in one all-reduce.
    counts = torch.tensor([step_counts(b, objective) for b in batches])
    summed = [int(v) for v in engine.sum(counts.sum(dim=0).to(engine.device))]
    (tokens, labelled, pairs), reference, policy_scored, rows = summed[:3], summed[3:6], summed[6:9], summed[9]
    micro = [{k: v.to(engine.device) for k, v in b.items()} for b in batches]
    units = {"sft": labelled, "kto": rows}.get(objective, rows // 2)
    if objective == "kto":
        z0 = kl_estimate(loss_model, micro, engine)
        for m in micro:
            m["kl"] = z0
    out = accumulate_gradients(loss_model, micro, engine, torch.tensor(units))
    loss, stats = out if isinstance(out, tuple) else (out, None)
    if stats is not None:
        stats = figures(objective, stats)
    grad_norm = engine.step(loss_model, optimizer, max_grad_norm)
    return StepResult(loss, grad_norm, tokens, labelled, pairs, stats, tuple(reference), tuple(policy_scored))


def kl_estimate(loss_model: nn.Module, micro: list[Batch], engine: Engine) -> torch.Tensor:
    """KTO's reference point z0 for one optimizer step: the mean over the KL rows of all its micro-batches on all ranks
    of the policy's minus the reference's log-probability (no gradients), so that any split of the step into
    micro-batches and ranks gives the same z0. A forward of each micro-batch's KL rows (``score="kl"``) before the
    step's forwards and backwards."""
    terms = torch.zeros(2, device=engine.device)
    with torch.no_grad():
        for m in micro:
            with engine.autocast():
                terms += loss_model(**m, score="kl")["kl"].float()
    total = engine.sum(terms)
    return total[0] / total[1].clamp(min=1)
