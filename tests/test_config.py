"""Every shipped config composes and validates; typos, wrong types and impossible values fail naming the field."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dtune.config import conf_dir, validate
from dtune.errors import ConfigError
from tests.helpers import REPO, compose_config

GROUPS = ["model", "data", "lora", "quant", "engine", "optim", "logger", "launcher", "experiment", "debug"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def test_every_group_exists_and_has_an_option():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_shipped_option_composes_and_validates(group: str, option: str):
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("jsonl", "preference"):
        overrides.append("data.source=train.jsonl")  # the one field that option leaves for the user
    if group == "data" and option in ("preference", "rotten_tomatoes_pairs"):
        overrides.append("train.objective=dpo")  # pairs train a preference objective
    if group == "experiment" and option == "sentiment_dpo":
        overrides.append("train.init_adapter=outputs/sft")  # the SFT run it goes on from
    cfg = compose_config(overrides)
    validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [(["data=jsonl"], "data.source"), (["data=preference"], "data.source"), (["experiment=sentiment_dpo"], "train.init_adapter")],
)
def test_a_field_the_chosen_config_leaves_to_the_user_must_be_set(overrides: list[str], field: str):
    """YAML's ``???`` merged over the schema's default keeps the default: ``data=jsonl`` without ``data.source`` trained
    on the built-in reviews (a newcomer's run started on all 10,746 rows), and experiment=sentiment_dpo without
    ``train.init_adapter`` would run DPO from a fresh adapter. Both are refused, naming the field."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: the config chosen needs it set; add {re.escape(field)}="):
        compose_config(overrides)
    if field == "data.source":  # a mixture replaces it
        assert compose_config([*overrides, "data.mix=[{path: a.jsonl, weight: 2}]"]).data.mix[0].weight == 2


def test_default_job_is_the_sentiment_experiment():
    default = compose_config()
    spelled_out = compose_config(["experiment=sentiment_smollm2"])
    assert default == spelled_out
    assert default.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert default.quant.quant_type == "nf4" and default.quant.double_quant
    # 135M parameters at <=256 tokens: activations are small, and recomputing them costs a third more compute
    assert not default.model.gradient_checkpointing
    assert default.train.max_steps is None and default.train.epochs is None  # one epoch


