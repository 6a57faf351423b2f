"""The GPU check kit (kernels/gpu/): what it relies on, checked here; the rehearsal runs the whole kit on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from dtune.subproc import run_bounded
from tests.helpers import REPO


@pytest.mark.integration
def test_time_limit_holds_when_a_grandchild_in_its_own_session_keeps_the_pipe(tmp_path: Path):
    """torchrun's workers have sessions of their own: killing torchrun alone left one holding the GPU and the pipe,
    and the stage ran 5 minutes past its limit on the H200. The whole tree goes, and the call returns on time."""
    pid_file = tmp_path / "grandchild.pid"
    parent = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; print(\"grandchild up\", flush=True); time.sleep(120)'], "
        "start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('parent up', flush=True); time.sleep(120)"
    )
    lines: list[str] = []
    start = time.monotonic()
    code, output = run_bounded([sys.executable, "-c", parent], timeout=3, on_line=lines.append)
    assert time.monotonic() - start < 15
    assert code is None  # timed out
    assert "parent up" in output and lines  # streamed as it came
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived the time limit"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_what_a_finished_command_leaves_running_is_killed(tmp_path: Path):
    """A command that exits at once but leaves a worker in its own session behind (as a crashed launcher can)."""
    pid_file = tmp_path / "left.pid"
    parent = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, "
        "stdout=subprocess.DEVNULL); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(1.5)"
    )
    code, _ = run_bounded([sys.executable, "-c", parent], timeout=60)
    assert code == 0
    left = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(left):
        assert time.monotonic() < deadline, "the command's leftover process is still running"
        time.sleep(0.1)


@pytest.mark.integration
def test_a_command_that_hangs_prints_where_before_it_is_killed():
    """The GPU kit's stages: SIGABRT at the limit, and Python's fault handler names the function that hung."""
    code = "import time\ndef stuck_in_here():\n    time.sleep(120)\nstuck_in_here()\n"
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    status, output = run_bounded([sys.executable, "-c", code], timeout=3, env=env, last_words=signal.SIGABRT)
    assert status is None
    assert "stuck_in_here" in output and "Fatal Python error: Aborted" in output


@pytest.mark.integration
def test_exit_status_and_output_of_a_command_that_finishes():
    code, output = run_bounded([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 30)
    assert code == 3 and "out" in output and "err" in output


def test_interpreter_check_names_the_triton_numpy_pair_that_cannot_run(monkeypatch):
    """Triton 3.6's interpreter + NumPy 2.4 fails inside every kernel with a bare TypeError; dtune says why first."""
    import numpy
    import triton

    from dtune.kernels import nf4

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    nf4._check_interpreter.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's interpreter cannot run with NumPy 2\.4\.6.*numpy<2\.4"):
            nf4._check_interpreter()
        monkeypatch.setattr(numpy, "__version__", "2.3.5")
        nf4._check_interpreter.cache_clear()
        nf4._check_interpreter()  # the pair the rehearsal runs
        monkeypatch.setattr(triton, "__version__", "3.9.0")
        monkeypatch.setattr(numpy, "__version__", "2.4.6")
        nf4._check_interpreter.cache_clear()
        nf4._check_interpreter()
    finally:
        nf4._check_interpreter.cache_clear()


def test_autotune_candidates_follow_the_environment(monkeypatch):
    from dtune.kernels.nf4 import autotune_candidates

    configs = list(range(7))
    monkeypatch.delenv("DTUNE_NF4_AUTOTUNE_CONFIGS", raising=False)
    assert autotune_candidates(configs) == configs
    monkeypatch.setenv("DTUNE_NF4_AUTOTUNE_CONFIGS", "2")
    assert autotune_candidates(configs) == [0, 1]
    monkeypatch.setenv("DTUNE_NF4_AUTOTUNE_CONFIGS", "two")
    with pytest.raises(ValueError, match="DTUNE_NF4_AUTOTUNE_CONFIGS"):
        autotune_candidates(configs)


def test_plan_validation_grids():
    from dtune.errors import ConfigError
    from dtune.plan import VALIDATION_GRID, validation_grid

    gpu = validation_grid("gpu", ["1b"], cuda=False)
    assert [name for name, _ in gpu][-1].startswith("Llama-1B") and len(gpu) == 4
    assert all("model=tiny_llama" in o or "builtin:shape-llama-1b" in " ".join(o) for _, o in gpu)  # no SmolLM2 needed
    assert validation_grid("auto", ["1b", "8b"], cuda=False) == VALIDATION_GRID
    assert len(validation_grid("auto", ["1b", "8b"], cuda=True)) == len(VALIDATION_GRID) + 3
    with pytest.raises(ConfigError, match="--shapes"):
        validation_grid("gpu", ["70b"], cuda=True)


