"""`dtune doctor` on CPU with 2 processes: under torchrun and as srun starts them (ranks from Slurm's variables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dtune.commands.doctor import best_of, diagnose, main, slow_links
from tests.helpers import ENV, TORCHRUN, free_port

# On a 2-core CI machine shared with another test worker, one rank can lose its core for a whole round of the link
# test: the slow-link check (tested on its own below) would fail these runs for the machine's load, not for dtune.
DOCTOR_ARGS = ("--sizes", "64K,1M", "--slow-link", "0")


def check_report(report: dict) -> None:
    assert len(report["ranks"]) == 2 and report["problems"] == []
    assert [r["env"]["RANK"] for r in report["ranks"]] == ["0", "1"]
    assert all(r["torch"] and r["packages"]["dtune"] for r in report["ranks"])
    assert [row["bytes"] for row in report["allreduce"]] == [64 * 1024, 2**20]
    assert all(row["busbw_GBps"] > 0 and row["seconds"] > 0 for row in report["allreduce"])
    assert sorted((link["src"], link["dst"]) for link in report["links"]) == [(0, 1), (1, 0)]
    assert report["barrier_ms"] > 0


@pytest.mark.integration
def test_doctor_under_torchrun(tmp_path: Path):
    out = tmp_path / "doctor.json"
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "dtune", "doctor"]
    proc = subprocess.run([*cmd, *DOCTOR_ARGS, "--json", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    # A failing rank's own traceback comes first in stderr, torchrun's summary last: show both.
    assert proc.returncode == 0, proc.stderr[:4000] + "\n[...]\n" + proc.stderr[-1500:]
    assert "2 rank(s) on 1 host(s)" in proc.stdout and "slowest link: rank" in proc.stdout and "no problems found" in proc.stdout
    check_report(json.loads(out.read_text()))


@pytest.mark.integration
def test_doctor_started_by_srun(tmp_path: Path):
    """srun --ntasks 2 dtune doctor: no torchrun; each task finds its rank and the rendezvous in SLURM_* variables."""
    out = tmp_path / "doctor.json"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2",
            SLURM_JOB_NODELIST="127.0.0.1",
            SLURM_JOB_ID="77",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "-m", "dtune", "doctor", *DOCTOR_ARGS, "--json", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, out_text[-2000:] + "\n" + err[-3000:]  # a problem found goes to stdout, exit 1
    check_report(json.loads(out.read_text()))


@pytest.mark.integration
def test_a_missing_rank_is_a_clear_error(tmp_path: Path):
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "dtune", "doctor", "--timeout", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "dtune doctor: error on" in proc.stderr and "RANK=0" in proc.stderr


def _rank(host: str, local: str, torch: str = "2.13.0", gpus: int = 8) -> dict:
    return {
        "host": host,
        "python": "3.11.7",
        "torch": torch,
        "cuda": "12.8",
        "nccl": "2.27.3",
        "gpus": ["NVIDIA H100 80GB HBM3"] * gpus,
        "env": {"LOCAL_RANK": local},
        "packages": {p: "1" for p in ("dtune", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "triton")},
    }


def test_diagnose_names_mismatches_missing_gpus_and_the_slow_link():
    ranks = [_rank("a", "0"), _rank("a", "1"), _rank("b", "0", torch="2.12.0"), _rank("b", "1", gpus=1)]
    links = [{"src": i, "dst": (i + 1) % 4, "GBps": bw} for i, bw in enumerate([90.0, 12.0, 88.0, 91.0])]
    problems = diagnose(ranks, links)
    assert any(p.startswith("torch differs between ranks: ['2.12.0', '2.13.0']") for p in problems)
    assert "rank 3 on b: LOCAL_RANK 1 but 1 GPU(s) visible" in problems
    assert any(p.startswith("slow link: rank 1 (a) -> rank 2 (b): 12.00 GB/s") for p in problems)
    assert diagnose(ranks[:2], links[:1]) == []
    assert not any(p.startswith("slow link") for p in diagnose(ranks, links, slow_link=0))
    assert any(p.startswith("slow link: rank 1") for p in diagnose(ranks, links, slow_link=0.2))  # 12 < 0.2 * 89.5


def test_a_link_is_slow_only_if_it_is_slow_in_both_rounds():
    first = [{"src": i, "dst": (i + 1) % 4, "GBps": bw} for i, bw in enumerate([90.0, 10.0, 88.0, 11.0])]
    second = [{"src": i, "dst": (i + 1) % 4, "GBps": bw} for i, bw in enumerate([12.0, 85.0, 87.0, 11.5])]
    assert [link["src"] for link in slow_links(first)] == [1, 3]
    best = best_of(first, second)
    assert [link["GBps"] for link in best] == [90.0, 85.0, 88.0, 11.5]
    assert [link["src"] for link in slow_links(best)] == [3]  # rank 1's link was busy once, rank 3's is slow


def test_a_slow_link_fraction_outside_zero_to_one_is_refused(capsys):
    assert main(["--slow-link", "1.5"]) == 2
    assert "--slow-link must be a fraction in [0, 1), got 1.5" in capsys.readouterr().err
