"""Activation bytes of a decoder layer, measured: the layer of the model's own class, with this run's LoRA
adapters and compute dtype, runs forward and backward on the CPU while :class:`LiveTensorBytes` counts the storages
alive."""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dtune.errors import ConfigError
from dtune.moe import experts_in_nf4, fewer_experts, prepare_experts
from dtune.moe_peft import adopt_expert_adapters, peft_view
from dtune.plan.shape import adapted, decoder_layers
from dtune.schema import DtuneConfig
from dtune.units import DTYPES


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive, and their peak, for tensors made or registered while active."""

    def __init__(self) -> None:
        super().__init__()
        self._ids: set[int] = set()
        self.current = 0
        self.peak = 0

    def track(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._ids:
            return
        size = storage.nbytes()
        self._ids.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._ids.discard(key)
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


def probe_activations(cfg: DtuneConfig, model: nn.Module, config: Any) -> dict[str, float]:
    """Bytes per token of a decoder layer: left saved for backward by its forward, and at its peak in backward
    (recomputation under gradient checkpointing runs the forward again there). Measured on the CPU with this run's
    compute dtype and LoRA adapters (as PEFT resolves them on the whole model); the frozen base layers stand in
    unquantized (bitsandbytes' matmul keeps the same input for backward). Where layers differ in kind
    (``config.layer_types``: Gemma 3's sliding and full attention), one layer of each kind is probed: saved bytes
    are their mean over the model's layers, the peak the largest."""
    dtype = DTYPES[cfg.train.precision]
    quantized = cfg.quant.quant_type != "none"
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"model: {type(model).__name__} names no decoder-layer class (_no_split_modules): cannot probe it")
    layer_cls = type(layers[0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text._attn_implementation = cfg.model.attn_implementation  # eager keeps s^2 attention probabilities, sdpa does not
    rotary_cls = type(getattr(getattr(model, "model", model), "rotary_emb", None))
    lora = adapted(cfg, model)[1]
    kinds = layer_kinds(text)
    with torch.random.fork_rng(devices=[]):  # the caller's random streams (rank 0's dropout) stay as they were
        experts = quantized and experts_in_nf4(cfg)
        probed = fewer_experts(text)  # an MoE layer probed with 16 experts: per token, its activations are the same
        probes = [
            (n, _probe(layer_cls, index, probed, rotary_cls, lora, dtype, quantized, experts, cfg.quant.double_quant))
            for index, n in kinds.items()
        ]
    return {
        "saved_per_token": sum(n * probe["saved_per_token"] for n, probe in probes) / sum(kinds.values()),
        "backward_peak_per_token": max(probe["backward_peak_per_token"] for _, probe in probes),
    }


def layer_kinds(text: Any) -> dict[int, int]:
    """The index of the first decoder layer of each kind (``layer_types``), and how many layers are of that kind."""
    types = list(getattr(text, "layer_types", None) or [])[: text.num_hidden_layers]
    if not types:
        return {0: text.num_hidden_layers}
    return {types.index(kind): types.count(kind) for kind in dict.fromkeys(types)}


def _position_embeddings(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: Any) -> Any:
    """(cos, sin) as the model computes them for a layer: per layer type where its rotary embedding takes one
    (transformers 5's Gemma 3: one inverse frequency per type, ``rotary_emb(x, position_ids, layer_type)``)."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, position_ids, layer_type=layer_type)
    return rotary(hidden, position_ids)


def _probe(
    layer_cls: type,
    index: int,
    text: Any,
    rotary_cls: type,
    lora: LoraConfig | None,
    dtype: torch.dtype,
    quantized: bool,
    experts: bool = False,
    double_quant: bool = True,
) -> dict[str, float]:
    torch.manual_seed(0)
    with torch.device("meta"):  # allocate without initialising (a 70B layer has 0.9B weights), then fill
        layer = layer_cls(text, layer_idx=index)
    layer = layer.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    rotary = rotary_cls(config=text) if rotary_cls is not type(None) else None
    for module in list(layer.modules()):
        if quantized and type(module) is nn.Linear:  # 4-bit layers return their input's dtype, as bitsandbytes' do
            module.__class__ = _Linear4bitStandIn
    if experts:  # MoE experts as training holds them: NF4 per expert, the grouped forward (dtune.moe)
        prepare_experts(layer, dtype, double_quant, triton=False)
    for p in layer.parameters():
        p.requires_grad_(False)  # in the compute dtype, as freeze_as_trained leaves them
    if lora is not None:
        with warnings.catch_warnings(), peft_view(layer):  # PEFT's notes on patterns that name modules of other layers
            warnings.simplefilter("ignore")
            layer = inject_adapter_in_model(copy.deepcopy(lora), layer)
        adopt_expert_adapters(layer)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)

    # The residual stream: fp32 for 4-bit bases (freeze_as_trained casts the embeddings' output), else the base's dtype.
    residual_dtype = torch.float32 if quantized else dtype
    layer_types = getattr(text, "layer_types", None)
    layer_type = layer_types[index] if layer_types else None

    def run(tokens: int) -> tuple[int, int]:
        hidden = torch.randn(1, tokens, text.hidden_size, dtype=residual_dtype, requires_grad=True)
        position_ids = torch.arange(tokens)[None]
        kwargs: dict[str, Any] = {"position_ids": position_ids}
        if rotary is not None:
            try:
                kwargs["position_embeddings"] = _position_embeddings(rotary, hidden, position_ids, layer_type)
            except TypeError as err:
                raise ConfigError(
                    f"model: cannot probe {layer_cls.__name__}: its rotary embedding takes other arguments ({err})"
                ) from None
        live = LiveTensorBytes()
        with live, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            before = live.current
            out = layer(hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            saved = live.current - before
            live.reset_peak()
            out.float().sum().backward()
        return saved, live.peak - before

    (s1, p1), (s2, p2) = run(32), run(96)
    saved = (s2 - s1) / 64
    # Backward starts with everything saved alive, so its peak per token is at least that. The slope of the peaks can
    # come out below it when a transient of fixed size (an MoE expert dequantized in backward) sets the short run's
    # peak and not the long one's.
    return {"saved_per_token": saved, "backward_peak_per_token": max((p2 - p1) / 64, saved)}


class _Linear4bitStandIn(nn.Linear):
    """A frozen linear layer with bitsandbytes' Linear4bit dtype behaviour: computes in the weight's dtype and returns
    the input's (fp32 in, fp32 out). Its autograd keeps what bitsandbytes' keeps for the input gradient: nothing of
    the input (the packed weight, alive anyway, is the probe's unquantized one here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
