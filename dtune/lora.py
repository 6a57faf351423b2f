"""The LoRA adapter dtune attaches: PEFT's LoraConfig from ``cfg.lora`` and the set-up some variants need.

One owner of the adapter's configuration (training, the memory plan and the benchmarks build it here); the variants
themselves are PEFT's (DoRA, rsLoRA, inits, LoRA+, trained token rows), never re-implemented.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.errors import ConfigError
from dtune.schema import DtuneConfig

log = logging.getLogger(__name__)

DORA_NORM_FLOOR = 1e-12  # DoRA's column norm at least this: a zero row of W (Llama-3.1-8B's o_proj has 511) gives 0, not 0/0


def dora_norms_in_fp32(model: nn.Module) -> int:
    """Every DoRA linear layer of ``model`` computes its column norm ``||W + s BA||`` in fp32, floored at
    :data:`DORA_NORM_FLOOR` and rounded to the dtype of the magnitude it divides, in training, evaluation and merging
    alike; returns how many layers.

    PEFT (0.21) computes it in the activations' dtype, while the magnitude it divides was initialised in fp32: in bf16
    the rounding of the norm moves every layer's output before any step (the adapter at init, meant to be the base,
    scored 3% lower held-out loss than the base on SmolLM2-135M), and a zero row of W divides 0 by 0 at the first
    forward. The same fix is proposed upstream (huggingface/peft#3237); DoRA itself (Liu et al. 2024,
    arXiv:2402.09353) stays PEFT's.
    """
    import types

    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.other import transpose

    def weight_norm(self: Any, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float, adapter_name: Any = None):
        full = transpose(weight, self.fan_in_fan_out).to(torch.float32, copy=True)  # (one fp32 temporary)
        full.add_(lora_weight.to(torch.float32), alpha=scaling)
        norm = torch.linalg.norm(full, dim=1).clamp_min(DORA_NORM_FLOOR)
        # Rounded as the magnitude it divides is (FSDP2's and DeepSpeed's bf16 copies; fp32 under DDP and merge), so
        # their ratio is 1 at init under every engine; divided in fp32.
        return norm.to(self.weight.dtype).float()

    layers = [m for m in model.modules() if type(m) is DoraLinearLayer]  # (PEFT's embedding and conv DoRA differ)
    for layer in layers:
        layer.get_weight_norm = types.MethodType(weight_norm, layer)
    return len(layers)


def init_dora_magnitudes(model: nn.Module) -> None:
    """Set every DoRA magnitude to the fp32 column norm of its layer's ``W + s BA`` (:func:`dora_norms_in_fp32`), so
    that the adapter at init computes the base exactly: PEFT initialises it from the norm rounded to the base's
    dtype (0.4% off in bf16, for a layer whose forward divides by the norm in fp32). Under ZeRO-3 each layer's base
    is gathered to read it (PEFT's ``gather_params_ctx``); the adapters are not partitioned yet."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.integrations import dequantize_module_weight, gather_params_ctx

    for module in model.modules():
        for name, dora in getattr(module, "lora_magnitude_vector", {}).items():
            if type(dora) is not DoraLinearLayer:  # (embedding and conv DoRA: PEFT's own)
                continue
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            base = module.get_base_layer()
            with gather_params_ctx(list(base.parameters()), modifier_rank=None), torch.no_grad():
                norm = dora.get_weight_norm(dequantize_module_weight(base), b.float() @ a.float(), module.scaling[name])
                dora.weight.copy_(norm.reshape(dora.weight.shape))


def lora_config(cfg: DtuneConfig, projections: set[str] | None = None) -> Any:
    """PEFT's LoraConfig for ``cfg.lora`` (a causal-LM task), as training and the memory plan build it.

    ``projections``: the base's decoder linear layer names (:func:`layer_projections`), which ``all-linear`` stands
    for when ``lora.layers_to_transform`` is set (PEFT takes layer indices only with a list of names). LoftQ is
    applied after the adapters exist (:func:`init_loftq`): the config says PEFT's default init.

    Raises :class:`~dtune.errors.ConfigError` naming the field when PEFT refuses the combination.
    """
    from peft import LoraConfig

    lora = cfg.lora
    targets: str | list[str] = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
        if lora.layers_to_transform is not None:
            if projections is None:
                raise ValueError("lora_config: lora.layers_to_transform with all-linear needs the base's projections")
            targets = sorted(projections)
    init: bool | str = {"default": True, "loftq": True}.get(lora.init, lora.init)
    try:
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias=lora.bias,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            init_lora_weights=init,
            modules_to_save=list(lora.modules_to_save) or None,
            layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform is not None else None,
            rank_pattern=dict(lora.rank_pattern),
            alpha_pattern=dict(lora.alpha_pattern),
            task_type="CAUSAL_LM",
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"lora: PEFT refuses this adapter configuration: {err}") from None


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Raise ConfigError when a ``lora.modules_to_save`` entry names a 4-bit layer (its packed weight cannot train)
    or no module at all."""
    if not names:
        return
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    meant = {w for w in wrapped for name in names if w == name or w.endswith(f".{name}")}
    if extra := sorted(set(wrapped) - meant):
        raise ConfigError(
            f"lora.modules_to_save: {', '.join(names)} also match{'es' if len(names) == 1 else ''} {', '.join(extra[:4])} "
            "(PEFT matches the end of module names); name the modules whole, e.g. model.norm"
        )
    for name in names:
        hits = [w for w in wrapped if w == name or w.endswith(f".{name}")]
        if not hits:
            raise ConfigError(f"lora.modules_to_save: {name} names no module of {type(model.get_base_model()).__name__}")
        for hit in hits:
            module = model.get_submodule(hit).original_module
            if any(type(p).__name__ == "Params4bit" for p in module.parameters()):
                raise ConfigError(
                    f"lora.modules_to_save: {hit} is a 4-bit quantized layer, which cannot train in full; give it an "
                    "adapter (lora.target_modules) or keep it out of the quantized base"
                )


def init_loftq(model: nn.Module, directory: Path) -> None:
    """LoftQ (Li et al. 2023, arXiv:2310.08659) for a 4-bit base, by PEFT's ``replace_lora_weights_loftq``: each
    adapter is set to the rank-r SVD of the layer's quantization error W - dequant(Q(W)), W read from the base's
    safetensors, so base + adapter starts nearer the 16-bit model. The base is not changed: the adapter applies to
    the ordinary 4-bit base like any other.

    Raises ConfigError when this process has no CUDA device (PEFT computes on CUDA) or the base has no safetensors.
    """
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    if not torch.cuda.is_available():
        raise ConfigError("lora.init: loftq runs PEFT's LoftQ, which computes on a CUDA device; this machine has none")
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"lora.init: loftq reads the 16-bit weights from safetensors files; {directory} has none")
    with torch.random.fork_rng(devices=[]):
        replace_lora_weights_loftq(model, model_path=str(directory))
    # PEFT sets B A to the rank-r part of the error E, but the layer adds scaling * B A (scaling = alpha/r, or
    # alpha/sqrt(r) with rsLoRA): at dtune's default scaling 2, E - 2 E_r is no nearer 0 than E. Both factors are
    # divided by sqrt(scaling), so that the adapter adds E_r itself.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Linear4bit" and hasattr(module, "lora_A"):
                for name, scale in module.scaling.items():
                    module.lora_A[name].weight.div_(scale**0.5)
                    module.lora_B[name].weight.div_(scale**0.5)


def token_rows(base: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices`` for the added tokens: their rows of the input embedding, and of the output
    head when it is untied (a tied head follows the embedding inside PEFT), so that the model can also emit them."""
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in base.named_modules()}
    rows = {names[id(embed)]: ids}
    if head is not None and head.weight.data_ptr() != embed.weight.data_ptr():
        rows[names[id(head)]] = ids
    return rows


