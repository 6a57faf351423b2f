"""4-bit base layers whose matmul runs dtune's fused NF4 kernels (``quant.kernel=triton``).

Each bitsandbytes ``Linear4bit`` of the loaded base becomes a :class:`FusedLinear4bit` -- the same module, same
``Params4bit`` weight and state dict, only ``forward`` differs -- before PEFT wraps it. PEFT still recognises it as
a 4-bit layer (it is a subclass), so LoRA layers wrap it as usual and adapters save in standard PEFT format.

With ``quant.fuse_lora``, PEFT's LoRA layer around each of them becomes a :class:`FusedLoraLinear4bit` (same
module and parameters, only ``forward`` differs): base matmul and adapter run as one op, ``dtune::nf4_lora_linear``,
which adds s(xA^T)B^T in the matmul's epilogue instead of writing the base output, cloning it (PEFT does, for
4-bit layers), computing the adapter output and adding the two in separate passes over [tokens, out] memory.
Layers with dropout, DoRA or adapter biases are not switched; at run time anything else PEFT's path would do
differently (several or disabled adapters, merged weights, per-row adapter names, fp32 adapters outside autocast)
goes through PEFT's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from dtune.kernels import NF4Weight, nf4_linear, nf4_lora_linear


def _linear4bit_class() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def _peft_lora4bit_class() -> type:
    from peft.tuners.lora.bnb import Linear4bit

    return Linear4bit


class FusedLinear4bit(_linear4bit_class()):  # type: ignore[misc]
    """bitsandbytes Linear4bit with y = x @ dequant(W).T + b computed by ``dtune::nf4_linear``."""

    def nf4(self) -> tuple[NF4Weight, torch.dtype] | None:
        """The weight as kernels take it, and the compute dtype; None where bitsandbytes' own path must run."""
        # FSDP2 replaces the Params4bit by a plain tensor: bitsandbytes keeps a copy of the state on the module.
        state = getattr(self.weight, "quant_state", None) or getattr(self, "quant_state", None)
        if state is None or state.quant_type != "nf4":
            return None  # not quantized yet, or FP4
        return NF4Weight.from_bnb(self.weight, state), self.compute_dtype or state.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nf4 = self.nf4()
        if nf4 is None:
            return super().forward(x)
        weight, compute = nf4
        bias = None if self.bias is None else self.bias.to(compute)
        return nf4_linear(x.to(compute), weight, bias).to(x.dtype)


def _plain_adapter(layer: nn.Module, name: str) -> bool:
    """Vanilla LoRA: no dropout, no variant (DoRA), no adapter bias -- what the fused op computes."""
    plain = isinstance(layer.lora_dropout[name], nn.Identity) and name not in layer.lora_variant
    return plain and layer.lora_A[name].bias is None and layer.lora_B[name].bias is None


class FusedLoraLinear4bit(_peft_lora4bit_class()):  # type: ignore[misc]
    """PEFT's LoRA layer for 4-bit bases with base and adapter computed by ``dtune::nf4_lora_linear``."""

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged or not isinstance(self.base_layer, FusedLinear4bit):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or not _plain_adapter(self, active[0]):
            return None
        # Without autocast PEFT computes the adapter in its own (fp32) dtype; the fused op works in the compute dtype.
        compute = self.base_layer.compute_dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and compute is not None and self.lora_A[active[0]].weight.dtype != compute:
            return None
        return active[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable_adapter(x, args, kwargs)
        nf4 = self.base_layer.nf4() if name is not None else None
        if nf4 is None:
            return super().forward(x, *args, **kwargs)
        weight, compute = nf4
        base = self.base_layer
        bias = None if base.bias is None else base.bias.to(compute)
        lora_a = self.lora_A[name].weight.to(compute)  # as autocast would cast them; gradients reach the masters
        lora_b = self.lora_B[name].weight.to(compute)
        out = nf4_lora_linear(x.to(compute), weight, lora_a, lora_b, self.scaling[name], bias)
        return out.to(x.dtype)


def use_fused_kernels(model: nn.Module) -> int:
    """Switch every bitsandbytes NF4 Linear4bit in ``model`` to :class:`FusedLinear4bit`. Returns how many."""
    base = _linear4bit_class()
    count = 0
    for module in model.modules():
        if type(module) is base:
            module.__class__ = FusedLinear4bit
            count += 1
    return count


def fuse_lora_layers(model: nn.Module) -> int:
    """Switch PEFT's LoRA layers around :class:`FusedLinear4bit` bases to :class:`FusedLoraLinear4bit`.

    Under ZeRO-3 the switched layers are marked as DeepSpeed "leaf" modules, so their adapter parameters are
    gathered with the layer (the fused forward reads them directly instead of calling the adapter's Linear).
    Returns how many layers were switched.
    """
    lora4bit = _peft_lora4bit_class()
    count = 0
    for module in model.modules():
        fusable = type(module) is lora4bit and isinstance(module.base_layer, FusedLinear4bit)
        if fusable and all(_plain_adapter(module, name) for name in module.lora_A):
            module.__class__ = FusedLoraLinear4bit
            count += 1
    if count:
        try:
            from deepspeed.utils import set_z3_leaf_modules
        except ImportError:  # pragma: no cover - deepspeed is a dependency
            return count
        set_z3_leaf_modules(model, [FusedLoraLinear4bit])
    return count
