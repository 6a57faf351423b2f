"""Preemption: a running CPU job is signalled, writes a checkpoint, exits for requeue, and the next start resumes.

The Slurm case runs slurm/job.sh -- the body of the sbatch scripts -- with stand-ins for ``srun`` (runs its command
here) and ``scontrol`` (names this host, records a requeue), so the signal travels the real path: batch shell ->
srun -> launch/torchrun.sh (torchrun) -> the two dtune processes. It runs only where tests/test_slurm.py cannot start
a real Slurm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    ENV,
    REPO,
    SMOKE,
    checkpoint_state,
    free_port,
    real_slurm_unavailable,
    signal_after_step,
    torchrun,
    train_records,
)

# Slow enough to be signalled mid-run; no interval checkpoints (the one found is the preemption's).
SMOKE = [*SMOKE, "optim.lr=1e-3", "train.micro_batch_size=2", "train.checkpoint_every=0"]


SIGNALLED = [sys.executable, "-m", "dtune.train", *SMOKE, "train.max_steps=120", "train.grad_accum_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run the signalled ones are held to, run through once."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run([*SIGNALLED, f"hydra.run.dir={ref}"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return ref


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # (SIGUSR1: the set-up test here, tests/test_slurm.py)
def test_signalled_run_checkpoints_exits_and_resumes_exactly(uninterrupted: Path, tmp_path: Path, sig: int):
    """SIGTERM (preemption) exits 75, which launchers requeue; Ctrl-C exits 130, the same checkpoint, no traceback."""
    cmd, ref = SIGNALLED, uninterrupted
    out = tmp_path / "preempted"
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={out}"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_after_step(proc, out, 3, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == (130 if sig == signal.SIGINT else 75), err[-3000:]
    assert "Traceback" not in err
    state = checkpoint_state(out)
    assert state["reason"] == f"preempted: {signal.Signals(sig).name}"
    stopped = state["step"]
    assert 3 <= stopped < 120
    assert not (out / "results.json").exists()
    assert f"received {signal.Signals(sig).name}" in (out / "dtune.log").read_text()

    again = subprocess.run([*cmd, f"hydra.run.dir={out}"], env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from_step"] == stopped
    # Tokens count the whole run; the rate is this start's tokens over this start's time.
    assert (
        0 < results["segment_tokens"] < results["train_tokens"] == json.loads((ref / "results.json").read_text())["train_tokens"]
    )
    assert results["tokens_per_s"] == pytest.approx(results["segment_tokens"] / results["train_time_s"], rel=0.01)
    # Bit-exact on CPU: every step's loss, before and after the stop, is the uninterrupted run's.
    assert [(r["step"], r["train/loss"]) for r in train_records(out)] == [
        (r["step"], r["train/loss"]) for r in train_records(ref)
    ]
    assert results["after"] == json.loads((ref / "results.json").read_text())["after"]


@pytest.mark.integration
def test_a_signal_while_setting_up_stops_at_once_without_a_checkpoint(tmp_path: Path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dtune.train", *SMOKE, f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "dtune.log").is_file() and "data:" in (out / "dtune.log").read_text()):  # handlers are set
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped at step 0 on SIGUSR1" in (out / "dtune.log").read_text()
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16) >> (sig - 1) & 1)


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_a_signal_while_starting_ends_as_a_preemption_not_a_kill(tmp_path: Path):
    """SIGTERM while ``python -m dtune.train`` imports torch and transformers (seconds, before the loop took the signals
    over) killed it: no status file, no requeue. It is recorded from the package's first line, and the run stops as
    preempted before it loads anything."""
    out, status = tmp_path / "run", tmp_path / "status.json"
    cmd = [sys.executable, "-m", "dtune.train", *SMOKE, f"hydra.run.dir={out}"]
    env = {**ENV, "DTUNE_STATUS_FILE": str(status)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGTERM):  # the recorder is in place: the imports are under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert json.loads(status.read_text())["status"] == "preempted" and json.loads(status.read_text())["step"] is None
    log = (out / "dtune.log").read_text()
    assert "received SIGTERM while starting" in log and "stopped while starting on SIGTERM: nothing new to save" in log
    assert not (out / "checkpoints").exists()


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_workers_whose_torchrun_is_killed_checkpoint_and_stop(tmp_path: Path):
    """SIGKILL to torchrun (the OOM killer, kill -9) left its workers -- in sessions of their own -- training on,
    orphaned, holding the output lock. Each now gets SIGTERM when torchrun dies and stops as preempted."""
    out = tmp_path / "run"
    cmd = [*torchrun(2), "-m", "dtune.train", *SMOKE, "train.max_steps=400", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_after_step(proc, out, 2, signal.SIGCONT)  # (a no-op signal: waits for step 2)
    workers = [int(p) for task in Path(f"/proc/{proc.pid}/task").iterdir() for p in (task / "children").read_text().split()]
    assert len(workers) == 2
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in workers):
        assert time.monotonic() < deadline, "the orphaned workers trained on"
        time.sleep(0.1)
    state = checkpoint_state(out)
    assert state["reason"] == "preempted: SIGTERM" and 2 <= state["step"] < 400


def test_a_stop_signal_while_starting_is_kept_for_the_loop():
    from dtune.distributed import preempt

    names = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    before = {sig: signal.getsignal(sig) for sig in (*names, signal.SIGINT)}
    try:
        for sig in names:
            signal.signal(sig, signal.SIG_DFL)
        preempt.record_early_signals(["optim.lr=1e-4"])
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # Ctrl-C before training still stops at once
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the first one counts
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
        with preempt.Preemption() as preemption:
            assert preemption.received == signal.SIGTERM and preemption.previous_handler() is None
        with preempt.Preemption() as preemption:
            assert not preemption.requested  # taken over once
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        preempt._early.clear()


def test_a_sweep_driver_still_stops_on_a_signal():
    """``dtune train --multirun launcher=slurm`` only submits the jobs and waits for them: a recorder set there was
    never taken over by a loop, so SIGTERM (``kill``, ``timeout``) no longer ended the waiting process."""
    from dtune.distributed import preempt

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for argv in (["--multirun", "launcher=slurm", "optim.lr=1e-4,2e-4"], ["-m", "optim.lr=1e-4,2e-4"]):
            preempt.record_early_signals(argv)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ctrl_c_before_training_or_a_second_one_stops_at_once():
    from dtune.distributed.preempt import Preemption

    with Preemption() as preemption:
        with pytest.raises(KeyboardInterrupt):  # still setting up: nothing to save, no step to wait for
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        preemption.arm()  # training has begun
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert preemption.received == signal.SIGINT and preemption.interrupted and preemption.previous_handler() is None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "# Stand-in for srun on one node: drop srun's options, become the task (signals reach it as they would).\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        f'echo "srun $*" >> {log}\n'
        'exec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\nif [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_torchrun_launch_script_exits_75_for_a_preemption_and_130_for_ctrl_c(tmp_path: Path, sig: int):
    """torchrun exits 1 for any stop (and prints its SignalException): launch/torchrun.sh reads how dtune ended and
    exits 75 (requeue) or 130, as dtune alone does, so that a supervisor other than slurm/job.sh can tell a
    checkpointed stop from a crash. The signal reaches the dtune processes once (a second Ctrl-C would skip the
    checkpoint)."""
    env = {**ENV, "NPROC_PER_NODE": "2", "JOB_ID": "signalled", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    env.pop("DTUNE_STATUS_FILE", None)
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the script's own status file goes, and is removed from
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *SMOKE, "train.max_steps=100"]
    out = tmp_path / "outputs" / "torchrun-signalled"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_after_step(proc, out, 3, sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == (130 if sig == signal.SIGINT else 75), stderr[-3000:]
    assert "launch/torchrun.sh: dtune wrote a checkpoint and stopped" in stderr
    state = checkpoint_state(out)
    assert state["reason"] == f"preempted: {signal.Signals(sig).name}" and state["world_size"] == 2
    assert not list((tmp_path / "tmp").glob("dtune-status-*"))


@pytest.mark.integration
@pytest.mark.skipif(real_slurm_unavailable() is None, reason="a real Slurm runs here: tests/test_slurm.py covers job.sh")
def test_slurm_job_forwards_the_warning_requeues_and_the_requeued_job_resumes(tmp_path: Path):
    """The fallback where no real Slurm can be started (not root, no apt-get: laptops, unprivileged CI): job.sh's
    warning -> checkpoint -> requeue -> resume path with stand-in srun and scontrol. Where one can, tests/test_slurm.py
    runs the same path under slurmctld and slurmd, and this stand-in is skipped."""
    log = tmp_path / "slurm.log"
    _fake_slurm(tmp_path / "bin", log)
    env = {
        **ENV,
        "PATH": f"{tmp_path / 'bin'}:{ENV['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(REPO),
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "SHUTDOWN_TIMEOUT": "120",
    }
    cmd = ["bash", str(REPO / "slurm" / "job.sh"), *SMOKE, "train.max_steps=100"]
    out = tmp_path / "outputs" / "slurm-4242"  # the job's output dir, named by the Slurm job id

    # Slurm's --signal=B:USR1@180 signals the batch shell, which runs slurm/job.sh.
    batch = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_after_step(batch, out, 3, signal.SIGUSR1)
    stdout, stderr = batch.communicate(timeout=300)
    assert batch.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "scontrol requeue 4242" in log.read_text()
    status = json.loads((tmp_path / "outputs" / ".dtune-status-4242.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGUSR1" and status["output_dir"] == str(out)
    state = checkpoint_state(out)
    assert state["reason"] == "preempted: SIGUSR1" and state["world_size"] == 2
    stopped = state["step"]
    assert 3 <= stopped < 100

    # The requeued job: same job id, same output dir, resumes by itself (job.sh passes train.resume=auto).
    log.write_text("")
    requeued = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "requeue" not in log.read_text()  # finished: not requeued
    assert json.loads((tmp_path / "outputs" / ".dtune-status-4242.json").read_text())["status"] == "done"
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from_step"] == stopped and results["steps"] == 100
    assert [r["step"] for r in train_records(out)] == list(range(1, 101))  # every step once, none lost or repeated


def test_a_handler_installed_before_dtune_is_called_after_the_checkpoint():
    """Under submitit, its USR2 handler (requeue, exit) was there first: dtune's replaces it while training and hands
    the signal on only once the checkpoint is written (Preempted.chain); afterwards the old handler is back."""
    from dtune.distributed.preempt import Preempted, Preemption

    calls = []

    def submitits(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitits)
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert preemption.requested and preemption.received == signal.SIGUSR2
            assert calls == []  # not yet: the step in hand finishes and the checkpoint is written first
            stop = Preempted(7, preemption.received, preemption.previous_handler())
        assert signal.getsignal(signal.SIGUSR2) is submitits
        stop.chain()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize(("status", "expected"), [("done", 0), ("preempted", 75), ("interrupted", 130), (None, 1)])
def test_the_launch_script_exits_as_dtune_ended_whatever_torchrun_says(tmp_path: Path, status: str | None, expected: int):
    """torchrun exits 1 when it was signalled, also when dtune had finished anyway (a stop signal during the final
    evaluation and save): the script exits 0 for a finished run, as its header says (it exited torchrun's 1)."""
    fake = tmp_path / "python"  # stands in for the shim and torchrun: dtune's report, then torchrun's exit 1
    record = f'{{"status": "{status}", "step": 3}}' if status else ""
    fake.write_text(f"#!/usr/bin/env bash\n{f'echo {json.dumps(record)} > $DTUNE_STATUS_FILE' if record else ''}\nexit 1\n")
    fake.chmod(0o755)
    env = {**ENV, "PYTHON": str(fake), "NPROC_PER_NODE": "1", "TMPDIR": str(tmp_path)}
    env.pop("DTUNE_STATUS_FILE", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected, proc.stderr