def gather_dora_layers_whole(model: nn.Module) -> None:
    """Under ZeRO-3: gather each DoRA layer's parameters, its base weight included, for the layer's whole forward.

    DoRA's forward reads the base weight again after the base layer ran (the norm of W + BA, PEFT's
    ``DoraLinearLayer.forward``), when ZeRO-3 has already released it; as a DeepSpeed "leaf" module the LoRA layer's
    parameters are gathered on entering it and released on leaving.
    """
    from deepspeed.utils import set_z3_leaf_modules

    if not torch.cuda.is_available():
        raise ConfigError(
            "lora.use_dora: under ZeRO-3 DoRA needs a GPU: on the CPU, PEFT's DoRA replaces each 4-bit layer's weight "
            "in every forward (peft.utils.integrations.dequantize_module_weight), which ZeRO-3's partitioning cannot follow"
        )
    classes = {type(m) for m in model.modules() if getattr(m, "lora_magnitude_vector", None)}
    if classes:
        set_z3_leaf_modules(model, list(classes))


def layer_projections(model: nn.Module) -> set[str]:
    """Names (the last part) of the linear layers inside the decoder layers: q_proj, qkv_proj, gate_up_proj, ..."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


def check_patterns(model: nn.Module, lora: Any) -> None:
    """Raise ConfigError naming each ``lora.rank_pattern`` / ``lora.alpha_pattern`` key that matches no adapted module
    (PEFT's rule: a regular expression matched at the end of the module name, or of an MoE expert parameter's:
    ``experts.gate_up_proj``): PEFT ignores such a key, and the modules it was meant for train at ``lora.r`` /
    ``lora.alpha``."""

    tuner = model.base_model
    params = list(getattr(tuner, "targeted_parameter_names", []))  # MoE experts, routers: experts.down_proj, gate.weight
    names = [*tuner.targeted_module_names, *params]
    shown = {n.rsplit(".", 1)[-1] for n in tuner.targeted_module_names} | {".".join(n.split(".")[-2:]) for n in params}
    for field, pattern in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)):
        if unmatched := [key for key in pattern if not any(re.match(rf"(.*\.)?({key})$", n) for n in names)]:
            raise ConfigError(
                f"lora.{field}: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no adapted module "
                f"(adapted: {', '.join(sorted(shown)) or 'none'}); keys are "
                "matched at the end of module names, e.g. down_proj or layers.0.self_attn.q_proj"
            )


def warn_partial_targets(targets: list[str], projections: set[str], targeted: list[str], arch: str) -> None:
    """Warn when some of ``targets`` match no layer while some projections get no adapter: a target list written for
    another family (Phi-3's fused qkv_proj and gate_up_proj with Llama's names leave only o_proj and down_proj
    adapted)."""
    if list(targets) == ["all-linear"]:
        return
    hit = {name.rsplit(".", 1)[-1] for name in targeted}
    missing = [t for t in targets if t not in hit]
    left = sorted(projections - hit)
    if missing and left:
        log.warning(
            "lora.target_modules: %s match no layer of %s; adapters go on %s only, and %s get none. "
            "lora.target_modules=[all-linear] adapts every linear projection of any family",
            ", ".join(missing),
            arch,
            ", ".join(sorted(hit)) or "nothing",
            ", ".join(left),
        )


# Adapter settings that must agree for an adapter's tensors to be the starting point of this run's adapter.
_ADAPTER_FIELDS = (
    "r",
    "lora_alpha",
    "use_dora",
    "use_rslora",
    "bias",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "modules_to_save",
    "trainable_token_indices",
)


def adapter_folder(path: str | Path) -> Path:
    """The PEFT adapter folder ``path`` names: the folder itself, or a run's ``adapter/``. Raises ConfigError."""
    folder = Path(path)
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(f"train.init_adapter: {path} holds no PEFT adapter (adapter_config.json, adapter_model.safetensors)")
    return folder


