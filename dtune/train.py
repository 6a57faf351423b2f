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
    """Fine-tune per ``cfg``, writing everything into ``output_dir``. Returns the results written to results.json.

    Raises :class:`~dtune.preempt.Preempted` when a preemption signal arrived: after writing a checkpoint if training
    had begun, at once if it arrived while the run was still setting up (nothing new to save).
    """
    from dtune.engine import Engine
    from dtune.preempt import Preemption

    validate(cfg)
    _quiet_libraries()
    engine = Engine(cfg)
    torch.manual_seed(cfg.train.seed)
    if not engine.is_main:  # one console voice per job: other ranks only warn (their full log is in their file)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
    from dtune.plan import check_fits

    with Preemption() as preemption:  # from here on a stop signal is honoured at the next step boundary
        # Know before loading: the memory plan (rank 0, sent to all), refusing a config predicted not to fit the GPU.
        table = engine.on_main(lambda: check_fits(cfg, engine.world_size))
        if table:
            log.info("memory plan (per GPU):\n%s", table)
        return _train(cfg, output_dir, engine, preemption)


def _train(cfg: DtuneConfig, output_dir: Path, engine: Any, preemption: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from dtune.checkpoint import (
        CHECKPOINTS,
        check_resumable,
        find_resume_checkpoint,
        load_checkpoint,
        save_adapter,
        save_checkpoint,
    )
    from dtune.data import StepSampler, load_data
    from dtune.evaluate import evaluate
    from dtune.flops import FlopCounts, attention_pairs, device_peak_flops, peak_memory_bytes
    from dtune.loss import CompletionLoss
    from dtune.model import build_model, load_tokenizer
    from dtune.optim import build_optimizer, build_scheduler
    from dtune.preempt import Preempted
    from dtune.tracking import NullTracker, Tracker

    # Rank 0 chooses, so that every rank loads the same checkpoint whatever its view of a shared filesystem.
    resume_from = engine.on_main(lambda: find_resume_checkpoint(cfg.train.resume, output_dir))
    saved = None
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        changed = check_resumable(saved["config"], cfg, resume_from)
        log.info("resuming from %s (step %d)", resume_from, saved["trainer_state"]["step"])
        if changed:
            log.warning("resume: settings changed since the checkpoint: %s", ", ".join(changed))

    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, stats = load_data(cfg.data, tokenizer, engine)
    log.info("data: %d training and %d held-out samples from %s", stats.train_rows, stats.eval_rows, cfg.data.source)
    pad_id = tokenizer.pad_token_id

    model = build_model(cfg, engine.load_device)
    flops = FlopCounts.of(model)
    peak_flops = device_peak_flops(cfg.train.precision, cfg.train.peak_tflops)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if engine.is_main:  # written once the inputs proved good: a run that fails on bad input overwrites nothing
        (output_dir / "config_resolved.yaml").write_text(config_yaml)
    # FSDP2 shards here; the optimizer must see the sharded params.
    loss_model = engine.shard(CompletionLoss(model, cfg.train.loss_chunk_tokens))
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
    steps = StepSampler(
        train_set,
        cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps,
        cfg.train.seed,
        pad_id,
        rank=engine.rank,
        world_size=engine.world_size,
    )

    start_step, tokens_seen, before, run_id = 0, 0, None, None
    if saved is not None:
        restore_training_state(saved, engine, loss_model, optimizer, scheduler, steps)
        state = saved["trainer_state"]
        start_step, tokens_seen, before = state["step"], state["tokens_seen"], state["before"]
        if resume_from.parent.parent.resolve() == output_dir.resolve():
            run_id = state.get("wandb_id")  # the same run going on: the same W&B run; from another run's: a new one

    tracker = (
        Tracker(cfg, output_dir, resume_step=start_step if saved else None, run_id=run_id) if engine.is_main else NullTracker()
    )
    eval_args = (eval_set, cfg.train.eval_batch_size, pad_id, engine)
    if before is None:
        before = evaluate(loss_model, *eval_args)
        tracker.log(before, step=0)
        log.info("eval before training: %s", _fmt(before))

    def write_checkpoint(step: int, reason: str) -> dict[str, torch.Tensor] | None:
        """Collective. Returns the adapter's full tensors on rank 0 (None elsewhere)."""
        t0 = time.perf_counter()
        opt_state = engine.optimizer_state(loss_model, optimizer)
        rng = engine.gather_objects(engine.rng_state())
        adapter = None
        if engine.is_main:
            # The loss wrapper holds the PeftModel as `.model`: the adapter's names are the parameters' names below it.
            adapter = {name.removeprefix("model."): entry["param"] for name, entry in opt_state["params"].items()}
            trainer_state = {
                "step": step,
                "reason": reason,
                "sampler": steps.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": engine.scaler_state(optimizer),
                "tokens_seen": tokens_seen,
                "world_size": engine.world_size,
                "wandb_id": tracker.run_id,
                "before": before,
                "time": time.time(),
            }
            path = save_checkpoint(
                output_dir / CHECKPOINTS,
                step,
                peft_model=engine.unwrap(loss_model).model,
                adapter=adapter,
                optimizer=opt_state,
                rng=rng,
                trainer_state=trainer_state,
                config_yaml=config_yaml,
                keep=cfg.train.keep_checkpoints,
            )
            log.info("checkpoint (%s) written to %s in %.1f s", reason, path, time.perf_counter() - t0)
        engine.barrier()
        return adapter

    max_steps = cfg.train.max_steps
    bar = tqdm(
        total=max_steps,
        initial=start_step,
        desc="train",
        disable=not (engine.is_main and cfg.logger.progress),
        dynamic_ncols=True,
    )
    segment_tokens = 0
    if engine.device.type == "cuda":  # peak memory of the training steps, not of loading or evaluation
        torch.cuda.reset_peak_memory_stats(engine.device)
    train_peak = 0.0
    started = time.perf_counter()
    if engine.any(preemption.requested):  # it came while setting up: nothing new to save
        bar.close()
        tracker.preempted()
        tracker.finish()
        raise Preempted(start_step, preemption.received, preemption.previous_handler())
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        batches = next(steps)
        # Token counts from the CPU batches: no device synchronisation for them.
        counts = [
            [int(real_tokens(b["attention_mask"])), int((b["labels"][:, 1:] != IGNORE).sum()), attention_pairs(b)]
            for b in batches
        ]
        micro = [{k: v.to(engine.device) for k, v in mb.items()} for mb in batches]
        lr = scheduler.get_last_lr()[0]
        train_loss = accumulate_gradients(loss_model, micro, engine)
        grad_norm = engine.step(loss_model, optimizer, scheduler, cfg.optim.max_grad_norm)

        step_seen, labelled, pairs = (int(v) for v in engine.sum(torch.tensor(counts, device=engine.device).sum(dim=0)))
        tokens_seen += step_seen
        segment_tokens += step_seen
        elapsed = time.perf_counter() - t0
        metrics = {
            "train/loss": train_loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": step_seen / elapsed,
            "train/tokens_per_s_per_device": step_seen / elapsed / engine.world_size,
            "train/tokens": tokens_seen,
            **throughput(flops.step(step_seen, labelled, pairs), elapsed, engine.world_size, peak_flops),
        }
        if step % cfg.logger.log_every == 0 or step == max_steps or step == start_step + 1:
            peak, _ = peak_memory_bytes(engine.device)
            train_peak = max(train_peak, engine.max(peak))  # the fullest rank
            metrics["train/peak_mem_gib"] = train_peak / 2**30
            tracker.log(metrics, step=step)
        bar.set_postfix(progress_fields(metrics))
        bar.update(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < max_steps:
            mid = evaluate(loss_model, *eval_args)
            tracker.log(mid, step=step)
            bar.write(f"step {step}: {_fmt(mid)}")
        if engine.any(preemption.requested):  # every rank stops after the same step
            bar.close()
            write_checkpoint(step, f"preempted: {preemption.received.name if preemption.received else 'signal on another rank'}")
            tracker.preempted()
            tracker.finish()
            raise Preempted(step, preemption.received, preemption.previous_handler())
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < max_steps:
            write_checkpoint(step, "interval")
    bar.close()
    train_time = time.perf_counter() - started

    after = evaluate(loss_model, *eval_args)
    tracker.log(after, step=max_steps)
    adapter = write_checkpoint(max_steps, "end")
    results: dict[str, Any] = {
        "before": before,
        "after": after,
        "steps": max_steps,
        "resumed_from_step": start_step if saved else None,
        "train_tokens": tokens_seen,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(segment_tokens / max(train_time, 1e-9), 1),
        "tokens_per_s_per_device": round(segment_tokens / max(train_time, 1e-9) / engine.world_size, 1),
        # Over the logged training steps, the fullest rank: CUDA max_memory_allocated, or the process's peak RSS.
        "peak_memory": {"bytes": int(train_peak), "kind": peak_memory_bytes(engine.device)[1]},
        "flop_counts": asdict(flops),
        "data": asdict(stats),
        "param_bytes_rank0": held,
        "wandb": tracker.info,
    }
    if cfg.train.save_adapter and engine.is_main:
        results["adapter"] = str(save_adapter(engine.unwrap(loss_model).model, output_dir / "adapter", adapter))
    engine.barrier()
    if engine.is_main:
        log.info(
            "held-out evaluation (%d samples), before and after training:\n%s",
            stats.eval_rows,
            format_comparison(before, after),
        )
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        tracker.summary({f"final/{k}": v for k, v in after.items()})
        log.info("outputs in %s", output_dir)
    tracker.finish()
    return results


def restore_training_state(saved: dict[str, Any], engine: Any, model: Any, optimizer: Any, scheduler: Any, steps: Any) -> None:
    """Put a loaded checkpoint's optimizer, schedule, sampler position, loss scaler and random streams back."""
    state = saved["trainer_state"]
    engine.load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the schedule's state is restored, but the optimizer only hears of it at the next step
    steps.load_state_dict(state["sampler"])
    engine.load_scaler_state(optimizer, state.get("scaler"))
    rng = saved["rng"]
    if len(rng) != engine.world_size:
        log.warning(
            "resume: checkpoint written by %d ranks, resumed on %d: random streams are not continued",
            len(rng),
            engine.world_size,
        )
    engine.set_rng_state(rng[engine.rank % len(rng)])


def throughput(step_flops: dict[str, float], elapsed: float, devices: int, peak: float | None) -> dict[str, float]:
    """Achieved TFLOP/s per device on the frozen-base basis, and MFU on both bases when the device peak is known."""
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
        "tok/s/dev": f"{metrics['train/tokens_per_s_per_device']:,.0f}",
    }
    if "train/mfu" in metrics:
        out["mfu"] = f"{metrics['train/mfu']:.1%}"
    if "train/peak_mem_gib" in metrics:
        out["mem"] = f"{metrics['train/peak_mem_gib']:.1f}G"
    return out


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
    from dtune.preempt import REQUEUE_EXIT, Preempted, under_submitit, write_status

    stopped: Preempted | None = None
    with user_errors():
        cfg = to_dataclass(dict_cfg)
        validate(cfg)
        output_dir = job_output_dir(cfg)
        try:
            run(cfg, output_dir)
            write_status("done", cfg.train.max_steps, str(output_dir))
        except Preempted as err:
            log.warning(
                "stopped at step %d on %s: checkpoint written; exit %d asks the launcher to requeue",
                err.step,
                err.signal_name,
                REQUEUE_EXIT,
            )
            write_status("preempted", err.step, str(output_dir), err.signal_name)
            stopped = err
    # Under submitit the task returns (its result is recorded) and submitit's own handler requeues the job.
    submitit = under_submitit()
    shutdown_distributed(
        exit_code=REQUEUE_EXIT if stopped else 0, then=stopped.chain if stopped else None, exit_process=not submitit
    )
    if stopped and not submitit:
        raise SystemExit(REQUEUE_EXIT)


if __name__ == "__main__":
    from dtune.cli import offline_defaults

    offline_defaults()
    main()
