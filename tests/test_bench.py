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
