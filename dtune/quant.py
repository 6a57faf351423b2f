"""4-bit base layers whose matmul runs dtune's fused NF4 kernels (``quant.kernel=triton``).

Each bitsandbytes ``Linear4bit`` of the loaded base becomes a :class:`FusedLinear4bit` -- the same module, same
``Params4bit`` weight and state dict, only ``forward`` differs -- before PEFT wraps it. PEFT still recognises it as
a 4-bit layer (it is a subclass), so LoRA layers wrap it as usual and adapters save in standard PEFT format.
"""

from __future__ import annotations

import torch
from torch import nn

from dtune.kernels import NF4Weight, nf4_linear


def _linear4bit_class() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


class FusedLinear4bit(_linear4bit_class()):  # type: ignore[misc]
    """bitsandbytes Linear4bit with y = x @ dequant(W).T + b computed by ``dtune::nf4_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        # FSDP2 replaces the Params4bit by a plain tensor: bitsandbytes keeps a copy of the state on the module.
        state = getattr(weight, "quant_state", None) or getattr(self, "quant_state", None)
        if state is None or state.quant_type != "nf4":
            return super().forward(x)  # not quantized yet, or FP4: bitsandbytes' own path
        in_dtype = x.dtype
        compute = self.compute_dtype or state.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        out = nf4_linear(x.to(compute), NF4Weight.from_bnb(weight, state), bias)
        return out.to(in_dtype)


def use_fused_kernels(model: nn.Module) -> int:
    """Switch every bitsandbytes NF4 Linear4bit in ``model`` to :class:`FusedLinear4bit`. Returns how many."""
    base = _linear4bit_class()
    count = 0
    for module in model.modules():
        if type(module) is base:
            module.__class__ = FusedLinear4bit
            count += 1
    return count
