"""Typed config schema for dtune, registered in Hydra's ConfigStore.

``conf/config.yaml`` lists ``dtune_schema`` first in its defaults, so every YAML file and every command-line
override is merged into these dataclasses: a misspelt key or a value of the wrong type fails at start and names
the field (``Key 'lrr' is not in struct ... full_key: optim.lrr``). Range and cross-field checks that a type
cannot express live in :func:`validate`, which reports every problem at once.

The training code receives a plain :class:`DtuneConfig` (``to_dataclass``), never a ``DictConfig``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from dtune.checks import (
    adapter_variant_errors,
    early_stopping_errors,
    mix_errors,
    one_of,
    positive,
    preference_errors,
    streaming_errors,
)
from dtune.data.formats import FORMATS
from dtune.distributed.env import job_dir_name, rank_suffix
from dtune.errors import ConfigError
from dtune.schema import (
    ENGINES,
    KERNELS,
    OVERLONG,
    PRECISIONS,
    QUANT_TYPES,
    SCHEDULES,
    WANDB_MODES,
    DtuneConfig,
)
from dtune.units import parse_bytes


def conf_dir() -> Path:
    """The shipped ``conf/`` tree: beside the package in a checkout, inside it (``dtune/conf``) when installed."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "conf"
    if (checkout / "config.yaml").is_file() and (here.parent / "pyproject.toml").is_file():
        return checkout
    if (here / "conf" / "config.yaml").is_file():
        return here / "conf"
    raise ConfigError(f"config: dtune's conf/ directory is missing (looked beside and inside {here})")


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore under the name that conf/config.yaml lists first, and the resolvers."""
    ConfigStore.instance().store(name="dtune_schema", node=DtuneConfig)
    OmegaConf.register_new_resolver("dtune_job_dir", job_dir_name, replace=True)
    OmegaConf.register_new_resolver("dtune_rank_suffix", rank_suffix, replace=True)
    OmegaConf.register_new_resolver("dtune_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("dtune_hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("dtune_required", required, replace=True)


def required(key: str, unless: str = "", *, _parent_: Any) -> str:
    """``${dtune_required:data.source,mix}``: a field that a config group needs the user to set (YAML's ``???`` does
    not do it here: merged over the schema's default, a missing value leaves the default in place, and ``data=jsonl``
    would train on the built-in data), unless its sibling ``unless`` is set (``data.mix`` replaces ``data.source``:
    then ""). Resolved only when not overridden. Raises ConfigError naming the field."""
    if unless and _parent_.get(unless):
        return ""
    raise ConfigError(f"{key}: the config chosen needs it set; add {key}=... to the command line")


def run_dir(output_dir: str | None) -> str:
    """Hydra's run directory (``.hydra/``, ``dtune.log``): ``train.output_dir`` when set, so that a run's logs and
    config record sit beside its checkpoints and adapter (a resumed run appends to the same ``dtune.log``);
    otherwise ``outputs/<one folder per job>``."""
    if output_dir and not Path(output_dir).is_file():
        return str(output_dir)
    return f"outputs/{job_dir_name()}"  # (a train.output_dir that is a file: refused by validate, in one line)


def hydra_subdir(output_dir: str | None) -> str:
    """Where Hydra records the composed config and overrides in the run dir: ``.hydra/``; in a ``train.output_dir``,
    which every start of the run (resumes, requeued jobs, a second launch refused because the first still runs)
    shares, ``.hydra/<start>/``, so that no start overwrites another's record."""
    return f".hydra/{job_dir_name()}" if output_dir else ".hydra"


register_configs()


