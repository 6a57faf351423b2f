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
from omegaconf.errors import OmegaConfBaseException

from dtune.assets import BUILTIN_PREFIX
from dtune.data.formats import FORMATS, PREFERENCE_FORMATS
from dtune.distributed.env import job_dir_name, rank_suffix
from dtune.errors import ConfigError
from dtune.schema import (
    BEST_METRICS,
    DPO_LOSSES,
    ENGINES,
    KERNELS,
    LORA_INITS,
    OBJECTIVES,
    OVERLONG,
    PRECISIONS,
    QUANT_TYPES,
    REFERENCE_FREE,
    SCHEDULES,
    WANDB_MODES,
    DtuneConfig,
)


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


register_configs()


def _one_of(errors: list[str], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def _positive(errors: list[str], name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def _adapter_variant_errors(cfg: DtuneConfig) -> list[str]:
    """What PEFT cannot train among the adapter variants, each error naming its field and the reason."""
    e: list[str] = []
    lora, zero3 = cfg.lora, cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage == 3
    _one_of(e, "lora.init", lora.init, LORA_INITS)
    quantized = cfg.quant.quant_type != "none"
    if lora.init in ("pissa", "olora") and quantized:
        e.append(
            f"lora.init: {lora.init} moves part of each base weight into the adapter, which needs the 16-bit weight: "
            f"PEFT's PiSSA refuses a 4-bit base, and its OLoRA re-quantizes the residual, so the adapter would not "
            f"reproduce training on the published 4-bit base. Use quant=none, or lora.init=loftq for a 4-bit base"
        )
    if lora.init == "loftq" and not quantized:
        e.append("lora.init: loftq fits the adapter to the 4-bit quantization error; with quant=none there is none")
    if lora.init == "loftq" and lora.use_dora:
        e.append("lora.init: loftq with lora.use_dora: PEFT sets LoftQ's A and B after DoRA took its magnitudes from the base")
    if lora.init in ("pissa", "olora", "loftq") and zero3:
        e.append(
            f"lora.init: {lora.init} reads each whole base weight when the adapters are made; ZeRO-3 partitions them at load"
        )
    for name, pattern in (("lora.rank_pattern", lora.rank_pattern), ("lora.alpha_pattern", lora.alpha_pattern)):
        for key, value in pattern.items():
            if value <= 0:
                e.append(f"{name}: {key}: must be > 0; got {value}")
            try:
                re.compile(key)
            except re.error as err:
                e.append(f"{name}: {key!r} is not a regular expression ({err})")
    if lora.layers_to_transform is not None and (not lora.layers_to_transform or min(lora.layers_to_transform) < 0):
        e.append(f"lora.layers_to_transform: must list layer indices >= 0 (or be null); got {list(lora.layers_to_transform)}")
    _positive(e, "optim.loraplus_lr_ratio", cfg.optim.loraplus_lr_ratio)
    if (cfg.model.add_tokens or cfg.model.add_special_tokens) and zero3:
        e.append(
            "model.add_tokens: not under ZeRO-3, which partitions the embedding at load: growing it and PEFT's trained "
            "token rows (read outside the embedding's own forward) need it whole; use engine=fsdp2, which shards it"
        )
    if lora.modules_to_save and (cfg.model.add_tokens or cfg.model.add_special_tokens):
        for name in lora.modules_to_save:
            if name in ("embed_tokens", "lm_head"):
                e.append(f"lora.modules_to_save: {name} trains in full; model.add_tokens would train some of its rows twice")
    return e


def _early_stopping(e: list[str], cfg: DtuneConfig) -> None:
    """train.early_stopping and train.keep_best: a metric that the evaluation reports, and evaluations to judge."""
    es = cfg.train.early_stopping
    _one_of(e, "train.early_stopping.metric", es.metric, BEST_METRICS)
    _positive(e, "train.early_stopping.patience", es.patience)
    _positive(e, "train.early_stopping.min_delta", es.min_delta, allow_zero=True)
    used = [name for name, on in (("train.early_stopping.enabled", es.enabled), ("train.keep_best", cfg.train.keep_best)) if on]
    if not used:
        return
    if es.metric == "accuracy" and not cfg.data.choices and cfg.train.objective == "sft":
        e.append(
            f"train.early_stopping.metric: accuracy is measured only with data.choices (an answer set); "
            f"it is null, and {' and '.join(used)} would judge by it; use metric=loss or set data.choices"
        )
    if not cfg.train.eval_every:
        e.append(
            f"train.eval_every: is 0 (evaluations only before and after training), so {' and '.join(used)} has no "
            "evaluations to judge; set train.eval_every > 0"
        )


def _preference(e: list[str], cfg: DtuneConfig) -> None:
    """train.objective and pref.*: the objective's data format and settings; what preference training cannot do."""
    objective, pref, data = cfg.train.objective, cfg.pref, cfg.data
    _one_of(e, "train.objective", objective, OBJECTIVES)
    _one_of(e, "pref.loss_type", pref.loss_type, DPO_LOSSES)
    _positive(e, "pref.beta", pref.beta)
    _positive(e, "pref.gamma", pref.gamma, allow_zero=True)
    if not 0.0 <= pref.label_smoothing < 0.5:
        e.append(f"pref.label_smoothing: must be in [0, 0.5); got {pref.label_smoothing}")
    formats = {data.format} | {m.format or data.format for m in data.mix}
    if objective == "sft":
        if cfg.train.precompute_ref:
            e.append("train.precompute_ref: train.objective=sft has no reference")
        if used := sorted(formats & set(PREFERENCE_FORMATS)):
            e.append(
                f"data.format: {', '.join(used)} rows train a preference objective; set train.objective=dpo, orpo, simpo "
                "(pairs) or kto"
            )
        return
    if objective not in OBJECTIVES:
        return
    if objective == "kto":
        if formats != {"kto"}:
            e.append(
                "data.format: train.objective=kto trains on completions labelled desirable or not ({prompt, completion, "
                f"label}}): set data.format=kto (and each data.mix source's format); got {', '.join(sorted(formats))}"
            )
        if cfg.train.micro_batch_size < 2:
            e.append("train.micro_batch_size: KTO's KL estimate pairs each prompt with another row's completion: at least 2")
        if cfg.train.precompute_ref or cfg.train.init_adapter:
            name = "train.precompute_ref" if cfg.train.precompute_ref else "train.init_adapter"
            e.append(
                f"{name}: not with train.objective=kto (its KL rows pair completions within a micro-batch, which a "
                "reference computed before training cannot know)"
            )
        _positive(e, "pref.desirable_weight", pref.desirable_weight)
        _positive(e, "pref.undesirable_weight", pref.undesirable_weight)
    elif formats != {"preference"}:
        e.append(
            f"data.format: train.objective={objective} trains on preference pairs ({{prompt, chosen, rejected}}): set "
            f"data=preference, or data.format=preference (and each data.mix source's format); got {', '.join(sorted(formats))}"
        )
    if objective not in REFERENCE_FREE and cfg.lora.init in ("pissa", "olora", "loftq"):
        e.append(
            f"lora.init: {cfg.lora.init} starts the adapter away from zero (moving part of each base weight into it, or "
            f"fitting the quantization error), so the adapter switched off is not the policy train.objective={objective} "
            "starts from, which must be its reference; use lora.init=default or gaussian (or orpo, simpo)"
        )
    if objective not in REFERENCE_FREE and cfg.lora.bias != "none":
        e.append(
            f"lora.bias: {cfg.lora.bias} trains biases that switching the adapter off keeps, so the reference of "
            f"train.objective={objective} would move with training; use lora.bias=none"
        )
    if pref.gamma is not None and objective != "simpo":
        e.append(f"pref.gamma: SimPO's target margin; train.objective is {objective}")
    if cfg.train.precompute_ref and objective in REFERENCE_FREE:
        e.append(f"train.precompute_ref: train.objective={objective} has no reference")
    if cfg.train.init_adapter and objective == "dpo" and cfg.train.precompute_ref is False:
        e.append(
            "train.precompute_ref: is false, but with train.init_adapter the reference is the starting adapter, whose "
            "log-probabilities are taken before the first step: set it true (or null)"
        )
    if pref.loss_type != "sigmoid" and objective != "dpo":
        e.append(f"pref.loss_type: {pref.loss_type} is a DPO loss; train.objective is {objective}")
    if pref.label_smoothing and not (objective == "dpo" and pref.loss_type == "sigmoid"):
        e.append("pref.label_smoothing: applies to train.objective=dpo with pref.loss_type=sigmoid only")
    for name, on in (
        ("data.packing", data.packing),
        ("data.streaming", data.streaming),
        ("data.choices", bool(data.choices)),
        ("data.train_on=all", data.train_on == "all"),
    ):
        if on:
            e.append(
                f"{name.split('=')[0]}: not with train.objective={objective} (a pair is two rows of its own; data=preference "
                "sets the data group for pairs)"
            )


def _streaming(e: list[str], cfg: DtuneConfig) -> None:
    """data.streaming: a run's length in steps, one source of files, the held-out rows from its first shard."""
    data = cfg.data
    if not data.streaming:
        return
    why = "with data.streaming (a stream's length is not known in advance)"
    if cfg.train.max_steps is None:
        e.append(f"train.max_steps: must be set {why}")
    if cfg.train.epochs is not None:
        e.append(f"train.epochs: not {why}; set train.epochs=null and train.max_steps")
    if data.mix:
        e.append("data.mix: not with data.streaming (one data.source: a .jsonl or .parquet file, a folder or a glob of them)")
    if data.source.startswith(BUILTIN_PREFIX):
        e.append(f"data.source: data.streaming reads .jsonl or .parquet files (a file, a folder or a glob); got {data.source}")
    if data.eval_fraction is not None:
        e.append(
            "data.eval_fraction: not with data.streaming (the number of rows is not known); hold out data.eval_size rows "
            "of the first shard, or give data.eval_source"
        )
    if data.train_size is not None:
        e.append("data.train_size: not with data.streaming (the stream reads every row); set it to null")


def validate(cfg: DtuneConfig) -> None:
    """Range and cross-field checks. Raises ConfigError listing every problem, each naming its field."""
    e: list[str] = []
    _positive(e, "optim.lr", cfg.optim.lr)
    _positive(e, "optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive(e, "optim.eps", cfg.optim.eps)
    _positive(e, "optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    _positive(e, "optim.max_grad_norm", cfg.optim.max_grad_norm)
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        e.append(f"optim.betas: must be two numbers in [0, 1); got {list(cfg.optim.betas)}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        e.append(f"optim.min_lr_ratio: must be in [0, 1]; got {cfg.optim.min_lr_ratio}")
    _one_of(e, "optim.schedule", cfg.optim.schedule, SCHEDULES)
    steps = cfg.train.max_steps  # a length in epochs (given, or the default) is checked once the data is known
    if steps is not None and cfg.optim.warmup_steps > steps:
        e.append(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.max_steps ({steps})")

    _positive(e, "lora.r", cfg.lora.r)
    _positive(e, "lora.alpha", cfg.lora.alpha)
    if not 0.0 <= cfg.lora.dropout < 1.0:
        e.append(f"lora.dropout: must be in [0, 1); got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        e.append("lora.target_modules: must name at least one module")
    _one_of(e, "lora.bias", cfg.lora.bias, ("none", "all", "lora_only"))
    e.extend(_adapter_variant_errors(cfg))

    _one_of(e, "quant.quant_type", cfg.quant.quant_type, QUANT_TYPES)
    _one_of(e, "quant.kernel", cfg.quant.kernel, KERNELS)
    if cfg.quant.kernel == "triton" and cfg.quant.quant_type != "nf4":
        e.append(f"quant.kernel: triton implements NF4 only; got quant.quant_type={cfg.quant.quant_type}")
    if cfg.quant.fuse_lora and cfg.quant.kernel != "triton":
        e.append(f"quant.fuse_lora: needs quant.kernel=triton (the fused NF4 kernels); got quant.kernel={cfg.quant.kernel}")
    _one_of(e, "engine.strategy", cfg.engine.strategy, ENGINES)
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

    _positive(e, "train.max_steps", cfg.train.max_steps)
    _positive(e, "train.epochs", cfg.train.epochs)
    if cfg.train.max_steps is not None and cfg.train.epochs is not None:
        e.append(
            f"train.epochs and train.max_steps: both set ({cfg.train.epochs} and {cfg.train.max_steps}); set one and the "
            "other to null (e.g. train.max_steps=null train.epochs=2; a config such as debug=smoke may set max_steps)"
        )
    _early_stopping(e, cfg)
    _positive(e, "train.micro_batch_size", cfg.train.micro_batch_size)
    _positive(e, "train.grad_accum_steps", cfg.train.grad_accum_steps)
    _positive(e, "train.eval_every", cfg.train.eval_every, allow_zero=True)
    _positive(e, "train.eval_batch_size", cfg.train.eval_batch_size)
    _one_of(e, "train.precision", cfg.train.precision, PRECISIONS)
    _positive(e, "train.checkpoint_every", cfg.train.checkpoint_every, allow_zero=True)
    _positive(e, "train.keep_checkpoints", cfg.train.keep_checkpoints)
    _positive(e, "train.loss_chunk_tokens", cfg.train.loss_chunk_tokens, allow_zero=True)

    _positive(e, "data.max_seq_len", cfg.data.max_seq_len)
    _positive(e, "data.num_proc", cfg.data.num_proc)
    _positive(e, "data.eval_size", cfg.data.eval_size, allow_zero=True)
    _positive(e, "data.train_size", cfg.data.train_size)
    _one_of(e, "data.overlong", cfg.data.overlong, OVERLONG)
    _one_of(e, "data.format", cfg.data.format, FORMATS)
    _one_of(e, "data.train_on", cfg.data.train_on, ("completion", "all"))
    _one_of(e, "data.bad_rows", cfg.data.bad_rows, ("error", "skip"))
    if cfg.data.format == "text" and cfg.data.choices:
        e.append("data.choices: the text format has no answers to score")
    if cfg.data.eval_fraction is not None and not 0.0 < cfg.data.eval_fraction < 1.0:
        e.append(f"data.eval_fraction: must be in (0, 1); got {cfg.data.eval_fraction}")
    if cfg.data.eval_source is None and cfg.data.eval_size == 0 and cfg.data.eval_fraction is None:
        e.append("data.eval_size: is 0 and data.eval_source is null, so there is nothing to evaluate on")
    if cfg.data.choices is not None and len(set(cfg.data.choices)) < 2:
        e.append(f"data.choices: needs at least two distinct answers; got {list(cfg.data.choices)}")
    if cfg.data.system_prompt is not None and not cfg.data.chat_template:
        e.append("data.system_prompt: is set but data.chat_template is false (a system prompt needs the template)")
    _streaming(e, cfg)
    _preference(e, cfg)

    _one_of(e, "logger.mode", cfg.logger.mode, WANDB_MODES)
    _positive(e, "logger.log_every", cfg.logger.log_every)
    _positive(e, "launcher.nproc_per_node", cfg.launcher.nproc_per_node)
    _positive(e, "launcher.nnodes", cfg.launcher.nnodes)
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))


def to_dataclass(cfg: DictConfig) -> DtuneConfig:
    """Resolve interpolations and convert the composed config to the typed dataclass tree, once, at the entry."""
    if unknown := _unknown_keys(cfg, OmegaConf.structured(DtuneConfig)):
        raise ConfigError(
            f"config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (added with '+'? dtune reads only "
            "the keys of its schema; see `dtune train --cfg job` for them)"
        )
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, DtuneConfig):  # composed without the schema (a user's own config.yaml)
        raise ConfigError("config: the primary config must list 'dtune_schema' first in its defaults")
    return obj


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