def load_init_adapter(model: nn.Module, path: str | Path) -> None:
    """Start the run's adapter (PEFT's ``default``) from the trained adapter at ``path`` (an adapter folder or a run):
    its tensors, every one, into the adapter this run's lora.* settings made. Raises ConfigError naming the settings
    that differ (the adapter was trained with other lora.*) or the tensors that do not fit."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = adapter_folder(path)
    saved, mine = LoraConfig.from_pretrained(str(folder)), model.peft_config["default"]
    init = saved.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise ConfigError(
            f"train.init_adapter: {folder} was initialised with {init}, which changes the base it adapts; start from an "
            "adapter of the plain base (or from `dtune merge`'s model as model.name_or_path)"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters() if p.requires_grad):
        raise ConfigError("train.init_adapter: not under ZeRO-3 (its adapter tensors are partitioned at load); use fsdp2")
    differ = [
        f"{name}: {getattr(saved, name)!r} there, {getattr(mine, name)!r} here"
        for name in _ADAPTER_FIELDS
        if _normal(getattr(saved, name, None)) != _normal(getattr(mine, name, None))
    ]
    if _targets(saved.target_modules) != _targets(mine.target_modules):
        differ.append(f"target_modules: {sorted(saved.target_modules or [])} there, {sorted(mine.target_modules or [])} here")
    if differ:
        raise ConfigError(
            f"train.init_adapter: {folder} was trained with other adapter settings; set lora.* to its own ("
            + "; ".join(differ)
            + ")"
        )
    state = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    trained = ("lora_", "modules_to_save", "trainable_tokens")
    missing = [k for k in getattr(result, "missing_keys", []) or [] if any(t in k for t in trained)]
    if unexpected or missing:
        raise ConfigError(
            f"train.init_adapter: {folder}'s tensors do not fit this model ({len(unexpected)} unknown, e.g. "
            f"{unexpected[:2]}; {len(missing)} missing, e.g. {missing[:2]}): another base?"
        )
    log.info("train.init_adapter: the adapter starts from %s (%d tensors)", folder, len(state))


def _targets(value: Any) -> Any:
    """target_modules compared: a regular expression as itself, a list as a set."""
    return value if isinstance(value, str) else set(value or [])


def _normal(value: Any) -> Any:
    """A LoraConfig value compared across versions: empty containers as None, sets as sorted lists."""
    if value in (None, [], {}, ()):
        return None
    if isinstance(value, set | frozenset | tuple):
        return sorted(value)
    return value
