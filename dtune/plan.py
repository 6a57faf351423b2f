"""``dtune plan``: per-GPU peak memory of a QLoRA run, predicted before launch.

From the composed config and the model's ``config.json`` (no weights are read):

* **parameters** come from the model built on the meta device: which linear layers bitsandbytes packs into NF4
  (all but the output head), their bytes with double-quantization constants, the rest in fp32 (QLoRA's
  ``prepare_model_for_kbit_training`` upcasts them; a 16-bit base, ``quant=none``, stays in the compute dtype),
  and the LoRA adapters (fp32);
* **gradients and optimizer states** of the adapters (Adam: two fp32 moments; DeepSpeed adds fp32 masters beside
  16-bit copies), divided over ranks as the engine shards them, on the CPU when offloaded;
* **activations** from a probe: one decoder layer of the model's own class, with this run's LoRA targets, random
  weights and autocast, runs forward and backward on the CPU for two short sequences; the live tensor bytes it
  leaves for backward, and its peak in backward, per token, scale to ``micro_batch_size x max_seq_len``. With
  gradient checkpointing the run keeps each layer's input and recomputes one layer at a time; without, it keeps
  every layer's activations;
* **the loss**: logits in fp32 at labelled positions only (dtune's CompletionLoss), with their softmax and gradient;
* **temporaries**: one dequantized weight (bitsandbytes; none with ``quant.kernel=triton`` on a GPU, whose fused
  kernels never write the weight out), and under ZeRO-3/FSDP2 the gathered parameters of the layers in flight.

The prediction is the peak of tensor memory (what ``torch.cuda.max_memory_allocated`` reports); the verdict adds
the CUDA context and allocator slack. ``dtune plan --measure`` runs two steps of the config on this machine and
prints measured beside predicted.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dtune.config import DtuneConfig
from dtune.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30
BLOCK = 64  # bitsandbytes 4-bit block size
CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context + cuBLAS workspaces: outside max_memory_allocated
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the tensor peak
# Per labelled token x vocab entry: fp32 logits, log-softmax and their gradients; 11.9 bytes measured on the CPU
# (SmolLM2-135M and the tiny Llama, bf16 and fp32 alike). Under 16-bit autocast the fp32 head weight is also cast,
# and kept for backward: vocab x hidden x 2 bytes more.
LOSS_BYTES_PER_LOGIT = 12.0


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


@dataclass
class Plan:
    """Predicted per-GPU bytes by component (tensor memory), and the settings they follow from."""

    components: dict[str, int]
    notes: dict[str, str]
    settings: dict[str, Any]
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Predicted peak of allocated tensor memory on one GPU."""
        return sum(self.components.values())

    @property
    def needed(self) -> int:
        """What the GPU must have: the peak, allocator slack and the CUDA context."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT


# --------------------------------------------------------------------------------------------- model shape


def _skeleton(cfg: DtuneConfig) -> tuple[nn.Module, Any]:
    """The model's module tree on the meta device (no weights), and its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtune.model import model_dir

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
    layers = _decoder_layers(model)
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


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


# --------------------------------------------------------------------------------------------- activation probe


