"""One writer per output directory: a second run into a directory in use is refused at start naming the holder; a
lock left by a dead run is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtune.errors import ConfigError
from dtune.fsutil import LOCK_FILE, OutputLock
from tests.helpers import ENV, SMOKE, dtune, train_records

HOLD = "import sys, time; from dtune.fsutil import OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def hold_in_another_process(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.integration
def test_a_directory_in_use_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path: Path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(
            ConfigError, match=rf"is in use by another run \(host {socket.gethostname()}, pid {holder.pid}, since "
        ):
            OutputLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything
        holder.wait()
    with OutputLock(tmp_path):  # the kernel dropped the dead process's lock: taken over at once
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_stale_lock_file_is_taken_over(tmp_path: Path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone-node", "pid": 4242, "since": "2026-11-01 10:00:00"}) + "\n")
    with caplog.at_level("INFO", logger="dtune.fsutil"), OutputLock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert "taking over from a run that ended without releasing it (host gone-node, pid 4242" in caplog.text


def test_released_when_the_run_ends(tmp_path: Path, caplog):
    with OutputLock(tmp_path):
        pass
    OutputLock(tmp_path).acquire().release()
    # A run in another process that ended cleanly leaves no holder behind: the next run takes over nothing.
    ended = f"from dtune.fsutil import OutputLock; OutputLock({str(tmp_path)!r}).acquire().release()"
    subprocess.run([sys.executable, "-c", ended], env=ENV, check=True, timeout=120)
    with caplog.at_level("INFO", logger="dtune.fsutil"), OutputLock(tmp_path):
        pass
    assert "taking over" not in caplog.text


@pytest.mark.integration
def test_two_trainings_into_one_output_dir(tmp_path: Path):
    """Started together, the second is refused at start with one clear line (it used to die later in a raw
    FileNotFoundError when the first's checkpoint clean-up removed its temporary folder); the first goes on
    undisturbed (here: until it is signalled, checkpoints and stops)."""
    out = tmp_path / "run"
    args = [*SMOKE, f"train.output_dir={out}", "train.max_steps=1000", "train.micro_batch_size=2", "train.checkpoint_every=5"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dtune", "train", *args, f"hydra.run.dir={tmp_path / 'h1'}"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not train_records(out):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = dtune("train", *args, f"hydra.run.dir={tmp_path / 'h2'}", cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGUSR1)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 75, stderr[-3000:]
    (newest,) = sorted((out / "checkpoints").glob("step-*"))[-1:]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["reason"] == "preempted: SIGUSR1"
    steps = [r["step"] for r in train_records(out)]
    assert steps == list(range(1, state["step"] + 1))  # one writer: every step once
