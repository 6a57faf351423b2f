"""Mixture-of-experts QLoRA: fused experts quantized to NF4 per expert at load, computed from the packed weights.

In transformers 5 an MoE layer's experts are one module with 3-D parameters (``Qwen3MoeExperts``: ``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]), which bitsandbytes' 4-bit layer replacement does not touch: left alone they
stay in 16 bits, most of the model. Here:

* **Loading** (:func:`quantizing_experts`): before the weights load, each experts module becomes an NF4 experts
  module (its class gains :class:`NF4ExpertsMixin`), and every 3-D expert tensor transformers loads into it is
  quantized there and then, expert by expert, in bitsandbytes' layout (:class:`~dtune.kernels.nf4_grouped.NF4Experts`):
  one layer's 16-bit experts exist at a time, never the model's. The packed bytes are a frozen parameter in the
  compute dtype (``<name>_nf4`` [E, bytes / itemsize]), so ZeRO-3 and FSDP2 shard them like the 4-bit linear
  layers; the quantization constants are buffers. Routers, shared experts and attention load as before.
* **Forward**: tokens are grouped by expert and each projection is one grouped NF4 matmul (dtune's Triton kernel
  with ``quant.kernel=triton``, else its reference: dequantize each routed expert, then a dense matmul, as
  bitsandbytes does); the backward recomputes the input gradient from the packed weights, never saving a 16-bit
  expert.
* **LoRA**: PEFT targets the experts as parameters (``target_parameters``; its all-linear and v4 names resolve to
  them) with its ``ParamWrapper`` layout: A [r*E, in], B [out, r*E] per projection. While PEFT attaches or loads an
  adapter, :func:`peft_view` gives each NF4 experts module zero-storage stand-ins of its 16-bit parameters' shape;
  then :func:`adopt_expert_adapters` switches PEFT's wrappers to :class:`NF4ExpertsLora`, whose forward adds
  s (x A_e^T) B_e^T per expert to the grouped matmuls. Saved adapters are PEFT's own format: PEFT loads them on the
  16-bit model unchanged.

Architectures: experts classes of transformers' experts interface (``use_experts_implementation``) with
concatenated [gate; up] projections, no biases, not transposed (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3,
GLM-4-MoE), gated by the class's own ``_apply_gate``; others are refused at load with the field that keeps them
16-bit. Only tensors the checkpoint holds are quantized: a checkpoint lacking an experts module's is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dtune.errors import ConfigError, DtuneError
from dtune.kernels.grouped_dense import ExpertRows, grouped_dense
from dtune.kernels.nf4_grouped import (
    NF4Experts,
    group_by_expert,
    nf4_grouped_matmul,
    nf4_grouped_matmul_grad_input,
    nf4_grouped_matmul_grad_input_ref,
    nf4_grouped_matmul_ref,
)

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64  # bitsandbytes' Params4bit default, as the 4-bit linear layers of the same model


def experts_in_nf4(cfg: Any) -> bool:
    """Whether a 4-bit load of ``cfg`` quantizes MoE experts too (``quant.experts`` with NF4; FP4 leaves them 16-bit)."""
    return cfg.quant.quant_type == "nf4" and cfg.quant.experts


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding an MoE layer's experts as 3-D parameters (or already quantized here)."""
    if isinstance(module, NF4ExpertsMixin):
        return True
    return any(getattr(module._parameters.get(p), "dim", lambda: 0)() == 3 for p in EXPERT_PARAMS)


