"""The model's shape without its weights: its module tree on the meta device, and the bytes of its parameters as a
QLoRA run holds them (4-bit packed base with double-quantization constants, the rest in the compute dtype, the
adapters)."""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dtune.errors import ConfigError
from dtune.lora import layer_projections, lora_config
from dtune.model import model_dir
from dtune.moe import expert_shapes, experts_in_nf4, is_fused_experts
from dtune.schema import DtuneConfig

BLOCK = 64  # bitsandbytes 4-bit block size

# adapted()'s answers per skeleton and LoRA settings (fit() plans one skeleton many times)
_ADAPTED: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, LoraConfig]]] = weakref.WeakKeyDictionary()


def skeleton(cfg: DtuneConfig) -> tuple[nn.Module, Any]:
    """The model's module tree on the meta device (no weights), and its config."""
    config = AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return model, config


def adapted(cfg: DtuneConfig, model: nn.Module) -> tuple[int, LoraConfig | None]:
    """What PEFT makes of this run's LoRA settings on ``model`` (the meta-device skeleton): the number of parameters
    it trains, and the LoraConfig that puts the same adapters on one decoder layer alone (the probe's), None when no
    decoder layer gets any. PEFT itself attaches the adapters, to a copy of the skeleton, so the count is the one
    training gets whatever the family: fused projections (Phi-3's qkv_proj) match only their own names; under
    transformers 5 the experts of an MoE, fused into 3-D parameters, are targeted as parameters, gate and up at twice
    the rank (PEFT's conversion of the v4 names); "all-linear" resolves to the model's linear layers.

    Raises:
        ConfigError: PEFT finds none of ``lora.target_modules`` in the model (as training would).
    """
    key = repr(cfg.lora)  # every adapter setting (ranks, patterns, DoRA, modules_to_save) changes the count
    known = _ADAPTED.setdefault(model, {})
    if key not in known:
        # On the meta device, adapters included (no initialisation); PEFT's notes on its conversion: training prints them
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                peft_model = get_peft_model(copy.deepcopy(model), lora_config(cfg, layer_projections(model)))
            except ValueError as err:  # "Target modules {...} not found in the base model"
                raise ConfigError(f"lora.target_modules: {err}") from None
        trainable, _ = peft_model.get_nb_trainable_parameters()
        # What PEFT targeted, named from within the decoder layer that holds it (targets outside layers: none here).
        layer_ids = {id(layer) for layer in decoder_layers(model)}
        prefixes = [f"{name}." for name, module in model.named_modules() if id(module) in layer_ids]
        tuner = peft_model.base_model

        def in_layers(names: list[str]) -> set[str]:
            return {name[len(prefix) :] for name in names for prefix in prefixes if name.startswith(prefix)}

        one_layer = copy.deepcopy(peft_model.peft_config["default"])
        one_layer.target_modules = in_layers(tuner.targeted_module_names)
        # The probe adapts one layer standing for all (the fullest: adapted, when only some layers are).
        one_layer.layers_to_transform, one_layer.layers_pattern, one_layer.modules_to_save = None, None, None
        parameters = in_layers(getattr(tuner, "targeted_parameter_names", []))  # PEFT >= 0.17: 3-D experts
        if parameters:
            one_layer.target_parameters = parameters
        known[key] = (trainable, one_layer if one_layer.target_modules or parameters else None)
    return known[key]


def _quantized_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """Bytes of a 4-bit weight of ``numel`` elements: (packed nibbles, quantization constants)."""
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / BLOCK)
    if double_quant:  # uint8 absmax per block, fp32 absmax per 256 of them, two 256-entry code tables
        return packed, blocks + 4 * math.ceil(blocks / 256) + 2 * 1024
    return packed, 4 * blocks


def _expert_bytes(experts: int, numel: int, double_quant: bool) -> tuple[int, int]:
    """Bytes of ``experts`` weights of ``numel`` elements each quantized on its own (dtune.kernels.nf4_grouped's
    NF4Experts): (packed nibbles per expert, every quantization constant: per expert, plus the shared maps)."""
    blocks = math.ceil(numel / BLOCK)
    if double_quant:  # uint8 absmax, fp32 absmax2 per 256 blocks and an offset each; code2 (256) and code (16) shared
        return math.ceil(numel / 2), experts * (blocks + 4 * math.ceil(blocks / 256) + 4) + 4 * (256 + 16)
    return math.ceil(numel / 2), experts * (4 * blocks + 8) + 4 * (1 + 16)


def parameter_bytes(cfg: DtuneConfig, model: nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit packed base (``base_4bit``, of which ``base_4bit_constants`` are its quantization constants:
    no parameters, so FSDP2 neither shards nor offloads them), of the other base parameters, and the adapters'
    parameter count (what PEFT trains: :func:`adapted`)."""
    head = model.get_output_embeddings()
    quantize = cfg.quant.quant_type != "none"
    # The frozen base stays as loaded, in the compute dtype (dtune.model.freeze_as_trained).
    other_bytes = 4 if cfg.train.precision == "fp32" else 2
    n_lora = adapted(cfg, model)[0]
    out = {
        "base_4bit": 0,
        "base_4bit_constants": 0,
        "base_other": 0,
        "lora_params": n_lora,
        "largest_linear": 0,
        "layer_base": 0,
        "root_numel": 0,
    }
    seen: set[int] = set()
    layers = decoder_layers(model)
    first_layer = {id(p) for p in layers[0].parameters()} if layers else set()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    experts_4bit = quantize and experts_in_nf4(cfg)
    for module in model.modules():
        if experts_4bit and is_fused_experts(module):  # NF4 per expert (dtune.moe): packed params, constants buffers
            for name, (experts, n, k) in expert_shapes(module).items():
                packed, constants = _expert_bytes(experts, n * k, cfg.quant.double_quant)
                out["base_4bit"] += experts * packed + constants
                out["base_4bit_constants"] += constants
                out["largest_linear"] = max(out["largest_linear"], n * k)  # bitsandbytes' way: one expert at a time
                param = module._parameters[name]
                if id(param) in first_layer:
                    out["layer_base"] += experts * packed + constants
                seen.add(id(param))
        elif isinstance(module, nn.Linear):
            numel = module.in_features * module.out_features
            if quantize and module is not head:
                packed, constants = _quantized_bytes(numel, cfg.quant.double_quant)
                size = packed + constants
                out["base_4bit"] += size
                out["base_4bit_constants"] += constants
                out["largest_linear"] = max(out["largest_linear"], numel)
                if id(module.weight) in first_layer:
                    out["layer_base"] += size
                seen.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            size = other_bytes * p.numel()
            out["base_other"] += size
            if id(p) in first_layer:
                out["layer_base"] += size
            if id(p) not in in_layers:
                out["root_numel"] += p.numel()  # embeddings, final norm, untied head: FSDP2's root unit
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
