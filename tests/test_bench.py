"""The end-to-end benchmark's --smoke mode (CPU, tiny model): dtune under two engines and HF Trainer side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ENV, REPO


@pytest.mark.integration
def test_train_benchmark_harness_runs(tmp_path: Path):
    out = tmp_path / "train.json"
    bench = [sys.executable, str(REPO / "kernels" / "bench_train.py"), "--smoke", "--out", str(out)]
    # Two calls, as a time-limited GPU session would make them: the second adds its rows to the first's file.
    for extra in (["--engines", "ddp", "--kernels", "bnb,triton+lora"], ["--engines", "fsdp2", "--no-hf", "--merge"]):
        proc = subprocess.run([*bench, *extra], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["device"].startswith("cpu") and report["meta"]["args"]["seq"] == 64
    rows = {r["engine"]: r for r in report["rows"]}
    assert set(rows) == {"ddp", "ddp+triton+lora", "fsdp2", "hf_trainer"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
    assert "vs HF" in proc.stdout and "hf_trainer" in proc.stdout


@pytest.mark.integration
def test_data_benchmark_harness_runs(tmp_path: Path):
    """The data benchmark at 500 and 1,000 rows: the old revision's data path (extracted from git) and this checkout's
    on 2 ranks, side by side; above --old-max-rows the old one is extrapolated, not run."""
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(REPO / "kernels" / "bench_data.py"), "--rows", "500", "1000", "--old-max-rows", "500"]
    cmd += ["--steps", "5", "--work", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(r["path"], r["rows"]): r for r in report["runs"]}
    assert {k: r["status"] for k, r in runs.items()} == {
        ("old", 500): "ok",
        ("new", 500): "ok",
        ("old", 1000): "extrapolated",
        ("new", 1000): "ok",
    }
    assert runs[("old", 500)]["dtune"] != runs[("new", 500)]["dtune"]  # the old path ran from its own copy
    for run in runs.values():
        assert run["rows_per_s"] > 0 and run["peak_rss_rank0"] > 0 and run["peak_rss_rank1"] > 0 and run["cache_bytes"] > 0
    assert runs[("new", 1000)]["rows_tokenized"] == 1000 and runs[("new", 1000)]["warm_s"] > 0
    assert [s["rows"] for s in report["goals"]["speedup"]] == [500, 1000] and report["goals"]["rss"]["rows"] == 1000
    assert "1,000 rows" in proc.stdout and "new/old" in proc.stdout and "extrapolated" in proc.stdout