def probe_activations(cfg: DtuneConfig, model: nn.Module, config: Any) -> dict[str, float]:
    """Bytes per token of one decoder layer: left saved for backward by its forward, and at its peak in backward
    (recomputation under gradient checkpointing runs the forward again there). Measured on the CPU with this run's
    compute dtype and LoRA targets; the frozen base layers stand in unquantized (bitsandbytes' matmul keeps the same
    input for backward)."""
    from dtune.model import DTYPES

    dtype = DTYPES[cfg.train.precision]
    quantized = cfg.quant.quant_type != "none"
    layers = _decoder_layers(model)
    if not layers:
        raise ConfigError(f"model: {type(model).__name__} names no decoder-layer class (_no_split_modules): cannot probe it")
    layer_cls = type(layers[0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text._attn_implementation = cfg.model.attn_implementation  # eager keeps s^2 attention probabilities, sdpa does not
    rotary_cls = type(getattr(getattr(model, "model", model), "rotary_emb", None))
    with torch.random.fork_rng(devices=[]):  # the caller's random streams (rank 0's dropout) stay as they were
        return _probe(cfg, layer_cls, text, rotary_cls, dtype, quantized)


def _probe(
    cfg: DtuneConfig, layer_cls: type, text: Any, rotary_cls: type, dtype: torch.dtype, quantized: bool
) -> dict[str, float]:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    with torch.device("meta"):  # allocate without initialising (a 70B layer has 0.9B weights), then fill
        layer = layer_cls(text, layer_idx=0)
    layer = layer.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    rotary = rotary_cls(config=text) if rotary_cls is not type(None) else None
    for module in list(layer.modules()):
        if quantized and type(module) is nn.Linear:  # 4-bit layers return their input's dtype, as bitsandbytes' do
            module.__class__ = _Linear4bitStandIn
    for p in layer.parameters():
        p.requires_grad_(False)
        if quantized and p.dim() < 2:
            p.data = p.data.float()  # upcast like prepare_model_for_kbit_training (a 16-bit base stays as loaded)
    targets = list(cfg.lora.target_modules)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        bias=cfg.lora.bias,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )
    layer = inject_adapter_in_model(lora, layer)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)

    # The residual stream: fp32 when the embeddings were upcast (4-bit bases), else the base's dtype.
    residual_dtype = torch.float32 if quantized else dtype

    def run(tokens: int) -> tuple[int, int]:
        hidden = torch.randn(1, tokens, text.hidden_size, dtype=residual_dtype, requires_grad=True)
        position_ids = torch.arange(tokens)[None]
        kwargs: dict[str, Any] = {"position_ids": position_ids}
        if rotary is not None:
            try:
                kwargs["position_embeddings"] = rotary(hidden, position_ids)
            except TypeError as err:  # e.g. per-layer-type rotary embeddings (Gemma 3)
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
    return {"saved_per_token": (s2 - s1) / 64, "backward_peak_per_token": (p2 - p1) / 64}


