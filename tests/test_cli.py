"""`dtune train` as a user runs it: the output directory it leaves, and one clear line for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ENV, SMOKE, write_jsonl


def dtune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dtune", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Is {i} even? Answer yes or no.", "completion": "yes" if i % 2 == 0 else "no"} for i in range(n)]


@pytest.mark.integration
def test_smoke_run_leaves_a_complete_output_dir(tmp_path: Path):
    out = tmp_path / "run"
    proc = dtune(*SMOKE, "logger=wandb", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "config_resolved.yaml",
        "dtune.log",
        "metrics.jsonl",
        "results.json",
        "loss_curve.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]:
        assert (out / name).is_file(), f"missing {name}"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run inside the output dir"
    assert "eval/accuracy" in (out / "dtune.log").read_text()  # the before/after table is logged
    assert "max_steps: 3" in (out / "config_resolved.yaml").read_text()
    assert json.loads((out / "results.json").read_text())["steps"] == 3


@pytest.mark.integration
def test_python_dash_m_dtune_train_and_own_data(tmp_path: Path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(24))
    evals = write_jsonl(tmp_path / "eval.jsonl", rows(6))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dtune.train",
        *SMOKE,
        "data=jsonl",
        f"data.source={train}",
        f"data.eval_source={evals}",
        "data.choices=[yes,no]",
        f"train.output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train_rows"] == 24 and results["data"]["eval_rows"] == 6
    # Hydra's record and the log sit beside the run's checkpoints, not in a second folder under ./outputs
    # (.hydra/<start>/: every start into one train.output_dir keeps its own record)
    assert len(list((out / ".hydra").rglob("overrides.yaml"))) == 1 and "training" in (out / "dtune.log").read_text()
    assert not (tmp_path / "outputs").exists()


@pytest.mark.integration
def test_user_config_dir_adds_an_experiment(tmp_path: Path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "short.yaml").write_text("# @package _global_\nlora:\n  r: 4\n  alpha: 8\n")
    out = tmp_path / "run"
    proc = dtune(*SMOKE, "experiment=short", f"hydra.run.dir={out}", "--config-dir", str(tmp_path / "my_conf"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    resolved = yaml.safe_load((out / "config_resolved.yaml").read_text())
    assert (resolved["lora"]["r"], resolved["lora"]["alpha"]) == (4, 8)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    text = proc.stderr + proc.stdout
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text[-2000:]}"
    assert "Traceback" not in text, f"a traceback reached the user:\n{text[-2000:]}"


def test_a_plus_added_key_stops_the_run_before_training(tmp_path: Path):
    proc = dtune(*SMOKE, "+no_such_key=1", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_clean_failure(proc, "config: unknown key no_such_key")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_missing_data_file(tmp_path: Path):
    proc = dtune(*SMOKE, "data=jsonl", "data.source=nowhere.jsonl", cwd=tmp_path)
    assert_clean_failure(proc, "data.source: data file not found: nowhere.jsonl")
    assert proc.returncode == 2


@pytest.mark.integration
def test_own_data_without_a_file_is_refused_not_replaced_by_the_built_in_data(tmp_path: Path):
    proc = dtune(*SMOKE, "data=jsonl", cwd=tmp_path)
    assert_clean_failure(proc, "dtune: error: data.source: the config chosen needs it set; add data.source=")
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()
    # under Hydra's own flags (no pre-composition), the job says the same
    proc = dtune(*SMOKE, "data=jsonl", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_clean_failure(proc, "data.source: the config chosen needs it set")
    assert proc.returncode == 2


@pytest.mark.integration
def test_malformed_json_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "bad.jsonl", [*rows(5), '{"prompt": "x", "completion": "y"', *rows(3)])
    proc = dtune(*SMOKE, "data=jsonl", f"data.source={path}", cwd=tmp_path)
    assert_clean_failure(proc, f"{path}:6: malformed JSON")


@pytest.mark.integration
def test_unknown_config_key(tmp_path: Path):
    proc = dtune(*SMOKE, "optim.learning_rate=1e-4", cwd=tmp_path)
    assert_clean_failure(proc, "dtune: error: overrides:", "learning_rate", "full_key: optim.learning_rate")
    assert proc.returncode == 2 and "+optim.learning_rate" not in proc.stderr  # a '+key' dtune would refuse too
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra made a run dir


@pytest.mark.integration
def test_wrong_type(tmp_path: Path):
    proc = dtune(*SMOKE, "lora.r=sixteen", cwd=tmp_path)
    assert_clean_failure(proc, "dtune: error: overrides:", "lora.r")
    assert proc.returncode == 2


@pytest.mark.integration
@pytest.mark.parametrize("override,message", [("optim.lr=-1e-4", "optim.lr: must be > 0"), ("lora.r=0", "lora.r: must be > 0")])
def test_impossible_values(tmp_path: Path, override: str, message: str):
    proc = dtune(*SMOKE, override, cwd=tmp_path)
    assert_clean_failure(proc, message)
    assert proc.returncode == 2


@pytest.mark.integration
def test_full_traceback_on_request(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "dtune", "train", *SMOKE, "lora.r=0"],
        cwd=tmp_path,
        env={**ENV, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "lora.r" in proc.stderr


@pytest.mark.integration
def test_failed_run_leaves_earlier_outputs_intact(tmp_path: Path):
    """A run that fails on bad input, pointed at the directory of a finished run, corrupts nothing there."""
    out = tmp_path / "run"
    assert dtune(*SMOKE, f"hydra.run.dir={out}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (out / "adapter").iterdir()}
    proc = dtune(*SMOKE, f"hydra.run.dir={out}", "data=jsonl", "data.source=missing.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert {p: p.read_bytes() for p in (out / "adapter").iterdir()} == before


@pytest.mark.integration
def test_console_script_usage_and_unknown_command(tmp_path: Path):
    script = Path(sys.executable).parent / "dtune"
    assert script.is_file(), "the dtune console script is not installed"
    usage = subprocess.run([str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "dtune train" in usage.stdout
    bad = subprocess.run([str(script), "trian"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


@pytest.mark.integration
def test_train_help_lists_the_config_groups(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "dtune", "train", "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for group in ("model:", "data:", "lora:", "quant:", "engine:", "optim:", "logger:", "launcher:", "experiment:", "debug:"):
        assert group in proc.stdout, group


def test_train_help_and_cfg_print_without_importing_the_training_stack(tmp_path: Path):
    """`dtune train --help` / `--cfg job` print what `dtune train` would compose, without transformers, PEFT and the
    loop (~5 s of imports on 2 cores)."""
    code = (
        "import sys\nfrom dtune.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('transformers', 'peft', 'dtune.train.loop') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "debug=smoke", "--cfg", "job"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "name_or_path: builtin:tiny-llama" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_cfg_resolve_of_a_config_missing_a_required_field_says_so_in_one_line(tmp_path: Path):
    """`dtune train data=jsonl --cfg job --resolve` without data.source printed OmegaConf's 40-line traceback."""
    argv = [sys.executable, "-m", "dtune", "train", "data=jsonl", "--cfg", "job", "--resolve"]
    proc = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        "dtune train: error: data.source: the config chosen needs it set; add data.source=... to the command line"
    )
    argv[5:5] = ["data.source=rows.jsonl", "-p", "data"]  # set: printed, resolved
    proc = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "source: rows.jsonl" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_sharding_engine_without_a_launcher_runs_as_one_process(tmp_path: Path, engine: str):
    """`dtune train engine=zero3` on one GPU, as the README's one-GPU line suggests: a process group of one (was:
    Accelerate's "Default process group has not been initialized" traceback under ZeRO)."""
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(ENV)  # no launcher
    proc = dtune(*SMOKE, f"engine={engine}", "train.max_steps=2", f"train.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--config-dir", "{conf}", "experiment=mine"],
        ["--config-dir={conf}", "experiment=mine"],
        ["hydra.searchpath=[file://{conf}]", "experiment=mine"],
        ["train.output_dir=out/${{hydra:job.name}}"],
    ],
    ids=["config-dir", "config-dir=", "searchpath (composed here too)", "hydra-interpolation"],
)
def test_cfg_resolve_leaves_what_only_hydra_composes_to_hydra(tmp_path: Path, capsys, argv: list[str]):
    """The one-line check before `--cfg job --resolve` composed dtune's own config from the overrides alone: an
    experiment from the user's --config-dir was 'not found', a ${hydra:...} interpolation 'not
    set', and the command exited 2 where Hydra prints the config."""
    from dtune.commands.config_info import check_resolvable

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ntrain:\n  max_steps: 7\n")
    check_resolvable([a.format(conf=tmp_path) for a in argv] + ["--cfg", "job", "--resolve"])  # no SystemExit
    assert capsys.readouterr().err == ""
