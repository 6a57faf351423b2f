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
from dtune.engine import Engine


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
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, engine: Engine) -> dict[str, float]:
    """Returns eval/loss (mean over completion tokens), eval/ppl, and eval/accuracy when choices are set.

    Each rank scores its own share of ``examples``; the sums are reduced over ranks.
    """
    was_training = model.training
    model.eval()
    shard = examples[engine.rank :: engine.world_size]
    real = len(shard)
    # Every rank runs the same forwards: ZeRO-3/FSDP2 gather parameters inside forward, and DDP's forward syncs
    # buffers. Short shares are padded with repeats of the first example, which do not count.
    shard = shard + [examples[0]] * (-(-len(examples) // engine.world_size) - real)
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


# --------------------------------------------------------------------------------------------- dtune eval


def compare(
    model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, engine: Engine
) -> dict[str, dict[str, float]]:
    """The same evaluation with the adapter (``model`` is a PeftModel) and with it switched off: the base."""
    from dtune.loss import CompletionLoss

    loss_model = CompletionLoss(model)
    tuned = evaluate(loss_model, examples, batch_size, pad_id, engine)
    with model.disable_adapter():
        base = evaluate(loss_model, examples, batch_size, pad_id, engine)
    return {"base": base, "adapter": tuned}


def format_compare(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'set':<10}{'metric':<12}{'base':>12}{'adapter':>12}{'change':>12}"]
    for name, pair in results.items():
        for key, before in pair["base"].items():
            after, metric = pair["adapter"][key], key.split("/")[-1]
            if metric == "accuracy":
                lines.append(f"{name:<10}{metric:<12}{before:>12.1%}{after:>12.1%}{(after - before) * 100:>+8.1f} pts")
            else:
                lines.append(f"{name:<10}{metric:<12}{before:>12.4g}{after:>12.4g}{(after - before) / before:>+11.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``dtune eval RUN [data.key=value ...]``: held-out loss/perplexity (and accuracy) of base and base+adapter side
    by side on the run's data (or the data the overrides name), and a forgetting check: the same on general text."""
    import json
    import sys
    from dataclasses import replace

    from omegaconf import OmegaConf

    from dtune.adapters import load_trained, locate_args, trained_parser
    from dtune.config import DataConfig, DtuneConfig
    from dtune.data import load_data
    from dtune.errors import ConfigError, user_errors
    from dtune.model import load_tokenizer

    parser = trained_parser("dtune eval", "Held-out loss of the base and of base + adapter, side by side.")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.eval_source=test.jsonl")
    parser.add_argument("--general", default="builtin:hamlet", help="general text for the forgetting check ('' to skip)")
    parser.add_argument("--general-rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with user_errors():
        trained = locate_args(args)
        cfg = trained.cfg
        if args.overrides:
            if bad := [o for o in args.overrides if not o.startswith("data.") or "=" not in o]:
                raise ConfigError(f"overrides: only data.key=value settings apply to dtune eval; got {bad}")
            merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(args.overrides))
            cfg = OmegaConf.to_object(merged)
            assert isinstance(cfg, DtuneConfig)
        cfg.logger.wandb = False
        # One process, whatever engine trained it (fsdp2 would want torchrun; the adapter is whole on disk).
        cfg.engine = replace(cfg.engine, strategy="ddp", zero_stage=0, offload_optimizer=False, offload_params=False)
        engine = Engine(cfg)
        tokenizer = load_tokenizer(cfg)
        _, task, _ = load_data(cfg.data, tokenizer)
        model = load_trained(replace(trained, cfg=cfg), engine.device, args.allow_pickle)
        results = {"task": compare(model, task, args.batch_size, tokenizer.pad_token_id, engine)}
        if args.general:
            general = DataConfig(
                source=args.general,
                format="text",
                eval_size=args.general_rows,
                max_seq_len=cfg.data.max_seq_len,
                choices=None,
            )
            _, text, _ = load_data(general, tokenizer)
            results["general"] = compare(model, text, args.batch_size, tokenizer.pad_token_id, engine)
        print(
            f"{trained.adapter_dir} on {cfg.model.name_or_path}; task: {len(task)} held-out rows of {cfg.data.source}"
            + (f"; general: {args.general_rows} rows of {args.general}" if args.general else "")
        )
        print(format_compare(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        sys.stdout.flush()
    return 0
