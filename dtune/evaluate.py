"""Held-out evaluation: completion loss, and accuracy when the answers form a closed set (data.choices).

Accuracy scores every choice as a continuation of the prompt and picks the most likely. When the choices start
with distinct tokens (``positive`` / ``negative``) one forward pass decides: compare the log-probabilities of the
first tokens at the last prompt position, which is exact for single-token answers. Otherwise each
(prompt, choice) pair is scored by the summed log-probability of all its tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from dtune.data import IGNORE, Example, collate
from dtune.distributed.engine import Engine
from dtune.preference import figures


def _first_tokens_distinct(ex: Example) -> bool:
    firsts = [ids[0] for ids in ex.choice_ids if ids]
    return len(firsts) == len(ex.choice_ids) and len(set(firsts)) == len(firsts)


def _score_choices(model: nn.Module, ex: Example, pad_id: int, engine: Engine) -> int:
    """Index of the choice with the highest summed log-probability after ex's prompt."""
    prompt = ex.input_ids[: ex.prompt_len]
    candidates = [Example(prompt + ids, [IGNORE] * len(prompt) + ids, len(prompt)) for ids in ex.choice_ids]
    batch = {k: v.to(engine.device) for k, v in collate(candidates, pad_id).items()}
    with engine.autocast():
        out = model(**batch)
    return int(torch.argmin(out["loss_sum"]))


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, engine: Engine, max_len: int | None = None
) -> dict[str, float]:
    """Returns eval/loss (mean over completion tokens), eval/ppl, and eval/accuracy when choices are set. Preference
    pairs or KTO rows (``model`` a :class:`~dtune.preference.PreferenceLoss` or ``KTOLoss``): eval/loss (mean over
    pairs or rows) and its figures (eval/accuracy: preference accuracy, eval/margin, eval/rewards_chosen, ...).
    ``max_len``: of KTO's KL rows (``data.max_seq_len``; see :func:`dtune.data.batching.collate`).

    Each rank scores its own share of ``examples``; the sums are reduced over ranks.
    """
    if len(examples) and (examples[0].rejected is not None or examples[0].desirable is not None):
        return _evaluate_preference(model, examples, batch_size, pad_id, engine, max_len)
    was_training = model.training
    model.eval()
    shard, real = _shard(examples, engine)
    # Decided on all examples, so every rank takes the same path (and runs the same number of forwards).
    one_forward = all(_first_tokens_distinct(ex) for ex in examples if ex.choice_ids)
    loss_sum = tokens = 0.0
    correct = scored = 0
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        counted = max(0, min(len(chunk), real - start))  # rows past this are padding
        batch = {k: v.to(engine.device) for k, v in collate(chunk, pad_id).items()}
        gather_at = torch.tensor([ex.prompt_len - 1 for ex in chunk], device=engine.device)
        with engine.autocast():
            out = model(**batch, gather_at=gather_at)
        loss_sum += float(out["loss_sum"][:counted].double().sum())
        tokens += float(out["tokens"][:counted].sum())
        for i, ex in enumerate(chunk):
            if not ex.choice_ids:
                continue
            if one_forward:
                firsts = torch.tensor([ids[0] for ids in ex.choice_ids], device=engine.device)
                pred = int(torch.argmax(out["logits_at"][i, firsts]))
            else:
                pred = _score_choices(model, ex, pad_id, engine)
            if i < counted:
                correct += int(pred == ex.gold)
                scored += 1
    model.train(was_training)
    totals = engine.sum(torch.tensor([loss_sum, tokens, correct, scored], dtype=torch.float64, device=engine.device))
    loss_sum, tokens, correct, scored = totals.cpu().tolist()
    loss = loss_sum / max(tokens, 1.0)
    metrics = {"eval/loss": loss, "eval/ppl": float(torch.exp(torch.tensor(loss)))}
    if scored:
        metrics["eval/accuracy"] = correct / scored
    return metrics


def _shard(examples: list[Example], engine: Engine) -> tuple[list[Example], int]:
    """This rank's share of ``examples`` and how many of it are real: every rank runs the same forwards (ZeRO-3/FSDP2
    gather parameters inside forward, and DDP's forward syncs buffers), short shares padded with repeats of the first
    example, which do not count."""
    shard = examples[engine.rank :: engine.world_size]
    real = len(shard)
    return shard + [examples[0]] * (-(-len(examples) // engine.world_size) - real), real


def _evaluate_preference(
    model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, engine: Engine, max_len: int | None
) -> dict[str, float]:
    """Pairs or KTO rows: the mean loss per item and :func:`dtune.preference.figures` of the loss module's stats."""
    loss_module = engine.unwrap(model)
    keys = loss_module.stat_keys
    was_training = model.training
    model.eval()
    shard, real = _shard(examples, engine)
    sums = torch.zeros(2 + len(keys), dtype=torch.float64, device=engine.device)  # loss, items, figures
    starts = list(range(0, len(shard), batch_size))
    if shard[0].desirable is not None and len(starts) > 1 and len(shard) - starts[-1] == 1:
        starts.pop()  # KTO: a last chunk of one row would pair its prompt with its own completion as its KL row
    for start, end in zip(starts, [*starts[1:], len(shard)], strict=True):
        chunk = shard[start:end]
        counted = max(0, min(len(chunk), real - start))  # items past this are padding
        batch = {k: v.to(engine.device) for k, v in collate(chunk, pad_id, max_len).items()}
        with engine.autocast():
            out = model(**batch)
        sums[0] += out["loss_sum"][:counted].double().sum()
        sums[1] += counted
        sums[2:] += out["stats"][:counted].double().sum(dim=0)
    model.train(was_training)
    totals = engine.sum(sums).cpu().tolist()
    items = max(totals[1], 1.0)
    means = {k: v / items for k, v in zip(keys, totals[2:], strict=True)}
    return {"eval/loss": totals[0] / items, **{f"eval/{k}": v for k, v in figures(loss_module.objective, means).items()}}