def validate(cfg: DtuneConfig) -> None:
    """Range and cross-field checks. Raises ConfigError listing every problem, each naming its field."""
    e: list[str] = []
    positive(e, "optim.lr", cfg.optim.lr)
    positive(e, "optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    positive(e, "optim.eps", cfg.optim.eps)
    positive(e, "optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    positive(e, "optim.max_grad_norm", cfg.optim.max_grad_norm)
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        e.append(f"optim.betas: must be two numbers in [0, 1); got {list(cfg.optim.betas)}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        e.append(f"optim.min_lr_ratio: must be in [0, 1]; got {cfg.optim.min_lr_ratio}")
    one_of(e, "optim.schedule", cfg.optim.schedule, SCHEDULES)
    if cfg.train.output_dir and Path(cfg.train.output_dir).exists() and not Path(cfg.train.output_dir).is_dir():
        e.append(f"train.output_dir: {cfg.train.output_dir} is a file, not a directory")
    steps = cfg.train.max_steps  # a length in epochs (given, or the default) is checked once the data is known
    if steps is not None and cfg.optim.warmup_steps > steps:
        e.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.max_steps ({steps})")

    positive(e, "lora.r", cfg.lora.r)
    positive(e, "lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        e.append(f"lora.dropout: must be in [0, 1); got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        e.append("lora.target_modules: must name at least one module")
    one_of(e, "lora.bias", cfg.lora.bias, ("none", "all", "lora_only"))
    e.extend(adapter_variant_errors(cfg))

    one_of(e, "quant.quant_type", cfg.quant.quant_type, QUANT_TYPES)
    one_of(e, "quant.kernel", cfg.quant.kernel, KERNELS)
    if cfg.quant.kernel == "triton" and cfg.quant.quant_type != "nf4":
        e.append(f"quant.kernel: triton implements NF4 only; got quant.quant_type={cfg.quant.quant_type}")
    if cfg.quant.fuse_lora and cfg.quant.kernel != "triton":
        e.append(f"quant.fuse_lora: needs quant.kernel=triton (the fused NF4 kernels); got quant.kernel={cfg.quant.kernel}")
    one_of(e, "engine.strategy", cfg.engine.strategy, ENGINES)
    if cfg.engine.strategy == "fsdp2" and cfg.train.precision == "fp16":
        e.append("train.precision: fp16 (loss scaling) is not supported with engine.strategy=fsdp2; use bf16")
    zero3 = cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage == 3
    if cfg.engine.offload_params and not (zero3 or cfg.engine.strategy == "fsdp2"):
        e.append("engine.offload_params: needs engine.strategy=fsdp2, or deepspeed with engine.zero_stage=3")
    if cfg.engine.offload_optimizer and cfg.engine.strategy not in ("deepspeed", "fsdp2"):
        e.append("engine.offload_optimizer: needs engine.strategy=deepspeed or fsdp2")
    if cfg.engine.strategy == "fsdp2" and cfg.engine.offload_params != cfg.engine.offload_optimizer:
        # torch's CPUOffloadPolicy moves parameters, gradients and optimizer states together: no half of it exists.
        e.append(
            "engine.offload_params: with engine.strategy=fsdp2, parameters, gradients and optimizer states are "
            "offloaded together (engine=fsdp2_offload); set engine.offload_params and engine.offload_optimizer alike"
        )
    if cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage not in (1, 2, 3):
        e.append(f"engine.zero_stage: must be 1, 2 or 3 with engine.strategy=deepspeed; got {cfg.engine.zero_stage}")

    positive(e, "train.max_steps", cfg.train.max_steps)
    positive(e, "train.epochs", cfg.train.epochs)
    if cfg.train.max_steps is not None and cfg.train.epochs is not None:
        e.append(
            f"train.epochs and train.max_steps: both set ({cfg.train.epochs} and {cfg.train.max_steps}); set one and the "
            "other to null (e.g. train.max_steps=null train.epochs=2; a config such as debug=smoke may set max_steps)"
        )
    early_stopping_errors(e, cfg)
    positive(e, "train.micro_batch_size", cfg.train.micro_batch_size)
    positive(e, "train.grad_accum_steps", cfg.train.grad_accum_steps)
    positive(e, "train.eval_every", cfg.train.eval_every, allow_zero=True)
    positive(e, "train.eval_batch_size", cfg.train.eval_batch_size)
    one_of(e, "train.precision", cfg.train.precision, PRECISIONS)
    positive(e, "train.checkpoint_every", cfg.train.checkpoint_every, allow_zero=True)
    positive(e, "train.keep_checkpoints", cfg.train.keep_checkpoints)
    positive(e, "train.loss_chunk_tokens", cfg.train.loss_chunk_tokens, allow_zero=True)
    positive(e, "train.peak_tflops", cfg.train.peak_tflops)
    if cfg.train.gpu_mem is not None:  # read before loading; else a typo is found after the model is fetched
        try:
            if parse_bytes(cfg.train.gpu_mem, "train.gpu_mem", default_unit="G") <= 0:
                e.append(f"train.gpu_mem: must be > 0; got {cfg.train.gpu_mem!r}")
        except ConfigError as err:
            e.append(str(err))

    positive(e, "data.max_seq_len", cfg.data.max_seq_len)
    positive(e, "data.num_proc", cfg.data.num_proc)
    positive(e, "data.eval_size", cfg.data.eval_size, allow_zero=True)
    positive(e, "data.train_size", cfg.data.train_size)
    one_of(e, "data.overlong", cfg.data.overlong, OVERLONG)
    one_of(e, "data.format", cfg.data.format, FORMATS)
    one_of(e, "data.train_on", cfg.data.train_on, ("completion", "all"))
    one_of(e, "data.bad_rows", cfg.data.bad_rows, ("error", "skip"))
    if cfg.data.format == "text" and cfg.data.choices:
        e.append("data.choices: the text format has no answers to score")
    if cfg.data.eval_fraction is not None and not 0.0 < cfg.data.eval_fraction < 1.0:
        e.append(f"data.eval_fraction: must be in (0, 1); got {cfg.data.eval_fraction}")
    if cfg.data.eval_fraction is not None and cfg.data.eval_source is not None:
        e.append("data.eval_fraction: not with data.eval_source (held-out rows come from that file, none from the training data)")
    if cfg.data.eval_source is None and cfg.data.eval_size == 0 and cfg.data.eval_fraction is None:
        e.append("data.eval_size: is 0 and data.eval_source is null, so there is nothing to evaluate on")
    if cfg.data.choices is not None and len(set(cfg.data.choices)) < 2:
        e.append(f"data.choices: needs at least two distinct answers; got {list(cfg.data.choices)}")
    if cfg.data.system_prompt is not None and not cfg.data.chat_template:
        e.append("data.system_prompt: is set but data.chat_template is false (a system prompt needs the template)")
    mix_errors(e, cfg)
    streaming_errors(e, cfg)
    preference_errors(e, cfg)

    one_of(e, "logger.mode", cfg.logger.mode, WANDB_MODES)
    positive(e, "logger.log_every", cfg.logger.log_every)
    positive(e, "launcher.nproc_per_node", cfg.launcher.nproc_per_node)
    positive(e, "launcher.nnodes", cfg.launcher.nnodes)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def to_dataclass(cfg: DictConfig) -> DtuneConfig:
    """Resolve interpolations and convert the composed config to the typed dataclass tree, once, at the entry."""
    try:
        unknown = _unknown_keys(cfg, OmegaConf.structured(DtuneConfig))
    except InterpolationResolutionError as err:
        raise own_error(err) from None
    if unknown:
        raise ConfigError(
            f"config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (added with '+'? dtune reads only "
            "the keys of its schema; see `dtune train --cfg job` for them)"
        )
    try:
        obj = OmegaConf.to_object(cfg)
    except InterpolationResolutionError as err:
        raise own_error(err) from None
    if not isinstance(obj, DtuneConfig):  # composed without the schema (a user's own config.yaml)
        raise ConfigError("config: the primary config must list 'dtune_schema' first in its defaults")
    return obj


def own_error(err: InterpolationResolutionError) -> Exception:
    """A dtune resolver's own ConfigError (``dtune_required``) as it was raised, not wrapped by OmegaConf."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _unknown_keys(node: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys of ``node`` that the schema lacks, as dotted paths. Hydra's ``+key=value`` adds keys past the struct flag,
    and converting to the dataclass would drop them silently."""
    found = []
    for key in node:
        path = f"{prefix}{key}"
        if key not in schema:
            found.append(path)
        elif isinstance(schema[key], DictConfig) and OmegaConf.get_type(schema, str(key)) is dict:
            continue  # a free-keyed field (lora.rank_pattern): its keys are the user's
        elif isinstance(node[key], DictConfig) and isinstance(schema[key], DictConfig):
            found += _unknown_keys(node[key], schema[key], path + ".")
    return found


def compose(overrides: list[str], check: bool = True) -> DtuneConfig:
    """The typed config ``dtune train <overrides>`` runs with, composed outside a Hydra job (commands, benchmarks,
    tests). ``check``: also run :func:`validate` (off only to test validation itself).

    Raises :class:`~dtune.errors.ConfigError` naming the bad override, key or value.
    """
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = to_dataclass(hydra_compose(config_name="config", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides: {_composition_error(err)}") from None
    if check:
        validate(cfg)
    return cfg


def _composition_error(err: BaseException) -> str:
    """Hydra's message and its cause's (OmegaConf names the key: ``Key 'lrr' not in 'OptimConfig' (full_key:
    optim.lrr)``), without the config search path; the available options when a group option is unknown."""
    parts = []
    for e in (err, err.__cause__):
        if e is None:
            continue
        text = str(e).split("Config search path:")[0]
        text = re.sub(r"To append to your config use \+\S+", "", text)  # dtune reads only its schema's keys
        lines = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith(("reference_type", "object_type"))
        ]
        parts.append(" ".join(lines))
    return "; ".join(parts)


def load_saved(path: Path) -> DtuneConfig:
    """The typed config a run saved (``config_resolved.yaml``, a checkpoint's ``config.yaml``), merged over the schema's
    defaults so that a file from an older dtune gains the fields added since. Not re-validated: it was when it ran,
    and a check added later must not lock a trained adapter out of merge, generate and eval.

    Raises :class:`~dtune.errors.ConfigError` naming the file when it does not fit the schema.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DtuneConfig), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: not a dtune config ({str(err).splitlines()[0]})") from None
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DtuneConfig)  # merged over the structured schema
    return obj
