"""What several test modules share: the environment of launched processes, launch commands, and readers of a
run's output directory. Fixtures live in conftest.py; everything importable lives here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dtune.config import compose
from dtune.data import IGNORE
from dtune.schema import DtuneConfig

REPO = Path(__file__).resolve().parent.parent

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",  # 2 cores shared by up to 2 ranks and the test process
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HYDRA_FULL_ERROR": "0",  # errors as a user sees them
}
"""Environment of every process a test launches."""

SMOKE = ["debug=smoke", "train.precision=fp32"]
"""A seconds-long run of the tiny random Llama in 4-bit NF4 + LoRA."""

# Global batch 4 per step: 2 ranks x 2 samples, or 1 rank x 2 micro-batches of 2. A checkpoint after step 2 (and
# the last, 3): the resume tests go on from it on the other world size.
COMMON = ["debug=smoke", "train.precision=fp32", "optim.lr=1e-2", "train.micro_batch_size=2", "train.checkpoint_every=2"]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """torchrun with ``nproc`` processes on this host, on a free port."""
    return [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def run_ok(cmd: list[str], cwd: Path) -> None:
    """Run ``cmd``; fail the test with its output's tail unless it exits 0."""
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def dtune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``dtune <args>`` as a user runs it (``python -m dtune``), its output captured."""
    cmd = [sys.executable, "-m", "dtune", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def compose_config(overrides: list[str] | None = None) -> DtuneConfig:
    """The typed config that `dtune train <overrides>` would run with; not validated (run() does that, and some tests
    check validation itself)."""
    return compose(list(overrides or []), check=False)


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A seconds-long QLoRA run on the tiny random Llama, writing into tmp_path."""
    return ["debug=smoke", f"train.output_dir={tmp_path}", "train.precision=fp32", *extra]


def trained_runs(tokenizer: Any, example: Any) -> list[str]:
    """The labelled tokens of a rendered Example, decoded run by run (one run per trained span)."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a line still being written is skipped)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def train_records(out: Path) -> list[dict]:
    """The training-step records of a run's metrics.jsonl."""
    return [r for r in metrics(out) if "train/loss" in r]


def signal_after_step(proc: subprocess.Popen, out: Path, step: int, sig: int, pid: int | None = None) -> None:
    """Send ``sig`` to ``pid`` (default: ``proc``) once the run writing into ``out`` has logged ``step``."""
    deadline = time.monotonic() + 300
    while not any(r["step"] >= step for r in train_records(out)):
        assert proc.poll() is None, f"the run ended before it was signalled:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the run never reached the step to signal at"
        time.sleep(0.05)
    os.kill(pid or proc.pid, sig)


def checkpoint_state(out: Path) -> dict:
    """trainer_state.json of the run's only (newest kept) checkpoint."""
    (newest,) = sorted((out / "checkpoints").glob("step-*"))
    return json.loads((newest / "trainer_state.json").read_text())


SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def real_slurm_unavailable() -> str | None:
    """Why the real-Slurm tests (tests/test_slurm.py) cannot run here, or None where they can: their fixture starts
    munged, slurmctld and slurmd as root, after installing Debian's packages with apt-get if they are missing."""
    if not sys.platform.startswith("linux"):
        return "real Slurm: Linux only"
    if os.geteuid() != 0:
        return "real Slurm: needs root to start munged, slurmctld and slurmd"
    if all(shutil.which(tool) for tool in SLURM_TOOLS):
        return None
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "real Slurm: not installed, and no apt-get/dpkg to install slurmctld, slurmd and munge"
    return None


def split_rows(cfg, bad=None):
    """(train, eval) Rows of ``cfg``'s split, every row read into memory: the split's reference (dtune reads records by
    number, dtune.data.tokenize)."""
    from dtune.data.sources import BadRows, load_rows, split

    bad = bad or BadRows(cfg.bad_rows)
    return split(cfg, lambda source, field_name, fmt: load_rows(source, field_name, fmt, bad))
