"""How long a run trains: train.epochs as the sampler counts them, and early stopping with the best adapter kept
(stopped at the same step and with the same best when resumed from before the stop)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtune.checkpoint import BEST_ADAPTER, CHECKPOINTS, checkpoints
from dtune.config import validate
from dtune.data import StepSampler
from dtune.data.examples import Example
from dtune.errors import ConfigError
from dtune.schema import EarlyStoppingConfig
from dtune.train import run
from dtune.train.best import Best
from dtune.train.length import RunLength
from tests.helpers import ENV, SMOKE, compose_config, metrics, tiny_overrides, torchrun, train_records

# --------------------------------------------------------------------------------------------- train.epochs


def _examples(n: int) -> list[Example]:
    return [Example([1, 2, 3], [1, 2, 3], 1) for _ in range(n)]


@pytest.mark.parametrize(
    "samples, micro, accum, world, epochs, steps",
    [
        (32, 4, 1, 1, 1.5, 12),  # 8 steps per epoch
        (33, 4, 2, 2, 1.0, 2),  # 16 samples per step over 2 ranks: 2 steps, 1 sample never drawn
        (30, 4, 1, 1, 0.3, 3),  # 7 steps per epoch x 0.3 = 2.1: the started step is trained
        (40, 4, 1, 1, 0.3, 3),  # 10 x 0.3 is 3.0000000000000004 in floats: still 3 steps
        (8, 8, 1, 1, 0.01, 1),  # never 0 steps
    ],
)
def test_epochs_become_steps_as_the_sampler_draws_them(samples, micro, accum, world, epochs, steps):
    sampler = StepSampler(_examples(samples), micro, accum, seed=0, pad_id=0, world_size=world)
    cfg = compose_config(["train.max_steps=null", f"train.epochs={epochs}", "optim.warmup_steps=0"])
    length = RunLength.of(cfg, sampler.steps_per_epoch)
    assert length.max_steps == steps and length.source == f"train.epochs={epochs:g}"
    # The sampler's own count: after one epoch of steps it is at the start of the next pass.
    for _ in range(sampler.steps_per_epoch):
        next(sampler)
    assert sampler.epochs_done == 1.0
    next(sampler)
    assert (sampler.epoch, sampler.index) == (1, 1)


def test_run_length_without_epochs_and_its_refusals():
    cfg = compose_config(["train.max_steps=10"])
    assert RunLength.of(cfg, 4).max_steps == 10 and RunLength.of(cfg, 4).epochs == 2.5
    neither = compose_config(["train.max_steps=null"])
    assert RunLength.of(neither, 4).max_steps == 4  # one epoch: the default job's length
    assert RunLength.of(neither, 4).source == "train.epochs (default 1)"
    short = compose_config(["train.max_steps=null", "train.epochs=1", "optim.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 5 exceeds the 4 steps of train\.epochs=1"):
        RunLength.of(short, 4)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 100 exceeds the 4 steps of train\.epochs \(default 1\)"):
        RunLength.of(compose_config(["train.max_steps=null", "optim.warmup_steps=100"]), 4)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: 100 exceeds train\.max_steps \(20\)"):  # known at start
        validate(compose_config(["train.max_steps=20", "optim.warmup_steps=100"]))


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["train.max_steps=10", "train.epochs=2"], ["train.epochs and train.max_steps: both set", "train.max_steps=null"]),
        (["debug=smoke", "train.epochs=2"], ["train.epochs and train.max_steps: both set (2.0 and 3)"]),
        (["train.epochs=-1"], ["train.epochs: must be > 0"]),
        (["train.early_stopping.enabled=true", "train.eval_every=0"], ["train.eval_every: is 0", "early_stopping.enabled"]),
        (["train.keep_best=true", "train.eval_every=0"], ["train.eval_every: is 0", "train.keep_best"]),
        (["train.keep_best=true", "train.early_stopping.metric=accuracy", "data.choices=null"], ["only with data.choices"]),
        (["train.early_stopping.metric=bleu"], ["train.early_stopping.metric: must be one of loss, accuracy"]),
        (["train.early_stopping.patience=0"], ["train.early_stopping.patience: must be > 0"]),
    ],
)
def test_length_and_early_stopping_settings_are_checked(overrides: list[str], needles: list[str]):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for needle in needles:
        assert needle in str(err.value)


def test_accuracy_is_a_valid_metric_with_an_answer_set():
    validate(compose_config(["train.early_stopping.enabled=true", "train.early_stopping.metric=accuracy"]))
    validate(compose_config(["train.max_steps=null", "train.epochs=0.5"]))  # the default job by epochs


# --------------------------------------------------------------------------------------------- the best, patience


def test_best_and_patience_follow_the_keras_rule():
    cfg = EarlyStoppingConfig(enabled=True, patience=2, min_delta=0.05)
    best = Best()
    trace = []
    for step, loss in [(2, 3.0), (4, 2.5), (6, 2.48), (8, 2.6), (10, 2.4), (12, 2.39), (14, float("nan"))]:
        best = best.after({"eval/loss": loss}, step, cfg)
        trace.append((best.step, best.value, best.stale, best.exhausted(cfg)))
    assert best.metric == "loss" and trace == [
        (2, 3.0, 0, False),
        (4, 2.5, 0, False),
        (6, 2.48, 1, False),  # better (the best adapter moves) but by less than min_delta: patience runs
        (6, 2.48, 2, True),
        (10, 2.4, 0, False),  # 0.08 better than the best before it
        (12, 2.39, 1, False),
        (12, 2.39, 2, True),  # a diverged evaluation never improves
    ]
    acc = replace(cfg, metric="accuracy", min_delta=0.0)
    best = (
        Best().after({"eval/accuracy": 0.5}, 1, acc).after({"eval/accuracy": 0.75}, 2, acc).after({"eval/accuracy": 0.75}, 3, acc)
    )
    assert (best.step, best.value, best.stale) == (2, 0.75, 1)  # higher is better; a tie keeps the earlier
    assert not best.exhausted(replace(acc, enabled=False, patience=1))  # keep_best alone never stops a run
    assert Best.from_state(json.loads(json.dumps(best.state_dict()))) == best
    switched = best.after({"eval/loss": 9.0, "eval/accuracy": 0.5}, 4, cfg)  # judged by loss now (changed on resume)
    assert (switched.step, switched.value, switched.stale, switched.metric) == (4, 9.0, 0, "loss")


# --------------------------------------------------------------------------------------------- early stopping runs

# The tiny model at lr 1e-2 on 32 rows: held-out loss falls for two evaluations, then stops improving (measured:
# 10.468 at step 2, 10.424 at 4, 10.452 at 6, 10.431 at 8): with patience 2 it stops at step 8 of 20.
STOP = [
    "optim.lr=1e-2",
    "train.max_steps=20",
    "train.eval_every=2",
    "train.early_stopping.enabled=true",
    "train.early_stopping.patience=2",
    "train.keep_best=true",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stopped")
    return out, run(compose_config(tiny_overrides(out, *STOP)), out)


def evals(out: Path) -> dict[int, float]:
    """Held-out losses of the trained adapter by step (the evaluation before training left out)."""
    return {r["step"]: r["eval/loss"] for r in metrics(out) if "eval/loss" in r and r["step"] > 0}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.integration
def test_a_run_that_stops_improving_stops_early_and_keeps_its_best_adapter(stopped_run):
    from peft import PeftModel

    from dtune.adapters import load_trained, locate
    from dtune.data.load import load_data
    from dtune.distributed.engine import Engine
    from dtune.evaluate import evaluate
    from dtune.loss import CompletionLoss
    from dtune.model import load_tokenizer

    out, results = stopped_run
    losses = evals(out)
    stop, best = results["steps"], results["best"]
    assert results["stopped_early"] and stop < results["max_steps"] == 20
    # Stopped at the evaluation that ran out the patience: two evaluations after the best, none better.
    assert best["metric"] == "eval/loss" and best["value"] == min(losses.values()) == losses[best["step"]]
    assert sorted(s for s in losses if s > best["step"]) == [best["step"] + 2, best["step"] + 4] and max(losses) == stop
    # The run ended properly: the final evaluation (the stop step's), checkpoint, adapter, results, no step beyond.
    assert results["after"]["eval/loss"] == losses[stop]
    assert max(r["step"] for r in train_records(out)) == stop
    assert [r["train/epoch"] for r in train_records(out)][-1] == pytest.approx(stop / 8) == results["epochs"]
    newest_step, newest = checkpoints(out / CHECKPOINTS)[-1]
    assert newest_step == stop and json.loads((newest / "trainer_state.json").read_text())["reason"] == "end"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    # best_adapter: a complete PEFT adapter folder (tokenizer and prompt format beside it, like adapter/), not the
    # final adapter, which loads with PeftModel.from_pretrained and evaluates to the recorded best.
    folder = out / BEST_ADAPTER
    assert best["adapter"] == str(folder)
    assert {"adapter_config.json", "prompt_format.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    kept, final = tensors(folder), tensors(out / "adapter")
    assert kept.keys() == final.keys() and any(not torch.equal(kept[k], final[k]) for k in kept)
    trained = locate(folder)
    model = load_trained(trained, torch.device("cpu"))
    assert isinstance(model, PeftModel)
    tokenizer = load_tokenizer(trained.cfg)
    _, held_out, _ = load_data(trained.cfg.data, tokenizer)
    engine = Engine(replace(trained.cfg, logger=replace(trained.cfg.logger, wandb=False)))
    got = evaluate(CompletionLoss(model), held_out, 8, tokenizer.pad_token_id, engine)
    assert got["eval/loss"] == pytest.approx(best["value"], rel=1e-5)
    assert not math.isclose(got["eval/loss"], losses[stop], rel_tol=1e-5)


@pytest.mark.integration
def test_resumed_before_the_stop_it_keeps_the_best_and_stops_at_the_same_step(stopped_run, tmp_path: Path):
    """From a checkpoint after the best and before the stop, in another output dir: the best so far, its adapter
    (put back from the checkpoint) and the patience count go on, and the run stops where the uninterrupted one did."""
    ref, ref_results = stopped_run
    best_step, stop = ref_results["best"]["step"], ref_results["steps"]
    between = [path for step, path in checkpoints(ref / CHECKPOINTS) if best_step < step < stop]
    assert between, f"no checkpoint between the best (step {best_step}) and the stop (step {stop})"
    out = tmp_path / "resumed"
    results = run(compose_config(tiny_overrides(out, *STOP, f"train.resume={between[-1]}")), out)
    assert results["resumed_from_step"] < stop
    assert results["stopped_early"] and results["steps"] == stop
    assert results["best"] == {**ref_results["best"], "adapter": str(out / BEST_ADAPTER)}
    assert results["after"] == ref_results["after"]  # resumed exactly
    for name in (BEST_ADAPTER, "adapter"):
        ours, theirs = tensors(out / name), tensors(ref / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # Started again once it has stopped: nothing more is trained, the outcome stands.
    shutil.rmtree(out / BEST_ADAPTER)  # put back from the end checkpoint
    again = run(compose_config(tiny_overrides(out, *STOP)), out)
    assert again["resumed_from_step"] == stop and again["steps"] == stop and again["stopped_early"]
    assert again["best"] == results["best"] and again["after"] == results["after"]
    assert torch.equal(*(next(iter(tensors(d / BEST_ADAPTER).values())) for d in (out, ref)))


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_two_sharded_ranks_stop_together_and_gather_the_best_adapter(stopped_run, tmp_path: Path, engine: str):
    """2 ranks with parameters sharded (the same global batch: 2 x 2 samples): every rank stops at the one-rank run's
    step (a rank that went on alone would hang at its next collective), and best_adapter holds the whole adapter."""
    ref, ref_results = stopped_run
    out = tmp_path / engine
    overrides = [*SMOKE, *STOP, "train.micro_batch_size=2", f"engine={engine}", f"hydra.run.dir={out}"]
    cmd = [*torchrun(2), "-m", "dtune.train", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_early"] and results["steps"] == ref_results["steps"]
    # Each mid-run evaluation and the early stop are told once, by rank 0 (every rank printed them).
    said = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(said) == len(set(said)) == results["steps"] // 2 + 1, said
    for name in ("dtune.log", "dtune_rank1.log"):  # and written into every rank's log file (they were not)
        logged = (out / name).read_text()
        assert all(f"] - {line}\n" in logged for line in said), name
    assert results["best"]["step"] == ref_results["best"]["step"]
    assert results["best"]["value"] == pytest.approx(ref_results["best"]["value"], abs=1e-5)
    ours, theirs = tensors(out / BEST_ADAPTER), tensors(ref / BEST_ADAPTER)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=5e-5)  # summation order
