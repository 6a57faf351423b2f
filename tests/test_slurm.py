"""dtune under a real single-node Slurm: Debian's munge, slurmctld and slurmd, started (installed first if missing) by
the session fixture as root. The sbatch scripts' time-limit warning -> checkpoint -> requeue -> resume, a TERM to the
whole batch step (scancel --full) and to the steps only, and a sweep through hydra-submitit-launcher."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ENV, REPO, SMOKE, free_port, real_slurm_unavailable, train_records

# Slow enough to be signalled mid-run; no interval checkpoints (the one resumed from is the stop's).
RUN = [*SMOKE, "optim.lr=1e-3", "train.micro_batch_size=2", "train.checkpoint_every=0"]

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class Slurm:
    """A running single-node cluster: its partition and the environment its commands need (SLURM_CONF)."""

    partition: str
    env: dict[str, str]

    def __call__(self, *cmd: str, cwd: Path | None = None) -> str:
        """Run a Slurm command; its stdout. Fails the test unless it exits 0."""
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, Restarts, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self("scontrol", "show", "job", "--oneliner", job_id)))

    def sbatch(self, cwd: Path, *options_and_overrides: str, script: str = "dtune-1node.sbatch") -> str:
        """Submit one of slurm/*.sbatch from ``cwd`` with two CPU ranks and no GPUs; the job id. Options (--...) go
        before the script, dtune overrides after it."""
        options = [a for a in options_and_overrides if a.startswith("--")]
        overrides = [a for a in options_and_overrides if not a.startswith("--")]
        cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={cwd}/slurm-%j.out", *options]
        return self(*cmd, str(REPO / "slurm" / script), *overrides, cwd=cwd).strip()

    def wait_until_ended(self, job_id: str, log: Path, timeout: float) -> dict[str, str]:
        """Poll the job until it ends; its final `scontrol show job`. Fails on a timeout (the job is cancelled)."""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in ENDED:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env, timeout=60)
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(1)
        return job


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.is_file() else f"({path} missing)"


def _install_slurm() -> None:
    """Debian's slurmctld, slurmd and munge (about a minute), unless installed."""
    if all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurmctld", "slurmd", "slurm-client", "munge"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # e.g. a stale package list
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"real Slurm: `{' '.join(cmd)}` failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")


def _munge_works() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=30).returncode == 0


def _slurm_conf(root: Path, host: str) -> str:
    mem_mb = next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return f"""\
ClusterName=dtune-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (+1 s) before it may start again (default 120 s).
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# Processes tracked by parent pid: no cgroup hierarchy to manage in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# A requeued job starts once its begin time passes, at the next full scheduling pass (default every 60 s).
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=30
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory={mem_mb} State=UNKNOWN
PartitionName=dtune Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """munged (unless one runs), slurmctld and slurmd for this host, until the session ends."""
    if reason := real_slurm_unavailable():
        pytest.skip(reason)
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {**ENV, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> None:
        with open(root / log, "w") as out:
            daemons.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    cluster = Slurm(partition="dtune", env=env)
    try:
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            start(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "--foreground"], "munged.out")
            deadline = time.monotonic() + 30
            while not _munge_works():
                assert time.monotonic() < deadline and daemons[-1].poll() is None, _tail(root / "munged.out")
                time.sleep(0.2)
        start(["slurmctld", "-D", "-f", str(conf)], "slurmctld.out")
        start(["slurmd", "-D", "-f", str(conf)], "slurmd.out")
        deadline = time.monotonic() + 60
        while subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip() != "idle":
            alive = all(d.poll() is None for d in daemons)
            assert alive and time.monotonic() < deadline, _tail(root / "slurmctld.log") + _tail(root / "slurmd.log")
            time.sleep(0.5)
        yield cluster
    finally:
        # Jobs a failed test left behind go first: slurmd does not end them when it stops.
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout:
            time.sleep(1)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _submit_env(slurm: Slurm) -> Slurm:
    """The cluster, with what slurm/job.sh needs from the submitting environment (sbatch exports it to the job)."""
    env = {**slurm.env, "DTUNE_REPO": str(REPO), "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "SHUTDOWN_TIMEOUT": "60"}
    return Slurm(partition=slurm.partition, env=env)


def _assert_resumed_to_the_end(out: Path, steps: int, log: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == steps, _tail(log)
    assert results["resumed_from_step"] and 0 < results["resumed_from_step"] < steps
    assert [r["step"] for r in train_records(out)] == list(range(1, steps + 1))  # every step once, none lost or repeated
    status = json.loads((out.parent / f".dtune-status-{out.name.removeprefix('slurm-')}.json").read_text())
    assert status["status"] == "done" and status["output_dir"] == str(out)
    return results


@pytest.mark.integration
@pytest.mark.slurm
def test_time_limit_warning_checkpoints_and_slurm_requeues_the_job_until_it_ends(slurm: Slurm, tmp_path: Path):
    """--time=2 with --signal=B:USR1@60: slurmctld warns 60 to 90 s before the limit (it checks every 30 s), i.e.
    30 to 60 s into each run. 2400 steps outlast that on 2 cores (13-37 steps/s measured, after ~8 s of set-up; 1500
    steps ended unwarned in 45 s once the frozen base stayed in its compute dtype), so the job is warned, checkpoints,
    is requeued by job.sh and resumes (2-6 runs) until it ends, each run well before its time limit. More steps only
    add runs: every run is warned by 60 s. (--time=1 with USR1@15 warns 15 to 45 s into a run, but a resumed run's
    ~12 s of set-up leaves it ~250 steps: 1500 steps took 6 runs, 181 s; 3000 steps here took 219 s.)"""
    steps = 2400
    cluster = _submit_env(slurm)
    job_id = cluster.sbatch(tmp_path, "--time=2", "--signal=B:USR1@60", *RUN, f"train.max_steps={steps}")
    log = tmp_path / f"slurm-{job_id}.out"
    job = cluster.wait_until_ended(job_id, log, timeout=900)  # 3000 steps took 406 s beside another test worker
    assert job["JobState"] == "COMPLETED", _tail(log)
    assert int(job["Restarts"]) >= 1, _tail(log)
    text = log.read_text()
    assert "USR1 received (time limit near)" in text and f"requeueing job {job_id}" in text
    _assert_resumed_to_the_end(tmp_path / "outputs" / f"slurm-{job_id}", steps, log)


@pytest.mark.integration
@pytest.mark.slurm
@pytest.mark.parametrize("scancel", [["--full"], []], ids=["batch-step-too", "steps-only"])
def test_a_term_to_the_job_checkpoints_and_the_requeued_job_resumes(slurm: Slurm, tmp_path: Path, scancel: list[str]):
    """`scancel --signal=TERM --full` signals the batch step's process group, srun included (on a TERM, srun SIGKILLs
    its tasks unless job.sh keeps it out of that group); plain `scancel --signal=TERM` (as preemption does) signals
    the steps only. Either way dtune checkpoints on SIGTERM, job.sh requeues and the job resumes to the end."""
    steps = 200
    cluster = _submit_env(slurm)
    job_id = cluster.sbatch(tmp_path, "--time=10", *RUN, f"train.max_steps={steps}")
    out, log = tmp_path / "outputs" / f"slurm-{job_id}", tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 300
    while not any(r["step"] >= 20 for r in train_records(out)):
        assert cluster.job(job_id)["JobState"] in {"PENDING", "RUNNING"}, _tail(log)
        assert time.monotonic() < deadline, f"job {job_id} never reached step 20:\n{_tail(log)}"
        time.sleep(0.1)
    cluster("scancel", "--signal=TERM", *scancel, job_id)
    job = cluster.wait_until_ended(job_id, log, timeout=300)
    text = log.read_text()
    assert "forcing job termination" not in text  # srun never took the TERM for the end of the job
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, text[-4000:]
    assert '"status": "preempted"' in text and '"signal": "SIGTERM"' in text, text[-4000:]
    # The batch shell is signalled by --full only. After job.sh's own `scontrol requeue`, slurmctld TERMs the batch
    # step it is ending: under load that can reach the shell before it exits, so only what precedes the requeue counts.
    before_requeue = text.split(f"requeueing job {job_id}")[0]
    assert ("TERM received" in before_requeue) == bool(scancel)
    results = _assert_resumed_to_the_end(out, steps, log)
    assert results["resumed_from_step"] >= 20


@pytest.mark.integration
@pytest.mark.slurm
def test_a_sweep_through_submitit_runs_each_job_on_slurm(slurm: Slurm, tmp_path: Path):
    """`dtune train --multirun launcher=slurm`: hydra-submitit-launcher submits one Slurm job per run and waits for
    them; GPU, CPU and time settings are overridden to fit this 2-CPU node."""
    sweep = tmp_path / "sweep"
    cmd = [
        *[sys.executable, "-m", "dtune", "train", "--multirun", "launcher=slurm"],
        f"hydra.launcher.partition={slurm.partition}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.setup=['export OMP_NUM_THREADS=1']",
        f"hydra.sweep.dir={sweep}",
        *SMOKE,
        "lora.r=2,4",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=slurm.env, capture_output=True, text=True, timeout=600)
    logs = "".join(_tail(p, 2000) for p in sorted(sweep.glob(".submitit/*/*.out")) + sorted(sweep.glob(".submitit/*/*.err")))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}{logs}"
    for run, rank in (("0", 2), ("1", 4)):
        results = json.loads((sweep / run / "results.json").read_text())
        assert results["steps"] == 3
        assert f"lora.r={rank}" in (sweep / run / ".hydra" / "overrides.yaml").read_text()
    # One Slurm job per run (submitit submits them as one job array), each completed: submitit returns once the
    # results are written, while the jobs may still be exiting.
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2, tasks
    for task in tasks:
        assert (
            slurm.wait_until_ended(task, sweep / ".submitit" / task / f"{task}_0_log.err", timeout=60)["JobState"] == "COMPLETED"
        )
