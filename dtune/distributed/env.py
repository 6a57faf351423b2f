"""The process's place in a distributed job, read from its launcher's environment (torchrun, Slurm's srun,
submitit), and the end of a multi-process run."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist


def job_dir_name() -> str:
    """One output folder name per job, the same on every rank, so that all ranks share one Hydra output directory.

    DTUNE_JOB_ID if set; the Slurm job (and array task) id; torchrun's rendezvous id (``--rdzv-id``); under plain
    torchrun, the start time of the torchrun process that all local ranks share; otherwise the current time.
    """
    env = os.environ
    if env.get("DTUNE_JOB_ID"):
        return env["DTUNE_JOB_ID"]
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    started = _parent_start_time() if "LOCAL_RANK" in env else None
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))


def _parent_start_time() -> float | None:
    """Wall-clock start of the parent process (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the ")" that ends the command name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def rank_suffix() -> str:
    """'' on rank 0, '_rank<N>' elsewhere: per-rank log files in the shared output directory."""
    rank = int(os.environ.get("RANK", slurm_process_env().get("RANK", "0")))
    return "" if rank == 0 else f"_rank{rank}"


def slurm_process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables for a process started by ``srun`` alone, one task per GPU (as submitit does).

    Empty when torchrun set them already (RANK present) or when the step has one task.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "1")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": tasks_per_node.split("(")[0].split(",")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        # One port per job (jobs sharing a node must not collide), the same on every task.
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # what Accelerate reads for MPI launches


def lone_process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables for a job of one process started without a launcher (``dtune train
    engine=zero3`` on one GPU): rank 0 of 1, a free localhost port. ZeRO and FSDP2 shard over a process group, which
    Accelerate forms only from a launcher's variables. Empty when a launcher set them (RANK, WORLD_SIZE or
    LOCAL_RANK present) or an MPI launcher did (a world size above 1). The variables stay set: they are true of
    this process, and DeepSpeed reads LOCAL_RANK later."""
    env = dict(os.environ) if env is None else env
    if any(key in env for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return {}
    if any(int(env.get(key, "1") or "1") > 1 for key in MPI_WORLD_SIZE):  # an MPI launch: Accelerate reads its own
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT") or str(port),
    }


def deepspeed_cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """DeepSpeed's CPU accelerator counts a node's devices from LOCAL_SIZE (its own launcher sets it), else by running
    ``numactl --hardware`` -- at every ZeRO-3 gradient reduction. That subprocess costs a fork per step, and Python
    re-arms its once-only warnings at each one, so torch's deprecation notices were printed at every step by every
    rank, over the progress bar. LOCAL_SIZE from the launcher's LOCAL_WORLD_SIZE; empty when LOCAL_SIZE is set."""
    env = dict(os.environ) if env is None else env
    if env.get("LOCAL_SIZE"):
        return {}
    return {"LOCAL_SIZE": env.get("LOCAL_WORLD_SIZE") or "1"}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-006,010],cpu1' -> 'gpu003' (what `scontrol show hostnames` lists
    first)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
    assert match is not None  # the pattern matches any string, if only with empty groups
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def shutdown_distributed(exit_code: int = 0, then: Callable[[], None] | None = None, exit_process: bool = True) -> None:
    """End the run. Multi-process: barrier, destroy the process group, run ``then``, flush and leave with
    ``exit_code`` without interpreter teardown (gloo's exit race: "terminate called without an active exception"),
    unless ``exit_process`` is false (the caller must return: submitit). One process: just run ``then``."""
    if not (dist.is_available() and dist.is_initialized()):
        if then is not None:
            then()
        return
    dist.barrier()
    dist.destroy_process_group()
    if then is not None:
        then()
    if not exit_process:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
