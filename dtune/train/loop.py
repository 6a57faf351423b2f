"""The training loop: build the run, evaluate, step, log, checkpoint, evaluate again, save the adapter.

One explicit loop (:meth:`Trainer.fit`, ``while self.should_continue()``); one optimizer step is
:func:`dtune.train.step.train_step`; the learning rate schedule is stepped here, after each optimizer step;
checkpoints are the :class:`Checkpointer`'s; a preemption signal is honoured at a step boundary, in one place
(:meth:`Trainer.stop_if_preempted`); every evaluation of the trained adapter goes through :meth:`Trainer.judge`,
which keeps the best (``train.keep_best``) and decides an early stop (``train.early_stopping``).
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dtune.checkpoint import BEST_ADAPTER, export_prompt_format, save_adapter
from dtune.config import validate
from dtune.data.batching import StepSampler
from dtune.data.load import load_data
from dtune.data.stream import StreamSampler, stream_data
from dtune.distributed.engine import Engine
from dtune.distributed.preempt import Preempted, Preemption
from dtune.evaluate import evaluate
from dtune.flops import FlopCounts, device_peak_flops, peak_memory_bytes
from dtune.fsutil import OutputLock, atomic_write_text
from dtune.lora import lora_config
from dtune.model import build_model, load_tokenizer, model_dir
from dtune.optim import build_optimizer, build_scheduler
from dtune.plan.memory import check_fits
from dtune.preference import PreferenceLoss, precomputes_reference
from dtune.reference import attach as attach_reference
from dtune.report import comparison_table, format_metrics
from dtune.runtime import console_warnings_only, quiet_libraries, to_log_files
from dtune.schema import DtuneConfig
from dtune.tracking import NullTracker, Tracker
from dtune.train.best import METRIC_KEYS
from dtune.train.checkpointer import Checkpointer, Stateful
from dtune.train.length import RunLength
from dtune.train.metrics import progress_fields, throughput
from dtune.train.results import final_summary, run_results
from dtune.train.state import TrainState
from dtune.train.step import StepResult, train_step

log = logging.getLogger("dtune")


def run(cfg: DtuneConfig, output_dir: Path) -> dict[str, Any]:
    """Fine-tune per ``cfg``, writing everything into ``output_dir``. Returns the results written to results.json.

    Raises :class:`~dtune.errors.ConfigError` when another live run writes into ``output_dir`` (its lock names the
    holder), and :class:`~dtune.distributed.preempt.Preempted` when a preemption signal arrived: after writing a
    checkpoint if training had begun, at once if it arrived while the run was still setting up.
    """
    validate(cfg)
    lora_config(cfg, projections={"q_proj"})  # PEFT's own checks of the adapter settings, before anything loads
    quiet_libraries()
    engine = Engine(cfg)
    torch.manual_seed(cfg.train.seed)
    if not engine.is_main:
        console_warnings_only()
    lock = OutputLock(output_dir)

    def take_lock() -> None:  # rank 0 holds it; a refusal is raised on every rank
        lock.acquire()

    engine.on_main(take_lock)
    try:
        with Preemption() as preemption:  # from here on a stop signal is honoured at the next step boundary
            if engine.any(preemption.requested):  # received while starting: nothing loaded, nothing to save
                interrupted = engine.any(preemption.interrupted)
                raise Preempted(None, preemption.received, preemption.previous_handler(), interrupted, saved=False)
            # Every rank resolves the base first: a Hub model is downloaded once per node, by the first rank there, while
            # the others wait on its file lock (dtune.hub) -- not in a collective, which a long download would outlast.
            model_dir(cfg)
            # Know before loading: the memory plan (rank 0, sent to all), refusing a config predicted not to fit.
            table = engine.on_main(lambda: check_fits(cfg, engine.world_size))
            if table:
                log.info("memory plan (per GPU):\n%s", table)
            return Trainer(cfg, output_dir, engine, preemption).fit()
    finally:
        lock.release()


class Trainer:
    """One run of the loop. Built by :meth:`setup`; :meth:`fit` trains for the run's length (``train.max_steps`` or
    ``train.epochs``) or until it stops early, and finishes."""

    def __init__(self, cfg: DtuneConfig, output_dir: Path, engine: Engine, preemption: Preemption) -> None:
        self.cfg, self.output_dir, self.engine, self.preemption = cfg, output_dir, engine, preemption
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.checkpointer = Checkpointer(cfg, output_dir, engine, self.config_yaml)

    def setup(self) -> None:
        """Data, model, optimizer, schedule and data order; the checkpoint's state put back when resuming."""
        cfg, engine = self.cfg, self.engine
        resume = self.checkpointer.load()
        self.tokenizer = tokenizer = load_tokenizer(cfg)
        self.pad_id = pad_id = tokenizer.pad_token_id
        if cfg.data.streaming:  # rows read and tokenized as the run goes; data_stats is updated as the stream goes
            stream, self.eval_set, self.data_stats = stream_data(
                cfg, tokenizer, pad_id, engine.rank, engine.world_size, engine.gather_objects
            )
        else:
            train_set, self.eval_set, self.data_stats = load_data(cfg.data, tokenizer, engine)  # logs what it holds
        model = build_model(cfg, engine.load_device)
        self.flops = FlopCounts.of(model)
        self.peak_flops = device_peak_flops(cfg.train.precision, cfg.train.peak_tflops)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if engine.is_main:  # written once the inputs proved good: a run that fails on bad input overwrites nothing
            atomic_write_text(self.output_dir / "config_resolved.yaml", self.config_yaml)
        # FSDP2 shards here; the optimizer must see the sharded params.
        loss_model = engine.shard(PreferenceLoss.of(cfg, model))
        if cfg.data.streaming:
            sampler: StepSampler | StreamSampler = stream
            self.length = RunLength.of(cfg, None)
            log.info("run length: %s", self.length.describe(None, sampler.per_step))
        else:
            sampler = StepSampler(
                train_set,
                cfg.train.micro_batch_size,
                cfg.train.grad_accum_steps,
                cfg.train.seed,
                self.pad_id,
                engine.rank,
                engine.world_size,
                cfg.data.max_seq_len,
            )
            # The one run length the schedule, the progress bar, the loop and results.json go by.
            self.length = RunLength.of(cfg, sampler.steps_per_epoch)
            log.info("run length: %s", self.length.describe(len(train_set), sampler.per_step))
            self.data_stats.padding = sampler.padding()
            log.info("data: %.1f%% of the first epoch's micro-batch positions are padding", 100 * self.data_stats.padding)
        optimizer = build_optimizer(loss_model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, self.length.max_steps)
        loss_model, optimizer = engine.prepare(loss_model, optimizer)
        if precomputes_reference(cfg):  # before a checkpoint's adapter is put back: the reference is the start's
            sets = {"training": train_set, "held-out": self.eval_set}
            attach_reference(loss_model, sets, cfg, engine, pad_id, model_dir(cfg))
        self.parts = Stateful(loss_model, optimizer, scheduler, sampler)
        self.held = engine.local_bytes(loss_model)
        log.info(
            "rank %d holds %.1f MiB of frozen and %.2f MiB of trainable parameters (%s)",
            engine.rank,
            self.held["frozen"] / 2**20,
            self.held["trainable"] / 2**20,
            cfg.engine.strategy,
        )
        self.state = self.checkpointer.restore(*resume, self.parts) if resume else TrainState()
        self.start_step = self.state.step
        if engine.is_main:
            self.tracker: Tracker | NullTracker = Tracker(
                cfg, self.output_dir, resume_step=self.state.resumed_from_step, run_id=self.state.wandb_id
            )
        else:
            self.tracker = NullTracker()
        self.state.wandb_id = self.tracker.run_id

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        return evaluate(
            self.parts.model, self.eval_set, cfg.train.eval_batch_size, self.pad_id, self.engine, cfg.data.max_seq_len
        )

    def fit(self) -> dict[str, Any]:
        self.setup()
        if self.state.before is None:
            self.state.before = self.evaluate()
            self.tracker.log(self.state.before, step=0)
            log.info("eval before training: %s", format_metrics(self.state.before))
        self.bar = tqdm(
            total=self.length.max_steps,
            initial=self.state.step,
            desc="train",
            disable=not (self.engine.is_main and self.cfg.logger.progress),
            dynamic_ncols=True,
        )
        if self.engine.device.type == "cuda":  # peak memory of the training steps, not of loading or evaluation
            torch.cuda.reset_peak_memory_stats(self.engine.device)
        started = time.perf_counter()
        self.preemption.arm()  # a Ctrl-C from here on waits for the step boundary and a checkpoint
        self.stop_if_preempted()
        while self.should_continue():
            self.step()
            self.stop_if_preempted()
            if self.should_continue() and self.checkpointer.due(self.state.step):
                self.checkpointer.save(self.state, self.parts, "interval")
        self.bar.close()
        return self.finish(time.perf_counter() - started)

    def should_continue(self) -> bool:
        """Steps left to train, and no early stop."""
        return self.state.step < self.length.max_steps and not self.stopped_early()

    def stopped_early(self) -> bool:
        """train.early_stopping's patience has run out (the same on every rank: :meth:`judge`)."""
        return self.state.best.exhausted(self.cfg.train.early_stopping)

    def step(self) -> None:
        """One optimizer step, the schedule's step, the metrics and the progress bar; a mid-run evaluation when due."""
        t0 = time.perf_counter()
        lr = self.parts.scheduler.get_last_lr()[0]
        parts, cfg = self.parts, self.cfg
        result = train_step(
            parts.model, parts.optimizer, next(parts.sampler), self.engine, cfg.optim.max_grad_norm, cfg.train.objective
        )
        self.parts.scheduler.step()
        state = self.state
        state.step += 1
        state.tokens_seen += result.tokens
        state.segment_tokens += result.tokens
        metrics = self.step_metrics(result, lr, time.perf_counter() - t0)
        self.bar.set_postfix(progress_fields(metrics))
        self.bar.update(1)
        every = self.cfg.train.eval_every
        if every and state.step % every == 0 and state.step < self.length.max_steps:
            mid = self.evaluate()
            self.tracker.log(mid, step=state.step)
            self.say(f"step {state.step}: {format_metrics(mid)}")
            self.judge(mid)
            if self.stopped_early():
                es = self.cfg.train.early_stopping
                self.say(
                    f"step {state.step}: early stop: {METRIC_KEYS[es.metric]} has not improved by more than "
                    f"{es.min_delta:g} for {es.patience} evaluations (best {state.best.value:.4f} at step {state.best.step})"
                )

    def say(self, text: str) -> None:
        """A line above the progress bar, from rank 0 only (tqdm's write prints even where the bar is disabled, so every
        rank printed each mid-run evaluation), and in every rank's log file."""
        if self.engine.is_main:
            self.bar.write(text)
        to_log_files(log, text)  # every rank's log file holds it

    def judge(self, metrics: dict[str, float]) -> None:
        """Take the evaluation of the adapter at this step into account: the best so far and the patience count, and
        ``best_adapter/`` when it is the new best. Collective.

        The metrics are all-reduced sums, the same on every rank; the verdict is still made on rank 0 and sent to all,
        so that every rank stops at the same step whatever the floating point does.
        """
        step, es = self.state.step, self.cfg.train.early_stopping
        self.state.last_eval = {"step": step, "metrics": metrics}
        if not (es.enabled or self.cfg.train.keep_best):
            return
        previous = self.state.best
        self.state.best = self.engine.on_main(lambda: previous.after(metrics, step, es))
        if self.state.best.step == step and self.cfg.train.keep_best:
            tensors = self.checkpointer.adapter(self.parts)  # collective: full tensors, as the final adapter's
            if self.engine.is_main:
                self.write_adapter(BEST_ADAPTER, tensors)
                log.info("step %d: best %s so far (%.4f): adapter in %s", step, es.metric, self.state.best.value, BEST_ADAPTER)
            self.engine.barrier()

    def step_metrics(self, result: StepResult, lr: float, elapsed: float) -> dict[str, float]:
        """The step's figures, logged every ``logger.log_every`` steps, on the first and on the last."""
        state, world, r = self.state, self.engine.world_size, result
        flops = self.flops.step(r.tokens, r.labelled, r.attention_pairs, r.reference, r.policy_scored)
        metrics = {
            "train/loss": result.loss,
            "train/lr": lr,
            "train/grad_norm": result.grad_norm,
            "train/tokens_per_s": result.tokens / elapsed,
            "train/tokens_per_s_per_device": result.tokens / elapsed / world,
            "train/tokens": state.tokens_seen,
            "train/epoch": self.parts.sampler.epochs_done,  # passes over the training samples, fractional
            **throughput(flops, elapsed, world, self.peak_flops),
            **{f"train/{k}": v for k, v in (result.stats or {}).items()},
        }
        step = state.step
        if step % self.cfg.logger.log_every == 0 or step == self.length.max_steps or step == self.start_step + 1:
            peak, _ = peak_memory_bytes(self.engine.device)
            state.peak_memory = max(state.peak_memory, self.engine.max(peak))  # the fullest rank
            metrics["train/peak_mem_gib"] = state.peak_memory / 2**30
            self.tracker.log(metrics, step=step)
        return metrics

    def stop_if_preempted(self) -> None:
        """The one preemption exit: when any rank received a stop signal, every rank stops here, after writing a
        checkpoint if this process trained a step (a signal while setting up leaves nothing new to save).

        Raises :class:`~dtune.distributed.preempt.Preempted`.
        """
        if not self.engine.any(self.preemption.requested):
            return
        self.bar.close()
        saved = self.state.step > self.start_step
        if saved:
            why = self.preemption.received.name if self.preemption.received else "signal on another rank"
            self.checkpointer.save(self.state, self.parts, f"preempted: {why}")
        self.tracker.preempted()
        self.tracker.finish()
        interrupted = self.engine.any(self.preemption.interrupted)  # Ctrl-C on any rank: no rank asks for a requeue
        raise Preempted(self.state.step, self.preemption.received, self.preemption.previous_handler(), interrupted, saved)

    def write_adapter(self, name: str, tensors: dict[str, torch.Tensor] | None) -> Path:
        """``<output_dir>/<name>``: a PEFT adapter folder of the full adapter ``tensors``, with the tokenizer and how
        prompts were rendered beside it (:func:`~dtune.checkpoint.export_prompt_format`). Rank 0."""
        model = self.engine.unwrap(self.parts.model).model
        return save_adapter(model, self.output_dir / name, tensors, partial(export_prompt_format, self.cfg, self.tokenizer))

    def finish(self, train_time: float) -> dict[str, Any]:
        """Evaluate after training (or early stop), write the final checkpoint, the adapter and results.json; the
        before/after table."""
        state, engine = self.state, self.engine
        if state.last_eval and state.last_eval["step"] == state.step:
            after = state.last_eval["metrics"]  # stopped right after evaluating: the same adapter
        else:
            after = self.evaluate()
            self.tracker.log(after, step=state.step)
            self.judge(after)
        # Patience run out before the last step (the final evaluation may run it out too, but then nothing was cut).
        stopped_early = self.stopped_early() and state.step < self.length.max_steps
        if stopped_early:
            log.info("stopped early at step %d of %d (train.early_stopping)", state.step, self.length.max_steps)
        adapter = self.checkpointer.save(state, self.parts, "end")
        if isinstance(self.parts.sampler, StreamSampler):  # each rank counted its own share
            self.data_stats = self.parts.sampler.run_stats()
        results = run_results(self, after, stopped_early, train_time)
        if self.cfg.train.save_adapter and engine.is_main:
            results["adapter"] = str(self.write_adapter("adapter", adapter))
        engine.barrier()
        if engine.is_main:
            table = comparison_table([("held-out", state.before or {}, after)])
            log.info("held-out evaluation (%d samples), before and after training:\n%s", self.data_stats.eval_rows, table)
            atomic_write_text(self.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
            self.tracker.summary(final_summary(self, results))
            log.info("outputs in %s", self.output_dir)
        self.tracker.finish()
        return results