def expert_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of each expert tensor of a fused experts module, dense (the meta skeleton) or NF4."""
    if isinstance(module, NF4ExpertsMixin):
        return dict(module._dtune_nf4["shapes"])
    return {p: tuple(module._parameters[p].shape) for p in EXPERT_PARAMS if p in module._parameters}


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")  # Qwen-MoE, Mixtral, DeepSeek names


def fewer_experts(config: Any, keep: int = 16) -> Any:
    """A copy of an MoE text config with ``keep`` experts (at least twice ``num_experts_per_tok``), for probes of a
    layer's activation bytes: per token those do not depend on the expert count (tokens x top-k rows go through the
    grouped matmuls whatever E is), except the router's E logits (fp32, a few bytes a token). ``config`` itself when
    it has fewer experts, or none."""
    import copy

    top_k = getattr(config, "num_experts_per_tok", None) or 1
    keep = max(keep, 2 * top_k)
    names = [n for n in EXPERT_COUNTS if isinstance(getattr(config, n, None), int) and getattr(config, n) > keep]
    if not names:
        return config
    smaller = copy.deepcopy(config)
    for name in names:
        setattr(smaller, name, keep)
    return smaller


def _check_layout(name: str, module: nn.Module) -> None:
    odd = [
        flag
        for flag, bad in (
            ("biases", getattr(module, "has_bias", False)),
            ("transposed weights", getattr(module, "is_transposed", False)),
            ("interleaved gate/up", not getattr(module, "is_concatenated", True)),
            ("no gate", not getattr(module, "has_gate", True)),
            ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
        )
        if bad
    ]
    missing = [p for p in EXPERT_PARAMS if p not in module._parameters]
    if not hasattr(module, "is_transposed"):  # not described by transformers' experts interface: unknown semantics
        odd.append("a class outside transformers' experts interface (use_experts_implementation)")
    elif not missing and module._parameters[EXPERT_PARAMS[0]].shape[0] != module._parameters[EXPERT_PARAMS[1]].shape[0]:
        odd.append("gate_up and down projections over different expert counts")
    if odd or missing:
        what = ", ".join(odd + [f"no {p}" for p in missing])
        raise ConfigError(
            f"quant.experts: {name} ({type(module).__name__}) has {what}, a layout dtune does not quantize yet; "
            "quant.experts=false keeps the experts in 16 bits"
        )


class _ExpertMatmul(torch.autograd.Function):
    """y = grouped x @ dequant(W_e)^T; backward: grad_x = grouped grad_y @ dequant(W_e). W is frozen.

    The experts' packed weight is read from the module again in backward, not kept from forward: ZeRO-3 releases a
    layer's gathered parameters after its forward and gathers them again for its backward (and FSDP2 reshards and
    unshards them); a tensor kept from forward would hold every layer's gathered experts alive until backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, experts: NF4ExpertsMixin, name: str, offsets: torch.Tensor) -> torch.Tensor:
        ctx.experts, ctx.name = experts, name
        ctx.save_for_backward(offsets)
        triton = experts._dtune_nf4["triton"]
        return (nf4_grouped_matmul if triton else nf4_grouped_matmul_ref)(x, experts.nf4(name), offsets)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        (offsets,) = ctx.saved_tensors
        experts = ctx.experts
        grad = nf4_grouped_matmul_grad_input if experts._dtune_nf4["triton"] else nf4_grouped_matmul_grad_input_ref
        return grad(grad_y.contiguous(), experts.nf4(ctx.name), offsets), None, None, None


Adapter = tuple[torch.Tensor, torch.Tensor, float]
"""PEFT's (lora_A [r*E, in], lora_B [out, r*E], scaling) of one expert projection."""


def lora_term(x: torch.Tensor, adapter: Adapter, rows: ExpertRows) -> torch.Tensor:
    """s (x A_e^T) B_e^T per expert e, with PEFT's ParamWrapper layout: A_e = A.view(E, r, in)[e],
    B_e = B.view(out, r, E)[:, :, e] (so that PEFT's merge adds s B_e A_e to W_e [out, in]). x [M, in] sorted by
    expert (``rows``) -> [M, out]."""
    lora_a, lora_b, scale = adapter
    experts = rows.offsets.shape[0] - 1
    rank = lora_a.shape[0] // experts
    a = lora_a.to(x.dtype).view(experts, rank, -1)
    b = lora_b.to(x.dtype).view(lora_b.shape[0], rank, experts).permute(2, 0, 1)
    return grouped_dense(grouped_dense(x, a, rows), b, rows) * scale


