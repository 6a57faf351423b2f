"""Hydra sweeps: a local 2-run multirun with its W&B group and summary table; the Slurm launcher's sbatch script,
rendered here without Slurm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dtune.config import conf_dir
from dtune.sweep import format_table, summarize
from tests.helpers import ENV


@pytest.mark.integration
def test_local_multirun_runs_each_combination_in_one_wandb_group_and_writes_a_summary(tmp_path: Path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "dtune.train",
        "--multirun",
        "debug=smoke",
        "train.precision=fp32",
        "logger=wandb",
        "optim.lr=1e-4,1e-2",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = {d.name: json.loads((d / "results.json").read_text()) for d in (sweep / "0", sweep / "1")}
    groups = {r["wandb"]["group"] for r in results.values()}
    assert groups == {str(sweep)}, "the runs of one sweep share one W&B group"
    # Named by their overrides (Hydra writes the swept values normalised: 1e-4 -> 0.0001).
    assert "optim.lr=0.0001" in results["0"]["wandb"]["name"] and "optim.lr=0.01" in results["1"]["wandb"]["name"]
    assert results["0"]["wandb"]["id"] != results["1"]["wandb"]["id"]

    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["swept"] for r in rows] == ["optim.lr=0.01", "optim.lr=0.0001"]  # lr 1e-2 learns more in 3 steps
    losses = [r["eval_loss"] for r in rows]
    assert losses == sorted(losses)
    assert losses == [results["1"]["after"]["eval/loss"], results["0"]["after"]["eval/loss"]]
    table = (sweep / "summary.md").read_text()
    assert "| 1 | 1 | `optim.lr=0.01` |" in table and "| 2 | 0 | `optim.lr=0.0001` |" in table
    assert "All runs: `debug=smoke logger=wandb train.precision=fp32`" in table


def test_summary_lists_stopped_and_failed_runs_after_finished_ones(tmp_path: Path):
    for name, result, checkpoint in (("0", None, True), ("1", 2.5, False), ("2", 1.5, False), ("3", None, False)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- lora.r={name}\n- debug=smoke\n")
        if result is not None:
            (job / "results.json").write_text(
                json.dumps({"after": {"eval/loss": result}, "before": {"eval/loss": 3.0}, "steps": 5})
            )
        if checkpoint:
            (job / "checkpoints" / "step-00000040").mkdir(parents=True)
    rows = summarize(tmp_path)
    assert [(r["run"], r["status"]) for r in rows] == [
        ("2", "done"),
        ("1", "done"),
        ("0", "stopped at step-00000040"),
        ("3", "failed"),
    ]
    assert "| 1 | 2 | `lora.r=2` | 1.5000 | 3.0000 |" in format_table(rows)


def test_slurm_launcher_config_renders_the_sbatch_script(tmp_path: Path, monkeypatch):
    """`launcher=slurm` composes, instantiates hydra-submitit-launcher, and yields this sbatch script (submitit
    refuses to start without `srun` on PATH: a stand-in is put there; nothing is submitted)."""
    import submitit
    from hydra.utils import instantiate

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{ENV['PATH']}")
    sweep = tmp_path / "sweep"
    overrides = [
        "launcher=slurm",  # selects hydra/launcher=slurm
        "hydra.launcher.partition=a100",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=4",
        "hydra.launcher.timeout_min=600",
        f"hydra.sweep.dir={sweep}",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 4  # one process per GPU
    assert cfg.hydra.callbacks.sweep_summary._target_ == "dtune.sweep.SweepSummary"

    submitted: dict[str, object] = {}

    def capture(executor, fn, *args):
        submitted["executor"], submitted["jobs"] = executor, list(zip(*args, strict=True))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["optim.lr=1e-4", "lora.r=8"], ["optim.lr=2e-4", "lora.r=8"]], initial_job_idx=0)
    assert [job[0] for job in submitted["jobs"]] == [["optim.lr=1e-4", "lora.r=8"], ["optim.lr=2e-4", "lora.r=8"]]
    script = submitted["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    for line in (
        "#SBATCH --partition=a100",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@180",  # dtune checkpoints on USR2, then submitit requeues
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={sweep}/.submitit/%j/%j_0_log.out",
        "export OMP_NUM_THREADS=8",
    ):
        assert line in script, f"{line} not in:\n{script}"
    assert submitted["executor"]._executor.max_num_timeout == 20  # requeued after time limits too


@pytest.mark.integration
def test_optuna_sweep_returns_each_trials_eval_loss_and_the_summary_ranks_the_trials(tmp_path: Path):
    """`sweeper=optuna`: 3 trials of the smoke run, seeded TPE over a log-float lr and a choice of lora.r, in batches
    of 2. Optuna's best trial is the one whose results.json holds the lowest eval loss, with that value: the task
    returned each trial's eval loss. (Optuna 2.10's SQLite storage fails under SQLAlchemy 2, so the study stays in
    memory and optimization_results.yaml is what it leaves.)"""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dtune.train", "--multirun", "sweeper=optuna", "hydra.sweeper.n_trials=3"]
    cmd += ["hydra.sweeper.n_jobs=2", "debug=smoke", "train.precision=fp32", "logger=wandb", f"hydra.sweep.dir={sweep}"]
    cmd += ["optim.lr=tag(log,interval(1e-4,1e-1))", "lora.r=choice(4,8,16)"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    jobs = ("0", "1", "2")
    assert not (sweep / "3").exists()
    results = {j: json.loads((sweep / j / "results.json").read_text()) for j in jobs}
    sampled = {}
    for j in jobs:
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(sweep / j / ".hydra" / "overrides.yaml"))
        config = OmegaConf.load(sweep / j / ".hydra" / "config.yaml")
        assert float(overrides["optim.lr"]) == config.optim.lr and int(overrides["lora.r"]) == config.lora.r
        assert 1e-4 <= config.optim.lr <= 1e-1 and config.lora.r in (4, 8, 16)
        sampled[j] = (config.optim.lr, config.lora.r)
        assert results[j]["wandb"]["group"] == str(sweep)  # every trial in the sweep's W&B group
    assert len(set(sampled.values())) == 3, sampled

    losses = {j: results[j]["after"]["eval/loss"] for j in jobs}
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["run"] for r in rows] == sorted(jobs, key=losses.get)
    assert [r["objective"] for r in rows] == sorted(losses.values())
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    winner = rows[0]["run"]
    assert best.best_value == losses[winner]
    assert (best.best_params["optim.lr"], best.best_params["lora.r"]) == sampled[winner]
    assert "Optuna's best trial (`optimization_results.yaml`)" in (sweep / "summary.md").read_text()


@pytest.mark.integration
def test_optuna_trial_with_a_bad_value_stops_the_sweep_naming_the_field(tmp_path: Path):
    """A sampled value dtune refuses is the user's search space at fault: the sweep stops at that trial with the
    one-line error (exit 2), before any training, instead of recording a failure and sampling on."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dtune.train", "--multirun", "sweeper=optuna", "hydra.sweeper.n_trials=3"]
    cmd += ["debug=smoke", f"hydra.sweep.dir={sweep}", "lora.r=choice(0,-1)"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "dtune: error: invalid config:\n  lora.r: must be > 0" in proc.stderr
    assert not (sweep / "0" / "results.json").exists() and not (sweep / "1").exists()


def test_sweep_objective_is_the_kept_best_eval_loss_else_the_final_one(tmp_path: Path):
    from dtune.sweep import objective, write_summary

    assert objective({"after": {"eval/loss": 2.0}}) == 2.0
    # What the loop writes (train.keep_best / early stopping): the metric judged and its best value.
    assert objective({"after": {"eval/loss": 2.0}, "best": {"metric": "eval/loss", "value": 1.5, "step": 40}}) == 1.5
    # Judged by accuracy: the best's loss is unknown, the final loss ranks.
    assert objective({"after": {"eval/loss": 2.0}, "best": {"metric": "eval/accuracy", "value": 0.9}}) == 2.0
    assert objective({"after": {"eval/loss": float("nan")}}) == float("inf")  # diverged: the worst, not an error
    assert objective({"after": {}}) is None and objective({}) is None
    for name, data in (
        ("0", {"after": {"eval/loss": 1.0}}),
        ("1", {"after": {"eval/loss": 2.0}, "best": {"metric": "eval/loss", "value": 0.5}}),
    ):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={name}\n")
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    (tmp_path / "optimization_results.yaml").write_text("name: optuna\nbest_params:\n  optim.lr: 1\nbest_value: 0.5\n")
    rows = write_summary(tmp_path)
    assert [(r["run"], r["objective"]) for r in rows] == [("1", 0.5), ("0", 1.0)]
    table = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1 | `optim.lr=1` | 2.0000 | - | 0.5000 |" in table
    assert "Optuna's best trial (`optimization_results.yaml`): `optim.lr=1`, objective 0.5." in table


def test_optuna_sweeper_option_is_seeded_tpe_minimising_and_batches_on_slurm():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["sweeper=optuna", "launcher=slurm", "hydra.sweeper.n_jobs=8"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert sweeper.n_jobs == 8 and cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_the_summary_reads_runs_that_wrote_to_their_own_output_dir(tmp_path: Path):
    """A sweep whose runs each set train.output_dir (swept a,b or ${hydra:job.num}): the job folder holds .hydra/ and
    a pointer, the results and checkpoints are in the output dir (was: every such run listed as failed)."""
    from dtune.sweep import OUTPUT_POINTER, point_to_outputs

    sweep = tmp_path / "multirun"
    for name, done in (("0", True), ("1", False)):
        job, out = sweep / name, tmp_path / "elsewhere" / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- train.output_dir={out}\n")
        point_to_outputs(job, out)
        if done:
            (out / "results.json").parent.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"after": {"eval/loss": 1.25}, "steps": 5}))
        else:
            (out / "checkpoints" / "step-00000003").mkdir(parents=True)
    point_to_outputs(sweep / "0", sweep / "0")  # outputs in the job folder itself: no pointer needed, none written
    assert [(r["run"], r["status"], r.get("eval_loss")) for r in summarize(sweep)] == [
        ("0", "done", 1.25),
        ("1", "stopped at step-00000003", None),
    ]
    plain = tmp_path / "plain"
    point_to_outputs(plain, plain)
    assert not (plain / OUTPUT_POINTER).exists()