def test_command_line_overrides_reach_the_typed_config():
    cfg = compose_config(["optim.lr=1e-3", "lora.r=4", "train.precision=fp32", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.optim.lr == 1e-3 and cfg.lora.r == 4 and cfg.train.precision == "fp32"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"Could not override 'optim.lrr'.*Key 'lrr' not in 'OptimConfig' full_key: optim.lrr"):
        compose_config(["optim.lrr=1e-3"])


@pytest.mark.parametrize("override,key", [("+no_such_key=1", "no_such_key"), ("+optim.lr_typo=2", "optim.lr_typo")])
def test_keys_added_with_plus_fail_naming_them(override: str, key: str):
    """Hydra's ``+`` adds keys past the schema's struct flag; dtune must not train while ignoring them."""
    with pytest.raises(ConfigError, match=rf"config: unknown key {key} \(added with '\+'"):
        compose_config([override])


def test_wrong_type_fails_naming_the_field():
    with pytest.raises(
        ConfigError, match=r"Value 'many' of type 'str' could not be converted to Integer full_key: train.max_steps"
    ):
        compose_config(["train.max_steps=many"])


def test_unknown_option_lists_the_available_ones():
    with pytest.raises(
        ConfigError, match=r"Could not find 'engine/zero9' Available options in 'engine': ddp fsdp2 fsdp2_offload zero1"
    ):
        compose_config(["engine=zero9"])


@pytest.mark.parametrize(
    "override,field",
    [
        ("optim.lr=-1e-4", "optim.lr"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("train.precision=fp8", "train.precision"),
        ("quant.quant_type=int3", "quant.quant_type"),
        ("data.eval_size=0", "data.eval_size"),
        ("data.choices=[yes]", "data.choices"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("data.mix=[{path: a.jsonl, format: chats}]", "data.mix[0].format"),  # was found at load, named data.format
        ("data.mix=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]", "data.mix[1].weight"),
        ("train.gpu_mem=80GBi", "train.gpu_mem: cannot read '80GBi'"),  # was read after the model was fetched
        ("train.gpu_mem=0", "train.gpu_mem: must be > 0"),  # was no check at all
        ("train.peak_tflops=-989", "train.peak_tflops"),  # was a negative MFU
    ],
)
def test_impossible_values_are_refused_naming_the_field(override: str, field: str):
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["engine=ddp", "engine.offload_params=true"], "engine.offload_params: needs engine.strategy=fsdp2, or deepspeed"),
        (["engine=zero2", "engine.offload_params=true"], "engine.offload_params: needs engine.strategy=fsdp2, or deepspeed"),
        (["engine=ddp", "engine.offload_optimizer=true"], "engine.offload_optimizer: needs engine.strategy=deepspeed or fsdp2"),
        (["engine=fsdp2", "engine.offload_optimizer=true"], "offloaded together (engine=fsdp2_offload)"),
        (["engine=fsdp2_offload", "engine.offload_optimizer=false"], "offloaded together (engine=fsdp2_offload)"),
    ],
)
def test_offload_combinations_an_engine_lacks_are_refused(overrides: list[str], message: str):
    """FSDP2's CPUOffloadPolicy moves parameters, gradients and optimizer states together; DDP offloads nothing."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(overrides))


def test_a_held_out_fraction_beside_a_held_out_file_is_refused():
    """data.eval_fraction with data.eval_source was accepted and went unused: every row of data.source was trained on."""
    cfg = compose_config(["data=jsonl", "data.source=a.jsonl", "data.eval_source=b.jsonl", "data.eval_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: not with data\.eval_source"):
        validate(cfg)


def test_all_problems_are_reported_at_once():
    cfg = compose_config(["optim.lr=-1", "lora.r=0"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "optim.lr" in str(err.value) and "lora.r" in str(err.value)


@pytest.mark.integration
def test_installed_wheel_ships_the_configs(tmp_path: Path):
    """A non-editable install finds conf/ inside the package (dtune/conf), and it composes."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("dtune-*.whl")
    shipped = {p.relative_to(conf_dir()).as_posix() for p in conf_dir().rglob("*.yaml")}
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n.removeprefix("dtune/conf/") for n in zf.namelist() if n.startswith("dtune/conf/")}
        zf.extractall(tmp_path / "site")
    assert shipped <= in_wheel, f"missing from the wheel: {sorted(shipped - in_wheel)}"
    probe = (
        "from hydra import compose, initialize_config_dir\n"
        "from dtune.config import conf_dir, to_dataclass, validate\n"
        "d = conf_dir()\n"
        "with initialize_config_dir(config_dir=str(d), version_base=None):\n"
        "    validate(to_dataclass(compose(config_name='config', overrides=['model=tiny_llama'])))\n"
        "print(d)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(out.stdout.strip()) == tmp_path / "site" / "dtune" / "conf"


def test_an_output_dir_that_is_a_file_is_refused_and_hydra_does_not_trip_on_it(tmp_path: Path):
    """train.output_dir is also Hydra's run dir; a file there must reach validate's one-line error, not Hydra's
    FileExistsError traceback."""
    from dtune.config import hydra_subdir, run_dir

    file = tmp_path / "train.jsonl"
    file.write_text("{}\n")
    with pytest.raises(ConfigError, match=re.escape(f"train.output_dir: {file} is a file, not a directory")):
        validate(compose_config([f"train.output_dir={file}"]))
    assert run_dir(str(file)).startswith("outputs/") and run_dir(str(tmp_path / "new")) == str(tmp_path / "new")
    assert hydra_subdir(None) == ".hydra" and hydra_subdir(str(tmp_path)).startswith(".hydra/")  # one record per start
