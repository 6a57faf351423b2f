"""``dtune train`` / ``python -m dtune.train``: compose the config, fine-tune, evaluate, save the adapter.

One explicit loop: fetch the micro-batches of a step, backward each with the loss normalised by the step's total
number of completion tokens (so accumulation gives the same gradient as one big batch), clip, step, log;
evaluate before, every ``train.eval_every`` steps and after.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dtune.config import DtuneConfig, conf_dir, to_dataclass, validate
from dtune.data import IGNORE
from dtune.errors import user_errors
from dtune.packing import real_tokens

log = logging.getLogger("dtune")


def format_comparison(before: dict[str, float], after: dict[str, float]) -> str:
    """The before/after table printed at the end of a run."""
    lines = [f"{'metric':<16}{'before':>12}{'after':>12}{'change':>12}"]
    for key in before:
        if key not in after:
            continue
        b, a = before[key], after[key]
        if key.endswith("accuracy"):
            lines.append(f"{key:<16}{b:>12.1%}{a:>12.1%}{(a - b) * 100:>+8.1f} pts")
        else:
            lines.append(f"{key:<16}{b:>12.4g}{a:>12.4g}{a - b:>+12.4g}")
    return "\n".join(lines)


def accumulate_gradients(loss_model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], engine: Any) -> float:
    """Forward and backward each micro-batch of one optimizer step; return the step's mean token loss.

    Each micro-batch's summed loss is divided by the completion tokens of the whole step on all ranks, so every
    token weighs the same however tokens fall into micro-batches and ranks (a mean of per-batch means would not).
    """
    step_tokens = engine.sum(sum((m["labels"][:, 1:] != IGNORE).sum() for m in micro)).clamp(min=1)
    total = torch.zeros((), device=engine.device)
    for m in micro:
        with engine.accumulate(loss_model), engine.autocast():
            out = loss_model(**m)
            # Engines average gradients over ranks; the world-size factor turns that average into the sum.
            loss = out["loss_sum"].sum() * engine.world_size / step_tokens
            engine.backward(loss)
        total += loss.detach() / engine.world_size
    return float(engine.sum(total))


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # per-load notices drown the progress bar
    transformers.utils.logging.disable_progress_bar()
    # PEFT calls transformers' renamed gradient-checkpointing methods; the notice is theirs to act on, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # bitsandbytes looks for an optional CPU kernel package on every load and says so at WARNING.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run(cfg: DtuneConfig, output_dir: Path) -> dict[str, Any]:
    """Fine-tune per ``cfg``, writing everything into ``output_dir``. Returns the results written to results.json."""
    from tqdm.auto import tqdm

    from dtune.checkpoint import adapter_state, save_adapter
    from dtune.data import StepSampler, load_data
    from dtune.engine import Engine
    from dtune.evaluate import evaluate
    from dtune.loss import CompletionLoss
    from dtune.model import build_model, load_tokenizer
    from dtune.optim import build_optimizer, build_scheduler
    from dtune.tracking import NullTracker, Tracker

    validate(cfg)
    _quiet_libraries()
    engine = Engine(cfg)
    torch.manual_seed(cfg.train.seed)
    if not engine.is_main:  # one console voice per job: other ranks only warn (their full log is in their file)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)

    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, stats = load_data(cfg.data, tokenizer, engine)
    log.info("data: %d training and %d held-out samples from %s", stats.train_rows, stats.eval_rows, cfg.data.source)
    pad_id = tokenizer.pad_token_id

    model = build_model(cfg, engine.load_device)
    output_dir.mkdir(parents=True, exist_ok=True)
    if engine.is_main:  # written once the inputs proved good: a run that fails on bad input overwrites nothing
        (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    loss_model = engine.shard(CompletionLoss(model))  # FSDP2 shards here; the optimizer must see the sharded params
    optimizer = build_optimizer(loss_model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    loss_model, optimizer = engine.prepare(loss_model, optimizer)
    held = engine.local_bytes(loss_model)
    log.info(
        "rank %d holds %.1f MiB of frozen and %.2f MiB of trainable parameters (%s)",
        engine.rank,
        held["frozen"] / 2**20,
        held["trainable"] / 2**20,
        cfg.engine.strategy,
    )

    tracker = Tracker(cfg, output_dir) if engine.is_main else NullTracker()
    eval_args = (eval_set, cfg.train.eval_batch_size, pad_id, engine)
    before = evaluate(loss_model, *eval_args)
    tracker.log(before, step=0)
    log.info("eval before training: %s", _fmt(before))

    steps = StepSampler(
        train_set,
        cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps,
        cfg.train.seed,
        pad_id,
        rank=engine.rank,
        world_size=engine.world_size,
    )
    bar = tqdm(total=cfg.train.max_steps, desc="train", disable=not (engine.is_main and cfg.logger.progress), dynamic_ncols=True)
    tokens_seen = 0
    started = time.perf_counter()
    for step in range(1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        micro = [{k: v.to(engine.device) for k, v in mb.items()} for mb in next(steps)]
        lr = scheduler.get_last_lr()[0]
        train_loss = accumulate_gradients(loss_model, micro, engine)
        grad_norm = engine.step(loss_model, optimizer, scheduler, cfg.optim.max_grad_norm)

        step_seen = int(engine.sum(sum(real_tokens(m["attention_mask"]) for m in micro)))
        tokens_seen += step_seen
        elapsed = time.perf_counter() - t0
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": step_seen / elapsed,
            "train/tokens": tokens_seen,
        }
        if step % cfg.logger.log_every == 0 or step == cfg.train.max_steps:
            tracker.log(metrics, step=step)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_seen / elapsed:,.0f}")
        bar.update(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            mid = evaluate(loss_model, *eval_args)
            tracker.log(mid, step=step)
            bar.write(f"step {step}: {_fmt(mid)}")
    bar.close()
    train_time = time.perf_counter() - started

    after = evaluate(loss_model, *eval_args)
    tracker.log(after, step=cfg.train.max_steps)
    results: dict[str, Any] = {
        "before": before,
        "after": after,
        "steps": cfg.train.max_steps,
        "train_tokens": tokens_seen,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1),
        "data": asdict(stats),
        "param_bytes_rank0": held,
    }
    if cfg.train.save_adapter:
        peft_model = engine.unwrap(loss_model).model
        state = engine.full_state(adapter_state(peft_model))  # collective where parameters are sharded
        if engine.is_main:
            results["adapter"] = str(save_adapter(peft_model, output_dir / "adapter", state))
    engine.barrier()
    if engine.is_main:
        log.info(
            "held-out evaluation (%d samples), before and after training:\n%s", stats.eval_rows, format_comparison(before, after)
        )
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        tracker.summary({f"final/{k}": v for k, v in after.items()})
        log.info("outputs in %s", output_dir)
    tracker.finish()
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k.split('/')[-1]} {v:.2%}" if k.endswith("accuracy") else f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items()
    )


def job_output_dir(cfg: DtuneConfig) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from dtune.engine import shutdown_distributed

    with user_errors():
        cfg = to_dataclass(dict_cfg)
        validate(cfg)
        run(cfg, job_output_dir(cfg))
    shutdown_distributed()


if __name__ == "__main__":
    from dtune.cli import offline_defaults

    offline_defaults()
    main()
