"""Checkpoints: atomic writes, which checkpoint a run resumes from, and exact resumption in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtune.checkpoint import (
    CHECKPOINTS,
    TRAINER_STATE,
    check_resumable,
    checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dtune.distributed.env import first_host, slurm_process_env
from dtune.errors import DtuneError
from dtune.train import run
from tests.helpers import compose_config, tiny_overrides


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(out) if "train/loss" in r}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


# 1.5 epochs of 4 steps (32 rows, 8 per step): 6 steps, a checkpoint every 2 (kept: all three), W&B offline.
FULL = [
    "optim.lr=1e-2",
    "train.max_steps=null",
    "train.epochs=1.5",
    "train.micro_batch_size=8",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "logger=wandb",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted reference: 1.5 epochs, so a resume from step 2 goes on mid-epoch and across an epoch."""
    out = tmp_path_factory.mktemp("full")
    return out, run(compose_config(tiny_overrides(out, *FULL)), out)


@pytest.mark.integration
def test_checkpoints_are_complete_and_kept_every_n_steps(full_run):
    out, results = full_run
    found = checkpoints(out / CHECKPOINTS)
    assert [step for step, _ in found] == [2, 4, 6]
    newest = load_checkpoint(found[-1][1])
    state = newest["trainer_state"]
    assert state["step"] == 6 and state["reason"] == "end"
    assert state["wandb_id"] == results["wandb"]["id"] and results["wandb"]["mode"] == "offline"
    # train.epochs=1.5 became 6 steps of the sampler's 4 per epoch; the LR schedule ran over those 6.
    assert (results["steps"], results["max_steps"], results["steps_per_epoch"], results["epochs"]) == (6, 6, 4, 1.5)
    assert (state["sampler"]["epoch"], state["sampler"]["index"]) == (1, 2) and state["scheduler"]["last_epoch"] == 6
    lrs = [r["train/lr"] for r in metrics(out) if "train/lr" in r]
    assert lrs[-1] == pytest.approx(1e-2 * 0.1) and lrs[-2] > lrs[-1]  # the cosine reaches min_lr_ratio at step 6
    assert [r["train/epoch"] for r in metrics(out) if "train/epoch" in r] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    # Named, full optimizer states: every trainable tensor with Adam's moments, and the step count.
    assert newest["optimizer"]["step"] == 6
    entry = next(iter(newest["optimizer"]["params"].values()))
    assert set(entry) == {"param", "exp_avg", "exp_avg_sq"}
    assert len(newest["rng"]) == 1 and "torch" in newest["rng"][0]
    # The checkpoint's adapter is the run's final adapter, and loads as PEFT.
    final = adapter(out)
    ckpt = load_file(found[-1][1] / "adapter" / "adapter_model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def stopped_after_step_2(ref: Path, out: Path) -> Path:
    """A copy of the finished run ``ref`` as if it had been stopped after step 2: its later checkpoints, results and
    adapter gone."""
    shutil.copytree(ref, out)
    for step, path in checkpoints(out / CHECKPOINTS):
        if step > 2:
            shutil.rmtree(path)
    for name in ("results.json", "adapter"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out


@pytest.mark.integration
def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(full_run, tmp_path: Path):
    """Stopped after step 2 (its later checkpoints and results lost), resumed with train.resume=auto mid-epoch: the
    same losses after step 2 (through the epoch boundary at step 4), the same adapter, and the same W&B run, exactly."""
    ref, ref_results = full_run
    out = stopped_after_step_2(ref, tmp_path / "resumed")
    # A writer killed half-way leaves a hidden temporary directory; resuming must ignore it.
    (out / CHECKPOINTS / ".step-00000004.tmp-dead").mkdir()

    results = run(compose_config(tiny_overrides(out, *FULL)), out)
    assert results["resumed_from_step"] == 2 and results["steps"] == 6
    assert train_losses(out) == train_losses(ref)  # exact: same floats
    epochs = [{k: r[k] for k in ("step", "train/epoch", "train/lr")} for r in metrics(out) if "train/epoch" in r]
    assert epochs == [{k: r[k] for k in ("step", "train/epoch", "train/lr")} for r in metrics(ref) if "train/epoch" in r]
    assert [r["step"] for r in metrics(out)] == [r["step"] for r in metrics(ref)]  # no step logged twice
    ours, theirs = adapter(out), adapter(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert results["after"] == ref_results["after"] and results["before"] == ref_results["before"]
    assert results["wandb"]["id"] == ref_results["wandb"]["id"]  # the same W&B run goes on
    assert not (out / CHECKPOINTS / ".step-00000004.tmp-dead").exists()  # cleaned by the next save


def stream_overrides(shards: Path) -> list[str]:
    """data.streaming over 2 JSONL shards of 24 rows (8 held out of the first): packed rows of 128 tokens tokenized by
    2 worker processes, 4 rows per step; 6 steps cross the end of the first pass; a checkpoint every 2."""
    return [
        "data=jsonl",
        f"data.source={shards}",
        "data.streaming=true",
        "data.train_size=null",
        "data.packing=true",
        "data.max_seq_len=128",
        "data.num_proc=2",
        "optim.lr=1e-2",
        "train.max_steps=6",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
    ]


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    shards = tmp_path_factory.mktemp("shards")
    for s in range(2):
        rows = [
            {"prompt": f"Shard {s}, review {i}: " + "fine " * (i % 7), "completion": ["positive", "negative"][i % 2]}
            for i in range(24)
        ]
        (shards / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("stream")
    return out, run(compose_config(tiny_overrides(out, *stream_overrides(shards))), out), shards


@pytest.mark.integration
def test_a_resumed_stream_equals_the_uninterrupted_run_bit_for_bit(stream_run, tmp_path: Path):
    """data.streaming: stopped after step 2, resumed: the same losses, epochs, counts and adapter, exactly; the stream
    went on from each rank's saved position (and the packed row begun), not from the start."""
    ref, ref_results, shards = stream_run
    assert ref_results["steps_per_epoch"] is None and 1.0 < ref_results["epochs"] < 2.0  # past the end of a pass
    data = ref_results["data"]
    assert data["packed_rows"] == 6 * 4 and data["eval_rows"] == 8 and data["train_rows"] > 6 * 4
    assert 0 < data["trained_tokens"] < data["tokens"] and 0 < data["pack_fill"] <= 1 and 0 <= data["padding"] < 1
    sampler = load_checkpoint(checkpoints(ref / CHECKPOINTS)[0][1])["trainer_state"]["sampler"]
    assert sampler["stream"] and len(sampler["ranks"]) == 1 and sampler["ranks"][0]["steps"] == 2
    out = stopped_after_step_2(ref, tmp_path / "resumed")

    results = run(compose_config(tiny_overrides(out, *stream_overrides(shards))), out)
    assert results["resumed_from_step"] == 2 and results["steps"] == 6
    assert train_losses(out) == train_losses(ref)
    assert [r["train/epoch"] for r in metrics(out) if "train/epoch" in r] == [
        r["train/epoch"] for r in metrics(ref) if "train/epoch" in r
    ]
    ours, theirs = adapter(out), adapter(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert results["after"] == ref_results["after"] and results["data"] == ref_results["data"]


@pytest.mark.integration
def test_changed_settings_refuse_to_resume(full_run, tmp_path: Path):
    ref, _ = full_run
    newest = checkpoints(ref / CHECKPOINTS)[-1][1]
    cfg = compose_config(tiny_overrides(tmp_path, "lora.r=4", "train.seed=3"))
    with pytest.raises(DtuneError, match=r"lora\.r: 16 in the checkpoint, 4 now.*train\.seed: 0 in the checkpoint, 3 now"):
        check_resumable(load_checkpoint(newest)["config"], cfg, newest)
    allowed = compose_config(tiny_overrides(tmp_path, "optim.lr=1e-2", "train.max_steps=12", "engine=zero2"))
    changed = check_resumable(load_checkpoint(newest)["config"], allowed, newest)
    assert "train.max_steps" in changed and "engine.zero_stage" in changed


def test_a_resume_with_the_moe_experts_quantized_otherwise_is_refused(tmp_path: Path):
    """quant.experts decides the frozen experts the adapter trains against (NF4 or 16-bit), as quant_type does for
    the linear layers: a resume that flipped it went on against another base with a warning only (and the
    before/after table compared two bases)."""
    from omegaconf import OmegaConf

    saved = OmegaConf.to_yaml(OmegaConf.structured(compose_config(tiny_overrides(tmp_path))))
    cfg = compose_config(tiny_overrides(tmp_path, "quant.experts=false"))
    with pytest.raises(DtuneError, match=r"quant\.experts: True in the checkpoint, False now"):
        check_resumable(saved, cfg, tmp_path / "ckpt")
    assert check_resumable(saved, compose_config(tiny_overrides(tmp_path, "quant.kernel=triton")), tmp_path) == ["quant.kernel"]


def test_a_run_with_an_unused_held_out_fraction_resumes_without_it(tmp_path: Path):
    """data.eval_fraction beside data.eval_source went unused and is refused now; a run of an older dtune that had
    both must resume without the fraction (was refused as changed data, and validation refused keeping it)."""
    from omegaconf import OmegaConf

    data = ["data.source=a.jsonl", "data.eval_source=b.jsonl"]
    saved = OmegaConf.to_yaml(OmegaConf.structured(compose_config(tiny_overrides(tmp_path, *data, "data.eval_fraction=0.1"))))
    assert check_resumable(saved, compose_config(tiny_overrides(tmp_path, *data)), tmp_path / "ckpt") == []
    with pytest.raises(DtuneError, match=r"data\.eval_fraction"):  # without a held-out file, the fraction is the split
        check_resumable(
            saved.replace("eval_source: b.jsonl", "eval_source: null"), compose_config(tiny_overrides(tmp_path)), tmp_path
        )


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / CHECKPOINTS / f"step-{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / TRAINER_STATE).write_text("{}")
    return path


def test_which_checkpoint_a_run_resumes_from(tmp_path: Path):
    run_dir = tmp_path / "run"
    assert find_resume_checkpoint("auto", run_dir) is None  # nothing yet: start fresh
    assert find_resume_checkpoint(None, run_dir) is None
    _fake_checkpoint(run_dir, 10)
    newest = _fake_checkpoint(run_dir, 20)
    _fake_checkpoint(run_dir, 30, complete=False)  # no trainer_state.json: never published
    (run_dir / CHECKPOINTS / ".step-00000040.tmp-abc").mkdir()
    assert find_resume_checkpoint("auto", run_dir) == newest
    assert find_resume_checkpoint(str(run_dir), tmp_path / "elsewhere") == newest  # a run dir
    older = run_dir / CHECKPOINTS / "step-00000010"
    assert find_resume_checkpoint(str(older), tmp_path / "elsewhere") == older  # a checkpoint
    with pytest.raises(DtuneError, match=r"train\.resume: null, but .* holds checkpoints \(newest: step 20\)"):
        find_resume_checkpoint(None, run_dir)
    with pytest.raises(DtuneError, match="neither a checkpoint nor a run directory"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path / "elsewhere")
    # Started from another run's checkpoint, stopped, requeued with the same arguments: its own checkpoints win.
    assert find_resume_checkpoint(str(tmp_path / "nope"), run_dir) == newest


def test_a_checkpoint_moved_aside_by_a_killed_save_is_put_back(tmp_path: Path):
    """Saving a step that exists (a finished run resumed) moves the old copy aside, publishes the new one, then deletes
    the old: killed in between, the old copy is whole and is restored before anything is chosen."""
    moved = _fake_checkpoint(tmp_path, 40)
    aside = moved.parent / ".step-00000040.tmp-old-123"
    moved.rename(aside)
    assert find_resume_checkpoint("auto", tmp_path) == moved and not aside.exists()


@pytest.mark.integration
def test_a_failed_save_leaves_the_previous_checkpoints_intact(full_run, tmp_path: Path, monkeypatch):
    ref, _ = full_run
    root = tmp_path / CHECKPOINTS
    shutil.copytree(ref / CHECKPOINTS, root)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    saved = load_checkpoint(checkpoints(root)[-1][1])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    newest = checkpoints(root)[-1][1]
    # The adapter is written first (a copy of the newest one here); the optimizer file then fails.
    monkeypatch.setattr("dtune.checkpoint.save_adapter", lambda model, dest, state: shutil.copytree(newest / "adapter", dest))
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(
            root,
            8,
            peft_model=None,
            adapter={},
            optimizer=saved["optimizer"],
            rng=saved["rng"],
            trainer_state=saved["trainer_state"],
            config_yaml=saved["config"],
            keep=1,
        )
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing published, nothing pruned, no temporary left behind
    assert not list(root.glob(".step-*"))


def test_slurm_tasks_become_torch_ranks():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }
    got = slurm_process_env(env)
    assert got == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert slurm_process_env({**env, "RANK": "0"}) == {}  # torchrun set them already
    assert slurm_process_env({**env, "SLURM_NTASKS": "1"}) == {}  # one process: nothing to rendezvous
    assert first_host("node1,node2") == "node1"
    assert first_host("a[10-12,20],b3") == "a10"
    assert first_host("gpu[3,5]") == "gpu3"


def test_a_lone_process_becomes_rank_0_of_1_unless_a_launcher_placed_it():
    from dtune.distributed.env import lone_process_env

    lone = lone_process_env({})
    assert {k: lone[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert 0 < int(lone["MASTER_PORT"]) < 65536
    assert lone_process_env({"MASTER_PORT": "29123"})["MASTER_PORT"] == "29123"
    assert lone_process_env({"LOCAL_RANK": "0"}) == {} and lone_process_env({"RANK": "3"}) == {}  # torchrun's
    assert lone_process_env({"OMPI_COMM_WORLD_SIZE": "4"}) == {}  # mpirun's: Accelerate reads those
    assert lone_process_env({"PMI_SIZE": "1"})["WORLD_SIZE"] == "1"


def test_deepspeed_on_cpu_counts_the_node_s_ranks_without_a_subprocess(monkeypatch):
    """DeepSpeed's CPU accelerator ran `numactl --hardware` at every ZeRO-3 gradient reduction when LOCAL_SIZE was
    unset (torchrun does not set it): a fork per step, and torch's deprecation warnings printed again at each one."""
    import subprocess

    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from dtune.distributed.env import deepspeed_cpu_env

    assert deepspeed_cpu_env({"LOCAL_WORLD_SIZE": "2"}) == {"LOCAL_SIZE": "2"}
    assert deepspeed_cpu_env({}) == {"LOCAL_SIZE": "1"}  # one process without a launcher
    assert deepspeed_cpu_env({"LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == {}  # DeepSpeed's launcher set it

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"DeepSpeed ran {args}")

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "check_output", no_subprocess)
    for key, value in deepspeed_cpu_env({"LOCAL_WORLD_SIZE": "2"}).items():
        monkeypatch.setenv(key, value)
    assert CPU_Accelerator().device_count() == 2