class NF4ExpertsMixin(nn.Module):
    """Mixed into an experts class (first in its MRO) by :func:`_nf4_class`: 3-D expert tensors assigned to the
    module are quantized on assignment; forward computes from the packed weights."""

    _dtune_nf4: dict[str, Any]  # dtype (compute), double_quant, triton, shapes {name: (E, N, K)}, order (of names)

    def __setattr__(self, name: str, value: Any) -> None:
        # What transformers' loader assigns from the checkpoint (flagged _is_hf_initialized); not the empty
        # placeholders it puts where a checkpoint lacks a tensor (finish_experts refuses those).
        loaded = isinstance(value, torch.Tensor) and getattr(value, "_is_hf_initialized", False)
        if name in EXPERT_PARAMS and loaded and value.dim() == 3 and not value.is_meta:
            self.quantize_(name, value)
            return
        super().__setattr__(name, value)

    def quantize_(self, name: str, weight: torch.Tensor) -> None:
        """Quantize expert tensor ``name`` [E, N, K] (per expert, NF4) and keep only the packed form."""
        settings = self._dtune_nf4
        dtype = settings["dtype"]
        q = NF4Experts.quantize(weight.detach().to(dtype), BLOCKSIZE, settings["double_quant"])
        if q.packed.shape[1] % dtype.itemsize:
            raise ConfigError(f"quant.experts: {name} {tuple(weight.shape)} packs into bytes not divisible into {dtype}")
        self._parameters.pop(name, None)
        packed = nn.Parameter(q.packed.view(dtype), requires_grad=False)
        packed._is_hf_initialized = True
        super().__setattr__(f"{name}_nf4", packed)
        # Buffers, persistent (transformers re-creates non-persistent ones empty after loading); fp32 ones held as
        # int32 bits, which no module-wide cast to 16 bits (older DeepSpeed's module.bfloat16()) can round.
        constants = {f"{name}_absmax": q.absmax, f"{name}_absmax2": q.absmax2, f"{name}_offset": q.offset}
        for key, value in {**constants, "nf4_code": q.code, "nf4_code2": q.code2}.items():
            self.register_buffer(key, value.view(torch.int32) if value.dtype == torch.float32 else value)
        settings["shapes"][name] = q.shape
        settings["blocksize2"] = q.blocksize2

    def nf4(self, name: str) -> NF4Experts:
        """Expert tensor ``name`` as the grouped kernels take it."""
        s = self._dtune_nf4
        shape = s["shapes"][name]
        absmax = getattr(self, f"{name}_absmax")
        return NF4Experts(
            packed=getattr(self, f"{name}_nf4").data.view(torch.uint8).reshape(shape[0], -1),
            absmax=absmax if absmax.dtype == torch.uint8 else absmax.view(torch.float32),
            absmax2=getattr(self, f"{name}_absmax2").view(torch.float32),
            code2=self.nf4_code2.view(torch.float32),
            offset=getattr(self, f"{name}_offset").view(torch.float32),
            code=self.nf4_code.view(torch.float32),
            shape=shape,
            blocksize=BLOCKSIZE,
            blocksize2=s["blocksize2"],
            double_quant=s["double_quant"],
            dtype=s["dtype"],
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lora: dict[str, list[Adapter]] | None = None,
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H] (hidden_states' dtype), as the eager
        experts forward of transformers computes it; ``lora``: adapters per projection name (:class:`NF4ExpertsLora`)."""
        lora = lora or {}
        compute = self._dtune_nf4["dtype"]
        experts, k = self._dtune_nf4["shapes"]["down_proj"][0], top_k_index.shape[-1]
        order, offsets = group_by_expert(top_k_index, experts)
        token = order // k
        rows = ExpertRows(offsets)  # the adapters' grouping (a loop over experts copies it to the host once)
        x = hidden_states.to(compute)[token]
        gate_up = _ExpertMatmul.apply(x, self, "gate_up_proj", offsets)
        for adapter in lora.get("gate_up_proj", []):
            gate_up = gate_up + lora_term(x, adapter, rows)
        h = self._apply_gate(gate_up)  # the class's gating (transformers' default: act(gate) * up)
        out = _ExpertMatmul.apply(h, self, "down_proj", offsets)
        for adapter in lora.get("down_proj", []):
            out = out + lora_term(h, adapter, rows)
        out = out * top_k_weights.reshape(-1)[order, None]  # in the weights' dtype when wider (fp32 routers), as eager
        return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))

    def dequantize_(self, dtype: torch.dtype | None = None) -> None:
        """Back to the experts class with dense 3-D parameters (``dtype``: default the compute dtype)."""
        dense = {name: self.nf4(name).dequantize(dtype) for name in self._dtune_nf4["order"]}  # the class's order
        for name in dense:
            del self._parameters[f"{name}_nf4"]
            for part in ("absmax", "absmax2", "offset"):
                del self._buffers[f"{name}_{part}"]
        for buffer in ("nf4_code", "nf4_code2"):
            del self._buffers[buffer]
        self.__class__ = self.__class__.__bases__[1]
        for name, weight in dense.items():
            setattr(self, name, nn.Parameter(weight, requires_grad=False))


_NF4_CLASSES: dict[type, type] = {}


def _nf4_class(cls: type) -> type:
    if cls not in _NF4_CLASSES:
        _NF4_CLASSES[cls] = type(f"NF4{cls.__name__}", (NF4ExpertsMixin, cls), {"__module__": __name__})
    return _NF4_CLASSES[cls]


def prepare_experts(model: nn.Module, dtype: torch.dtype, double_quant: bool, triton: bool) -> int:
    """Make every fused experts module of ``model`` an NF4 experts module (tensors already loaded are quantized
    now; those assigned later, on assignment). Returns how many. Raises ConfigError on a layout not supported."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, NF4ExpertsMixin) or not is_fused_experts(module):
            continue
        _check_layout(name, module)
        module.__class__ = _nf4_class(type(module))
        module._dtune_nf4 = {
            "dtype": dtype,
            "double_quant": double_quant,
            "triton": triton,
            "shapes": {},
            "blocksize2": 1,
            "order": [p for p in module._parameters if p in EXPERT_PARAMS],  # the class's: PEFT nests its wrappers by it
        }
        module._is_hf_initialized = True  # its tensors come from the checkpoint or nowhere (finish_experts checks)
        for param in EXPERT_PARAMS:
            value = module._parameters[param]
            if not value.is_meta:
                module.quantize_(param, value)
        count += 1
    return count


@contextlib.contextmanager
def quantizing_experts(dtype: torch.dtype, double_quant: bool, triton: bool) -> Iterator[None]:
    """While transformers loads a 4-bit model: the experts modules become NF4 experts modules before the weights
    load (after bitsandbytes replaced the linear layers), so each layer's experts are quantized as they arrive."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original = Bnb4BitHfQuantizer._process_model_before_weight_loading

    def before_weights(self: Any, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = original(self, model, *args, **kwargs)
        prepare_experts(model, dtype, double_quant, triton)
        return result

    Bnb4BitHfQuantizer._process_model_before_weight_loading = before_weights
    try:
        yield
    finally:
        Bnb4BitHfQuantizer._process_model_before_weight_loading = original


def finish_experts(model: nn.Module) -> int:
    """After loading: every expert tensor came from the checkpoint and is quantized. Returns how many NF4 experts
    modules the model has. Raises DtuneError naming the module whose tensors the checkpoint lacks."""
    modules = nf4_experts(model)
    names = {id(m): n for n, m in model.named_modules()}
    for module in modules:
        missing = [p for p in EXPERT_PARAMS if p not in module._dtune_nf4["shapes"]]
        if missing:
            raise DtuneError(
                f"model: the checkpoint has no {', '.join(missing)} for {names[id(module)]} ({type(module).__name__}): "
                "an incomplete or foreign checkpoint; nothing is trained on experts it does not hold"
            )
    return len(modules)


def nf4_experts(model: nn.Module) -> list[NF4ExpertsMixin]:
    return [m for m in model.modules() if isinstance(m, NF4ExpertsMixin)]


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Every NF4 experts module back to dense 3-D parameters (what training computed with, in ``dtype``)."""
    for module in nf4_experts(model):
        module.dequantize_(dtype)
