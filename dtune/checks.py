"""The checks of :func:`dtune.config.validate`, one function per concern: each appends to (or returns) a list of
errors, each naming its field and the reason, so that a config shows every problem at once."""

from __future__ import annotations

import re
from typing import Any

from dtune.assets import BUILTIN_PREFIX
from dtune.data.formats import FORMATS, PREFERENCE_FORMATS
from dtune.schema import BEST_METRICS, DPO_LOSSES, LORA_INITS, OBJECTIVES, REFERENCE_FREE, DtuneConfig


def one_of(errors: list[str], name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Append to ``errors`` when ``value`` is not one of ``allowed``, naming the field."""
    if value not in allowed:
        errors.append(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def positive(errors: list[str], name: str, value: float | int | None, allow_zero: bool = False) -> None:
    """Append to ``errors`` when ``value`` (None: unset, fine) is negative, or zero without ``allow_zero``."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def adapter_variant_errors(cfg: DtuneConfig) -> list[str]:
    """What PEFT cannot train among the adapter variants, each error naming its field and the reason."""
    e: list[str] = []
    lora, zero3 = cfg.lora, cfg.engine.strategy == "deepspeed" and cfg.engine.zero_stage == 3
    one_of(e, "lora.init", lora.init, LORA_INITS)
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
    positive(e, "optim.loraplus_lr_ratio", cfg.optim.loraplus_lr_ratio)
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


def early_stopping_errors(e: list[str], cfg: DtuneConfig) -> None:
    """train.early_stopping and train.keep_best: a metric that the evaluation reports, and evaluations to judge."""
    es = cfg.train.early_stopping
    one_of(e, "train.early_stopping.metric", es.metric, BEST_METRICS)
    positive(e, "train.early_stopping.patience", es.patience)
    positive(e, "train.early_stopping.min_delta", es.min_delta, allow_zero=True)
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


def preference_errors(e: list[str], cfg: DtuneConfig) -> None:
    """train.objective and pref.*: the objective's data format and settings; what preference training cannot do."""
    objective, pref, data = cfg.train.objective, cfg.pref, cfg.data
    one_of(e, "train.objective", objective, OBJECTIVES)
    one_of(e, "pref.loss_type", pref.loss_type, DPO_LOSSES)
    positive(e, "pref.beta", pref.beta)
    positive(e, "pref.gamma", pref.gamma, allow_zero=True)
    if not 0.0 <= pref.label_smoothing < 0.5:
        e.append(f"pref.label_smoothing: must be in [0, 0.5); got {pref.label_smoothing}")
    formats = {data.format} | {m.format or data.format for m in data.mix}
    # Settings of one objective that another would ignore (sft included: it reads no pref.* at all).
    if pref.beta is not None and objective == "sft":
        e.append("pref.beta: a preference objective's setting; train.objective is sft")
    if pref.gamma is not None and objective != "simpo":
        e.append(f"pref.gamma: SimPO's target margin; train.objective is {objective}")
    if pref.loss_type != "sigmoid" and objective != "dpo":
        e.append(f"pref.loss_type: {pref.loss_type} is a DPO loss; train.objective is {objective}")
    if pref.label_smoothing and not (objective == "dpo" and pref.loss_type == "sigmoid"):
        e.append("pref.label_smoothing: applies to train.objective=dpo with pref.loss_type=sigmoid only")
    for name in ("desirable_weight", "undesirable_weight"):
        if getattr(pref, name) != 1.0 and objective != "kto":
            e.append(f"pref.{name}: KTO's weight of a {name.split('_')[0]} completion; train.objective is {objective}")
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
        positive(e, "pref.desirable_weight", pref.desirable_weight)
        positive(e, "pref.undesirable_weight", pref.undesirable_weight)
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
    if cfg.train.precompute_ref and objective in REFERENCE_FREE:
        e.append(f"train.precompute_ref: train.objective={objective} has no reference")
    if cfg.train.init_adapter and objective == "dpo" and cfg.train.precompute_ref is False:
        e.append(
            "train.precompute_ref: is false, but with train.init_adapter the reference is the starting adapter, whose "
            "log-probabilities are taken before the first step: set it true (or null)"
        )
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


def streaming_errors(e: list[str], cfg: DtuneConfig) -> None:
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


def mix_errors(e: list[str], cfg: DtuneConfig) -> None:
    """data.mix: each source's format and weight (otherwise found only when the data loads, a bad format named as
    data.format)."""
    for i, source in enumerate(cfg.data.mix):
        if source.format is not None:
            one_of(e, f"data.mix[{i}].format", source.format, FORMATS)
        positive(e, f"data.mix[{i}].weight", source.weight)
        if not source.path:
            e.append(f"data.mix[{i}].path: is empty")