class _Linear4bitStandIn(nn.Linear):
    """A frozen linear layer with bitsandbytes' Linear4bit dtype behaviour: computes in the weight's dtype and returns
    the input's (fp32 in, fp32 out). Its autograd keeps what bitsandbytes' keeps for the input gradient: nothing of
    the input (the packed weight, alive anyway, is the probe's unquantized one here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


# --------------------------------------------------------------------------------------------- the plan


def labelled_fraction(cfg: DtuneConfig) -> float:
    """Share of tokens that carry loss, assumed for the plan: all of them for text or train_on=all, else half."""
    return 1.0 if cfg.data.format == "text" or cfg.data.train_on == "all" else 0.5


def make_plan(cfg: DtuneConfig, world_size: int, probe: dict[str, float] | None = None, shape: Any = None) -> Plan:
    """Predict one GPU's peak for ``cfg`` on ``world_size`` ranks. ``probe``/``shape`` are reused across calls."""
    model, config = shape or _skeleton(cfg)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    probe = probe or probe_activations(cfg, model, config)
    params = parameter_bytes(cfg, model)
    strategy, stage = cfg.engine.strategy, cfg.engine.zero_stage
    zero = stage if strategy == "deepspeed" else 0
    shard_params = zero == 3 or strategy == "fsdp2"
    shard_grads = zero >= 2 or strategy == "fsdp2"
    shard_opt = zero >= 1 or strategy == "fsdp2"
    w = max(world_size, 1)

    n_lora = params["lora_params"]
    deepspeed = strategy == "deepspeed"
    on_gpu = 0 if cfg.engine.offload_params else 1  # ZeRO-3 parameter offload keeps every parameter on the CPU
    lora_bytes = on_gpu * (2 if deepspeed and cfg.train.precision != "fp32" else 4) * n_lora  # DeepSpeed casts the module
    optim_bytes = 8 * n_lora + (4 * n_lora if deepspeed and cfg.train.precision != "fp32" else 0)  # + fp32 masters
    if cfg.engine.offload_optimizer:
        optim_bytes = 0

    tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
    labelled = int(tokens * labelled_fraction(cfg))
    dtype_bytes = 4 if cfg.train.precision == "fp32" else 2
    quantized = cfg.quant.quant_type != "none"
    layers = text.num_hidden_layers
    # The residual stream is fp32 when prepare_model_for_kbit_training upcast the embeddings (4-bit bases).
    residual = 4 if quantized else dtype_bytes
    if cfg.model.gradient_checkpointing:
        stored = layers * tokens * text.hidden_size * residual
        layer_phase = probe["backward_peak_per_token"] * tokens
    else:
        stored = layers * probe["saved_per_token"] * tokens
        layer_phase = (probe["backward_peak_per_token"] - probe["saved_per_token"]) * tokens
    in_flight = min(labelled, cfg.train.loss_chunk_tokens) if cfg.train.loss_chunk_tokens else labelled
    loss = LOSS_BYTES_PER_LOGIT * in_flight * text.vocab_size
    if cfg.train.precision != "fp32" and quantized:
        loss += 2 * text.vocab_size * text.hidden_size  # the head weight (upcast to fp32), cast for the matmul
    # bitsandbytes writes each weight dequantized before its matmul; the fused kernels (on a GPU) never do.
    fused = cfg.quant.kernel == "triton"  # a GPU plan: on CPU the kernels' references do dequantize
    dequant = params["largest_linear"] * dtype_bytes if quantized and not fused else 0
    gathered = 2 * params["layer_base"] if shard_params and w > 1 else 0
    if strategy == "fsdp2" and w > 1:
        # The root unit (embeddings, final norm, head) is gathered for forward and, as the root, not resharded until
        # the step ends: in the compute dtype, whole.
        gathered += dtype_bytes * params["root_numel"]

    components = {
        "base (packed 4-bit + constants)": on_gpu * params["base_4bit"] // (w if shard_params else 1),
        "base (other)": on_gpu * params["base_other"] // (w if shard_params else 1),
        "LoRA parameters": lora_bytes // (w if shard_params else 1),
        "LoRA gradients": 4 * n_lora // (w if shard_grads else 1),
        "optimizer states": optim_bytes // (w if shard_opt else 1),
        "activations (kept)": int(stored),
        "activations (peak phase)": int(max(layer_phase + dequant, loss)),
        "gathered shards": gathered,
    }
    notes = {
        "base (packed 4-bit + constants)": "NF4 "
        + ("+ double quant" if cfg.quant.double_quant else "")
        + (f", / {w} ranks" if shard_params else ""),
        "base (other)": "embeddings, norms, head; fp32" if quantized else f"the whole 16-bit base, {cfg.train.precision}",
        "LoRA parameters": f"{n_lora:,} params",
        "LoRA gradients": "fp32" + (f", / {w}" if shard_grads else ""),
        "optimizer states": "offloaded to CPU" if cfg.engine.offload_optimizer else "Adam" + (f", / {w}" if shard_opt else ""),
        "activations (kept)": "layer inputs (checkpointing)" if cfg.model.gradient_checkpointing else "every layer",
        "activations (peak phase)": f"max(1 layer{' + dequant' if dequant else ''}, loss over {in_flight:,} of {labelled:,} labelled tokens at once)",
        "gathered shards": ("2 layers in flight" + (" + the root unit" if strategy == "fsdp2" else "")) if gathered else "",
    }
    settings = {
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_seq_len": cfg.data.max_seq_len,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "engine": strategy if not zero else f"zero{zero}",
        "labelled_fraction": labelled_fraction(cfg),
    }
    return Plan(components, notes, settings, w, extra={"probe": probe})


