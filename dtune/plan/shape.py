"""The model's shape without its weights: its module tree on the meta device, and the bytes of its parameters as a
QLoRA run holds them (4-bit packed base with double-quantization constants, the rest upcast, the adapters)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dtune.model import model_dir
from dtune.schema import DtuneConfig

BLOCK = 64  # bitsandbytes 4-bit block size


def skeleton(cfg: DtuneConfig) -> tuple[nn.Module, Any]:
    """The model's module tree on the meta device (no weights), and its config."""
    config = AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return model, config


def _is_target(name: str, targets: list[str], head_name: str) -> bool:
    if targets == ["all-linear"]:
        return name != head_name
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def _quantized_bytes(numel: int, double_quant: bool) -> int:
    packed = math.ceil(numel / 2)
    blocks = math.ceil(numel / BLOCK)
    if double_quant:  # uint8 absmax per block, fp32 absmax per 256 of them, two 256-entry code tables
        return packed + blocks + 4 * math.ceil(blocks / 256) + 2 * 1024
    return packed + 4 * blocks


def parameter_bytes(cfg: DtuneConfig, model: nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit packed base, of the other base parameters, and the adapters' parameter count."""
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    quantize = cfg.quant.quant_type != "none"
    # prepare_model_for_kbit_training upcasts a 4-bit base's other parameters to fp32; a 16-bit base stays as loaded.
    other_bytes = 4 if quantize or cfg.train.precision == "fp32" else 2
    out = {"base_4bit": 0, "base_other": 0, "lora_params": 0, "largest_linear": 0, "layer_base": 0, "root_numel": 0}
    seen: set[int] = set()
    targets = list(cfg.lora.target_modules)
    layers = decoder_layers(model)
    first_layer = {id(p) for p in layers[0].parameters()} if layers else set()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            numel = module.in_features * module.out_features
            if _is_target(name, targets, head_name):
                out["lora_params"] += cfg.lora.r * (module.in_features + module.out_features)
            if quantize and module is not head:
                size = _quantized_bytes(numel, cfg.quant.double_quant)
                out["base_4bit"] += size
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
