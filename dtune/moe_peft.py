"""LoRA on NF4-quantized experts, in PEFT's own format (``target_parameters``, ``ParamWrapper`` layout).

PEFT adapts an MoE's fused 3-D expert parameters with ``lora.ParamWrapper``: A [r*E, in] and B [out, r*E] per
parameter, nested when one module holds two (``experts.base_layer.lora_A`` adapts ``gate_up_proj``,
``experts.lora_A`` ``down_proj`` for Qwen3-MoE). Its forward adds the delta weight to the dense parameter through
``torch.nn.utils.parametrize``, which needs that parameter: an NF4 experts module (:mod:`dtune.moe`) has packed bytes
instead. So:

1. while PEFT attaches or loads an adapter (:func:`peft_view`), each NF4 experts module shows zero-storage stand-ins
   (one element expanded to [E, N, K], the compute dtype, the module's device) under its 16-bit parameter names, so
   PEFT matches them, sizes the adapters and names them exactly as on the 16-bit model;
2. then (:func:`adopt_expert_adapters`) the wrappers around NF4 experts become :class:`NF4ExpertsLora`, whose
   forward hands the active adapters to the experts' grouped forward (s (x A_e^T) B_e^T per expert), honouring
   PEFT's adapter switches (``disable_adapter()``, the active adapter set).

The saved adapter is PEFT's: ``PeftModel.from_pretrained`` on the 16-bit model loads and merges it unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from dtune.errors import DtuneError
from dtune.moe import NF4ExpertsMixin, nf4_experts


def stand_in(experts: NF4ExpertsMixin, name: str) -> torch.Tensor:
    """A tensor with the shape, dtype and device of the 16-bit expert parameter ``name``, holding one element."""
    packed = getattr(experts, f"{name}_nf4")
    shape = experts._dtune_nf4["shapes"][name]
    return torch.empty((), dtype=experts._dtune_nf4["dtype"], device=packed.device).expand(*shape)


@contextlib.contextmanager
def peft_view(model: nn.Module) -> Iterator[None]:
    """While PEFT attaches or loads adapters: NF4 experts modules show stand-in parameters (:func:`stand_in`)."""
    modules = nf4_experts(model)
    for module in modules:  # in the 16-bit class's order: PEFT nests (and names) the wrappers of one module by it
        for name in module._dtune_nf4["order"]:
            module._parameters[name] = nn.Parameter(stand_in(module, name), requires_grad=False)
    try:
        yield
    finally:
        for module in modules:
            for name in module._dtune_nf4["shapes"]:
                module._parameters.pop(name, None)


def adopt_expert_adapters(model: nn.Module) -> int:
    """Switch PEFT's ParamWrappers around NF4 experts to :class:`NF4ExpertsLora`; under ZeRO-3 they are DeepSpeed
    "leaf" modules (the forward reads nested adapters and packed experts directly). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is ParamWrapper and isinstance(module.get_base_layer(), NF4ExpertsMixin):
            module.__class__ = NF4ExpertsLora
            count += 1
    if count:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [NF4ExpertsLora])
    return count


class NF4ExpertsLora(ParamWrapper):
    """PEFT's LoRA wrapper of one expert parameter of an NF4 experts module: same parameters and state-dict names,
    a forward that passes the adapters to the experts' grouped forward instead of parametrizing a dense weight."""

    def get_param(self) -> torch.Tensor:
        return stand_in(self.get_base_layer(), self.parameter_name)

    def adapters(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """The active adapters of this wrapper and the ones it wraps, by expert parameter name."""
        found: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        layer: Any = self
        while isinstance(layer, ParamWrapper):
            if not layer.disable_adapters and not layer.merged:
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        adapter = (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                        found.setdefault(layer.parameter_name, []).append(adapter)
            layer = layer.base_layer
        return found

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        return self.get_base_layer()(x, *args, lora=self.adapters(), **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise DtuneError(
            "LoRA on NF4 experts cannot merge into the packed weights: merge into the dequantized or 16-bit base (dtune merge)"
        )