def load_check(monkeypatch):
    """kernels/gpu/check.py as a module (it is a script, outside any package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "kernels" / "gpu" / "check.py")
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, check)  # its dataclasses look their module up there
    spec.loader.exec_module(check)
    return check


def test_the_tests_stage_names_tests_that_exist(monkeypatch):
    """The GPU tests stage's subset and its deselections name real tests: a renamed test would silently drop out of
    the subset, or stay in it and spend the stage's minutes (CPU 2-rank runs) on the GPU machine."""
    import importlib

    check = load_check(monkeypatch)
    for node in [*check.GPU_TESTS, *check.NOT_ON_GPU]:
        path, _, name = node.partition("::")
        assert (REPO / path).is_file(), node
        if name:
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), f"{node}: no such test"


def test_a_stage_that_runs_to_its_limit_leaves_the_later_stages_their_share(monkeypatch):
    """The stages' limits add up to more than the GPU call's budget: a hanging stage (ZeRO-3 on the H200) must not
    leave the last stages nothing, and a stage that ends early passes its time on."""
    check = load_check(monkeypatch)
    limits, budget = [25.0, 120.0, 90.0, 80.0, 60.0, 120.0, 40.0], 470.0
    fraction = (budget - limits[0]) / sum(limits[1:])
    spent, given = 0.0, []
    for i in range(len(limits)):  # every stage runs to the limit it is given
        given.append(check.stage_limit(limits, i, budget - spent, budget))
        spent += given[-1]
    assert abs(spent - budget) < 1e-6 and given[0] == 25.0  # env first, whole: every later stage needs it
    assert all(abs(g - lim * fraction) < 1e-6 for g, lim in zip(given[1:], limits[1:], strict=True))  # the last ones too
    # stages that end early: the later ones get their whole limits
    assert check.stage_limit(limits, 5, budget - 200.0, budget) == 120.0
    # limits within the budget: each stage its own
    assert check.stage_limit([10.0, 20.0], 0, 100.0, 100.0) == 10.0
    assert check.stage_limit([10.0, 20.0], 1, 5.0, 100.0) == 5.0  # but never more than is left


@pytest.mark.integration
def test_a_run_without_wandb_does_not_import_it(tmp_path: Path):
    """wandb is not carried to the GPU machine: with logger.wandb=false dtune must run without it."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # any import of wandb now raises ImportError
        "from tests.helpers import compose_config, tiny_overrides\n"
        "from dtune.train import run\n"
        f"run(compose_config(tiny_overrides(__import__('pathlib').Path({str(tmp_path)!r}), 'train.max_steps=1')), "
        f"__import__('pathlib').Path({str(tmp_path)!r}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").is_file()


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10)
        return True
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.slow
def test_rehearsal_runs_every_stage_of_the_gpu_check(tmp_path: Path):
    """kernels/gpu/rehearse.sh: a venv holding only the GPU machine's versions (triton 3.6, transformers 5.17, ...;
    kept in ~/.cache across checkouts, one per package list) plus only the fetched wheels, then check.sh --dry-run:
    its stages pass end to end. The train stage (the end-to-end
    benchmark, 85 s here) is left out: tests/test_bench.py runs the same harness, and the suite must stay short."""
    if not _pypi_reachable():
        pytest.skip("the rehearsal installs the GPU machine's versions from PyPI, which is not reachable here")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DS_ACCELERATOR", "PYTHONPATH")}
    env["DTUNE_CACHE"] = str(tmp_path / "cache")
    # The dry run's own budget (stages' limits x 8 for the interpreter) stays inside the test's limit.
    code, output = run_bounded(
        ["bash", "kernels/gpu/rehearse.sh", str(out), "--budget", "180", "--only", "env,tests,shard,nf4,moe,plan"],
        2400,
        env=env,
        cwd=REPO,
    )
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    stages = {name: s["status"] for name, s in results.get("stages", {}).items()}
    assert code == 0, f"{stages}\n{output[-6000:]}"
    assert stages == dict.fromkeys(["env", "tests", "shard", "nf4", "moe", "plan"], "pass")
    env_info = results["env"]
    assert env_info["versions"]["triton"] == "3.6.0" and env_info["versions"]["transformers"] == "5.17.0"
    assert not env_info["import_failures"] and not env_info["missing_packages"]
    shard = results["stages"]["shard"]["figures"]
    assert all(shard[e]["passed"] and shard[e]["mismatched_bytes"] == 0 for e in ("fsdp2", "zero3"))
    assert (out / "check.log").is_file() and (out / "tests.xml").is_file()