def test_every_run_of_a_listed_sweep_is_validated_before_the_first_starts(capsys):
    """A value dtune refuses in the third run of four stops the sweep before any run (was: after two runs trained, with
    no summary), naming the run as Hydra numbers it and the field; Optuna's sweeps are left to their trials."""
    from dtune.commands.train import check_sweep_runs

    with pytest.raises(SystemExit) as stop:
        check_sweep_runs(["--multirun", "optim.lr=1e-4,-1", "lora.r=8,16", "debug=smoke"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--multirun: run #2 of 4 (optim.lr=-1 lora.r=8) would be refused" in err
    assert "optim.lr: must be > 0" in err
    with pytest.raises(SystemExit):  # Hydra's own settings left out of each run's config
        check_sweep_runs(["-m", "lora.r=8,0", "debug=smoke", "hydra.sweep.dir=/tmp/s", "hydra/launcher=basic"])
    assert "run #1 of 2 (lora.r=0) would be refused" in capsys.readouterr().err
    check_sweep_runs(["--multirun", "optim.lr=1e-4,2e-4", "lora.r=8,16", "debug=smoke"])  # every run fine
    check_sweep_runs(["--multirun", "sweeper=optuna", "optim.lr=interval(1e-5,1e-3)"])  # Optuna's: per trial
    check_sweep_runs(["--multirun", "lora.r=8,0"], limit=1)  # more runs than the limit: checked as they go
    check_sweep_runs(["lora.r=0"])  # not a sweep: the run itself refuses it


def test_a_sweep_with_one_output_dir_for_all_its_runs_is_refused(capsys):
    """With one train.output_dir every run after the first resumed the one before from its last checkpoint (0 steps
    trained, its results reported again, exit 0) and the summary listed every run as failed."""
    from dtune.commands.train import check_sweep_output_dir

    with pytest.raises(SystemExit) as stop:
        check_sweep_output_dir(["--multirun", "optim.lr=1e-4,2e-4", "train.output_dir=outputs/x"])
    assert stop.value.code == 2
    assert (
        "dtune: error: train.output_dir: one directory (outputs/x) for every run of a --multirun sweep" in capsys.readouterr().err
    )
    for fine in (
        ["--multirun", "optim.lr=1e-4,2e-4", "train.output_dir=outputs/a,outputs/b"],  # swept: one each
        ["-m", "optim.lr=1e-4,2e-4", "train.output_dir=outputs/${hydra:job.num}"],  # differs per run
        ["-m", "optim.lr=1e-4,2e-4", "train.output_dir=null"],
        ["train.output_dir=outputs/x"],  # one run
    ):
        check_sweep_output_dir(fine)