def fit(cfg: DtuneConfig, world_size: int, gpu_bytes: int) -> tuple[Plan, int, list[str]]:
    """The plan, the largest micro-batch that fits, and changes that would make a non-fitting config fit."""
    import copy

    shape = _skeleton(cfg)
    plan = make_plan(cfg, world_size, shape=shape)
    probe = plan.extra["probe"]

    def with_(**changes: Any) -> DtuneConfig:
        new = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(new, section), name, value)
        return new

    def fits(micro: int) -> bool:
        return make_plan(with_(train__micro_batch_size=micro), world_size, probe, shape).needed <= gpu_bytes

    # Memory grows with the micro-batch: bisect for the largest that fits, 0 when none does (at most 1024).
    largest, too_big = 0, 1025
    while too_big - largest > 1:
        middle = (largest + too_big) // 2
        largest, too_big = (middle, too_big) if fits(middle) else (largest, middle)
    ideas: list[str] = []
    if plan.needed > gpu_bytes:
        candidates: list[tuple[str, dict[str, Any]]] = []
        if largest:
            accum = math.ceil(cfg.train.micro_batch_size * cfg.train.grad_accum_steps / largest)
            candidates.append(
                (f"train.micro_batch_size={largest} train.grad_accum_steps={accum}", {"train__micro_batch_size": largest})
            )
        if not cfg.model.gradient_checkpointing:
            candidates.append(("model.gradient_checkpointing=true", {"model__gradient_checkpointing": True}))
        if world_size > 1:
            candidates.append(("engine=fsdp2", {"engine__strategy": "fsdp2", "engine__zero_stage": 0}))
            candidates.append(("engine=zero3", {"engine__strategy": "deepspeed", "engine__zero_stage": 3}))
            candidates.append(
                (
                    "engine=zero3_offload",
                    {
                        "engine__strategy": "deepspeed",
                        "engine__zero_stage": 3,
                        "engine__offload_optimizer": True,
                        "engine__offload_params": True,
                    },
                )
            )
        candidates.append((f"data.max_seq_len={cfg.data.max_seq_len // 2}", {"data__max_seq_len": cfg.data.max_seq_len // 2}))
        for text, changes in candidates:
            if make_plan(with_(**changes), world_size, probe, shape).needed <= gpu_bytes:
                ideas.append(text)
    return plan, largest, ideas


def check_fits(cfg: DtuneConfig, world_size: int) -> str | None:
    """Before training: the plan's table if a GPU memory is known (``train.gpu_mem`` or this GPU's), else None.
    Raises ConfigError when the config is predicted not to fit, unless ``train.force``."""
    gpu = parse_bytes(cfg.train.gpu_mem) if cfg.train.gpu_mem else gpu_memory()
    if not gpu:
        return None
    try:
        plan, largest, ideas = fit(cfg, world_size, gpu)
    except Exception as err:  # an architecture the probe cannot run must not stop a run that would train
        log.warning("memory plan unavailable for this model (%s: %s); training without the check", type(err).__name__, err)
        return None
    table = format_plan(plan, gpu)
    if plan.needed > gpu and not cfg.train.force:
        hint = (f"largest micro-batch that fits: {largest}; " if largest else "") + (
            "would fit: " + "; ".join(ideas) if ideas else "no single change found that fits"
        )
        raise ConfigError(
            f"train.gpu_mem: predicted to need {plan.needed / GiB:.2f} GiB per GPU, {gpu / GiB:.2f} GiB available "
            f"({hint}); train.force=true trains anyway\n{table}"
        )
    return table


def format_plan(plan: Plan, gpu_bytes: int | None = None, measured: dict[str, int] | None = None) -> str:
    rows = [f"{'component':<34}{'predicted':>12}  note"]
    for name, size in plan.components.items():
        rows.append(f"{name:<34}{size / GiB:>10.3f} G  {plan.notes.get(name, '')}")
    rows.append(f"{'peak tensor memory':<34}{plan.peak / GiB:>10.3f} G  (torch.cuda.max_memory_allocated)")
    if measured:
        for name, size in measured.items():
            rows.append(f"{name:<34}{size / GiB:>10.3f} G  ({size / plan.peak:.1%} of predicted)" if plan.peak else "")
    rows.append(f"{'GPU memory needed':<34}{plan.needed / GiB:>10.3f} G  (+{ALLOCATOR_SLACK:.0%} allocator slack, CUDA context)")
    if gpu_bytes:
        verdict = "fits" if plan.needed <= gpu_bytes else "does NOT fit"
        rows.append(f"verdict: {verdict} in {gpu_bytes / GiB:.1f} GiB per GPU ({plan.world_size} rank(s), {plan.settings})")
    return "\n".join(rows)


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu-mem: cannot read {text!r} (e.g. 80GiB, 40GB, 24G)")
    value, unit = float(match.group(1)), (match.group(2) or "G").upper()
    power = {"K": 1, "M": 2, "G": 3, "T": 4, "B": 0}[unit[0]]
    base = 1000 if unit.endswith("B") and "I" not in unit and unit != "B" else 1024
    return int(value * base**power)


# --------------------------------------------------------------------------------------------- measurement


def measure(cfg: DtuneConfig, steps: int = 2) -> dict[str, int]:
    """Run ``steps`` optimizer steps of ``cfg`` in this process on full-length synthetic batches (the plan's worst
    case) and return the peak tensor memory: ``torch.cuda.max_memory_allocated`` on a GPU, live tensor bytes
    counted at the dispatcher on the CPU."""
    import gc

    from dtune.engine import Engine
    from dtune.loss import CompletionLoss
    from dtune.model import build_model
    from dtune.optim import build_optimizer
    from dtune.train import accumulate_gradients

    engine = Engine(cfg)
    cuda = engine.device.type == "cuda"
    gc.collect()  # what an earlier measurement in this process left
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(engine.device)
    model = build_model(cfg, engine.load_device)
    loss_model = CompletionLoss(model, cfg.train.loss_chunk_tokens)
    optimizer = build_optimizer(loss_model, cfg.optim)
    loss_model, optimizer = engine.prepare(loss_model, optimizer)
    vocab = model.get_base_model().config.vocab_size
    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=generator)
    labels = ids.clone()
    labels[:, : s - max(1, int(s * labelled_fraction(cfg)))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    live = LiveTensorBytes()
    for tensor in [*loss_model.parameters(), *loss_model.buffers()]:
        live.track(tensor)
    with live:
        for _ in range(steps):
            accumulate_gradients(loss_model, [batch] * cfg.train.grad_accum_steps, engine)
            engine.step(loss_model, optimizer, _NoSchedule(), cfg.optim.max_grad_norm)
    if cuda:
        return {"measured (max_memory_allocated)": torch.cuda.max_memory_allocated(engine.device)}
    return {"measured (live tensors, CPU)": live.peak}


class _NoSchedule:
    def step(self) -> None:
        pass


# Configs the validation benchmark runs (dtune plan --validate): small enough for a CPU, spanning what the plan models.
VALIDATION_GRID = (
    ("tiny, fp32", ["model=tiny_llama", "train.micro_batch_size=8", "data.max_seq_len=256", "train.precision=fp32"]),
    (
        "tiny, no checkpointing",
        ["model=tiny_llama", "train.micro_batch_size=4", "data.max_seq_len=512", "model.gradient_checkpointing=false"],
    ),
    ("SmolLM2-135M", ["model=smollm2_135m", "train.micro_batch_size=2", "data.max_seq_len=256"]),
    (
        "SmolLM2-135M, no ckpt, all tokens",
        [
            "model=smollm2_135m",
            "train.micro_batch_size=2",
            "data.max_seq_len=256",
            "data.train_on=all",
            "model.gradient_checkpointing=false",
        ],
    ),
    (
        "SmolLM2-135M, attn LoRA r64",
        ["model=smollm2_135m", "train.micro_batch_size=4", "data.max_seq_len=128", "lora=attn_only", "lora.r=64"],
    ),
    (
        "SmolLM2-135M, no double quant",
        ["model=smollm2_135m", "train.micro_batch_size=8", "data.max_seq_len=64", "quant.double_quant=false"],
    ),
    ("SmolLM2-135M, 16-bit base", ["model=smollm2_135m", "train.micro_batch_size=2", "data.max_seq_len=256", "quant=none"]),
    (
        "tiny, 16-bit base, no ckpt",
        [
            "model=tiny_llama",
            "train.micro_batch_size=4",
            "data.max_seq_len=256",
            "quant=none",
            "model.gradient_checkpointing=false",
        ],
    ),
)


# On a GPU, --validate adds Llama-3-shaped models with random weights (builtin:shape-llama-*, built on first use):
# (size, micro-batch, sequence length).
GPU_VALIDATION_SHAPES = (("1b", 4, 2048), ("3b", 2, 2048), ("8b", 2, 2048), ("8b", 1, 4096))


def _shaped_row(size: str, micro: int, seq: int) -> tuple[str, list[str]]:
    return (
        f"Llama-{size.upper()}-shaped, {micro}x{seq}",
        [f"model.name_or_path=builtin:shape-llama-{size}", f"train.micro_batch_size={micro}", f"data.max_seq_len={seq}"],
    )


def validation_grid(which: str, shapes: list[str], cuda: bool) -> tuple[tuple[str, list[str]], ...]:
    """The configs ``--validate`` runs: ``cpu`` (VALIDATION_GRID), ``gpu`` (its tiny-model rows, which need no
    model package, then the Llama-shaped ``shapes``), ``auto`` (cpu, plus the shapes where ``cuda``).

    Raises:
        ConfigError: a shape that GPU_VALIDATION_SHAPES does not hold.
    """
    known = {size for size, _, _ in GPU_VALIDATION_SHAPES}
    if set(shapes) - known:
        raise ConfigError(f"--shapes: unknown {sorted(set(shapes) - known)}; choose from {sorted(known)}")
    shaped = tuple(_shaped_row(*shape) for shape in GPU_VALIDATION_SHAPES if shape[0] in shapes)
    if which == "cpu" or (which == "auto" and not cuda):
        return VALIDATION_GRID
    if which == "gpu":
        return tuple(row for row in VALIDATION_GRID if "model=tiny_llama" in row[1]) + shaped
    return VALIDATION_GRID + shaped


def validate_plans(
    grid: tuple[tuple[str, list[str]], ...], extra: list[str], on_row: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """Predicted beside measured peak for each config of ``grid`` (one process, this machine); ``on_row`` gets the
    rows so far after each one (a time-limited run keeps what it measured)."""
    rows = []
    for name, overrides in grid:
        cfg = compose(["logger=none", *overrides, *extra])
        predicted = make_plan(cfg, world_size=1).peak
        ((kind, measured),) = measure(cfg).items()
        rows.append({"config": name, "overrides": overrides, "predicted": predicted, "measured": measured, "kind": kind})
        print(f"{name:<36}{predicted / GiB:>10.3f} G{measured / GiB:>10.3f} G{measured / predicted:>9.1%}", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


# --------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dtune plan",
        description="Predict per-GPU peak memory of a dtune run from its config (no weights are loaded).",
        epilog="Overrides are those of dtune train, e.g.: dtune plan --gpu-mem 80GiB --world-size 8 engine=zero3 model.name_or_path=/models/llama-8b",
    )
    parser.add_argument("--gpu-mem", help="memory of one GPU (e.g. 80GiB); default: this machine's GPU, if any")
    parser.add_argument("--world-size", type=int, help="ranks; default: launcher.nproc_per_node x launcher.nnodes")
    parser.add_argument("--measure", action="store_true", help="also run 2 steps here and print the measured peak")
    parser.add_argument(
        "--validate", action="store_true", help="benchmark: predicted vs measured for a grid of small configs, run here"
    )
    parser.add_argument("--json", help="with --validate: write the rows to this file")
    parser.add_argument(
        "--grid",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="with --validate: cpu = the small configs (some need the built-in SmolLM2), gpu = the Llama-shaped ones "
        "and the tiny ones, auto = cpu + gpu where a GPU is present",
    )
    parser.add_argument(
        "--shapes", default="1b,3b,8b", help="with --validate: which Llama shapes the gpu grid runs (comma-separated)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for dtune train")
    args = parser.parse_args(argv)

    from dtune.errors import user_errors
    from dtune.train import _quiet_libraries

    _quiet_libraries()
    with user_errors():
        if args.validate:
            import json
            import platform

            print(f"{'config':<36}{'predicted':>12}{'measured':>12}{'ratio':>9}")
            grid = validation_grid(args.grid, [x for x in args.shapes.split(",") if x], torch.cuda.is_available())
            meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

            def write(rows: list[dict[str, Any]]) -> None:
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=2)

            rows = validate_plans(grid, args.overrides, on_row=write)
            worst = max(abs(r["measured"] / r["predicted"] - 1) for r in rows)
            print(f"largest deviation: {worst:.1%} ({rows[0]['kind']}, {platform.processor() or platform.machine()})")
            return 0
        cfg = compose(args.overrides)
        world = args.world_size or cfg.launcher.nproc_per_node * cfg.launcher.nnodes
        gpu = parse_bytes(args.gpu_mem) if args.gpu_mem else gpu_memory()
        if gpu:
            plan, largest, ideas = fit(cfg, world, gpu)
        else:
            plan, largest, ideas = make_plan(cfg, world), None, []
        if args.measure and world != 1:
            raise ConfigError(f"--measure: runs one process here; plan it with --world-size 1 (got {world})")
        measured = measure(cfg) if args.measure else None
        print(format_plan(plan, gpu, measured))
        if gpu:
            print(f"largest micro-batch that fits: {largest}" if largest else "no micro-batch fits")
            for idea in ideas:
                print(f"  would fit: {idea}")
        return 0 if not gpu or plan.needed <= gpu else 1


def gpu_memory() -> int | None:
    """Total memory of this machine's GPU, if it has one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[1]


def compose(overrides: list[str]) -> DtuneConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dtune.config import conf_dir, to_dataclass, validate

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = to_dataclass(hydra_compose(config_name="config", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides: {str(err).splitlines()[0]}") from None
    validate(cfg)
    return cfg


if __name__ == "__main__":
    sys.exit(main())
