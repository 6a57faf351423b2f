"""The plan: per-GPU bytes by component for a strategy and world size, the search for what fits, and the check a
run makes before it loads anything."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dtune.errors import ConfigError
from dtune.plan.probe import probe_activations
from dtune.plan.shape import parameter_bytes, skeleton
from dtune.schema import DtuneConfig
from dtune.units import GiB, parse_bytes

log = logging.getLogger(__name__)

CUDA_CONTEXT = int(0.6 * GiB)  # CUDA context + cuBLAS workspaces: outside max_memory_allocated
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a fraction of the tensor peak
# Per labelled token x vocab entry: fp32 logits, log-softmax and their gradients; 11.9 bytes measured on the CPU
# (SmolLM2-135M and the tiny Llama, bf16 and fp32 alike). The head weight is in the compute dtype: autocast makes no
# copy of it.
LOSS_BYTES_PER_LOGIT = 12.0


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


def labelled_fraction(cfg: DtuneConfig) -> float:
    """Share of tokens that carry loss, assumed for the plan: all of them for text or train_on=all, else half."""
    return 1.0 if cfg.data.format == "text" or cfg.data.train_on == "all" else 0.5


def make_plan(cfg: DtuneConfig, world_size: int, probe: dict[str, float] | None = None, shape: Any = None) -> Plan:
    """Predict one GPU's peak for ``cfg`` on ``world_size`` ranks. ``probe``/``shape`` are reused across calls."""
    model, config = shape or skeleton(cfg)
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
    # FSDP2 + CPUOffloadPolicy: parameter shards, gradients and optimizer states in CPU memory; each unit is copied
    # to the GPU (gathered) for its forward and backward, also on one rank.
    fsdp2_offload = strategy == "fsdp2" and cfg.engine.offload_params
    on_gpu = 0 if cfg.engine.offload_params else 1  # parameter offload keeps every parameter shard on the CPU
    lora_bytes = on_gpu * (2 if deepspeed and cfg.train.precision != "fp32" else 4) * n_lora  # DeepSpeed casts the module
    optim_bytes = 8 * n_lora + (4 * n_lora if deepspeed and cfg.train.precision != "fp32" else 0)  # + fp32 masters
    if cfg.engine.offload_optimizer:
        optim_bytes = 0
    grad_bytes = 0 if fsdp2_offload else 4 * n_lora  # reduce-scattered shards are copied to the CPU in backward

    # A preference micro-batch is two rows a pair (chosen, rejected); the reference's forward keeps nothing for backward.
    rows = cfg.train.micro_batch_size * (1 if cfg.train.objective == "sft" else 2)
    tokens = rows * cfg.data.max_seq_len
    labelled = int(tokens * labelled_fraction(cfg))
    dtype_bytes = 4 if cfg.train.precision == "fp32" else 2
    quantized = cfg.quant.quant_type != "none"
    layers = text.num_hidden_layers
    # The residual stream is fp32 for 4-bit bases (freeze_as_trained casts the embeddings' output).
    residual = 4 if quantized else dtype_bytes
    if cfg.model.gradient_checkpointing:
        stored = layers * tokens * text.hidden_size * residual
        layer_phase = probe["backward_peak_per_token"] * tokens
    else:
        stored = layers * probe["saved_per_token"] * tokens
        layer_phase = (probe["backward_peak_per_token"] - probe["saved_per_token"]) * tokens
    in_flight = min(labelled, cfg.train.loss_chunk_tokens) if cfg.train.loss_chunk_tokens else labelled
    loss = LOSS_BYTES_PER_LOGIT * in_flight * text.vocab_size
    # bitsandbytes writes each weight dequantized before its matmul; the fused kernels (on a GPU) never do.
    fused = cfg.quant.kernel == "triton"  # a GPU plan: on CPU the kernels' references do dequantize
    dequant = params["largest_linear"] * dtype_bytes if quantized and not fused else 0
    gathered = 2 * params["layer_base"] if shard_params and (w > 1 or fsdp2_offload) else 0
    if strategy == "fsdp2" and (w > 1 or fsdp2_offload):
        # The root unit (embeddings, final norm, head) is gathered for forward and, as the root, not resharded until
        # the step ends: in the compute dtype, whole.
        gathered += dtype_bytes * params["root_numel"]

    packed = params["base_4bit"]
    if strategy == "fsdp2":
        # FSDP2 shards (or offloads) the packed weights; their quantization constants are no parameters: each rank
        # holds them whole, on the GPU.
        constants = params["base_4bit_constants"]
        packed_gpu = on_gpu * (packed - constants) // w + constants
    else:
        packed_gpu = on_gpu * packed // (w if shard_params else 1)
    components = {
        "base (packed 4-bit + constants)": packed_gpu,
        "base (other)": on_gpu * params["base_other"] // (w if shard_params else 1),
        "LoRA parameters": lora_bytes // (w if shard_params else 1),
        "LoRA gradients": grad_bytes // (w if shard_grads else 1),
        "optimizer states": optim_bytes // (w if shard_opt else 1),
        "activations (kept)": int(stored),
        "activations (peak phase)": int(max(layer_phase + dequant, loss)),
        "gathered shards": gathered,
    }
    notes = {
        "base (packed 4-bit + constants)": cfg.quant.quant_type.upper()
        + (" + double quant" if cfg.quant.double_quant else "")
        + (", constants only (shards on the CPU)" if fsdp2_offload else f", / {w} ranks" if shard_params else ""),
        "base (other)": f"embeddings, norms, head; {cfg.train.precision}"
        if quantized
        else f"the whole 16-bit base, {cfg.train.precision}",
        "LoRA parameters": f"{n_lora:,} params",
        "LoRA gradients": "on the CPU" if fsdp2_offload else "fp32" + (f", / {w}" if shard_grads else ""),
        "optimizer states": "offloaded to CPU" if cfg.engine.offload_optimizer else "Adam" + (f", / {w}" if shard_opt else ""),
        "activations (kept)": "layer inputs (checkpointing)" if cfg.model.gradient_checkpointing else "every layer",
        "activations (peak phase)": f"max(1 layer{' + dequant' if dequant else ''}, loss over {in_flight:,} of {labelled:,} labelled tokens at once)",
        "gathered shards": ("2 layers in flight" + (" + the root unit" if strategy == "fsdp2" else "")) if gathered else "",
    }
    settings = {
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_seq_len": cfg.data.max_seq_len,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "engine": (f"zero{zero}" if zero else strategy) + ("_offload" if cfg.engine.offload_params else ""),
        "labelled_fraction": labelled_fraction(cfg),
    }
    return Plan(components, notes, settings, w, extra={"probe": probe, "lora_params": n_lora})


def fit(cfg: DtuneConfig, world_size: int, gpu_bytes: int) -> tuple[Plan, int, list[str]]:
    """The plan, the largest micro-batch that fits, and changes that would make a non-fitting config fit."""
    import copy

    shape = skeleton(cfg)
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
        # Each engine option as its config group sets it, offload flags included (not the current engine's).
        offload = {"engine__offload_optimizer": True, "engine__offload_params": True}
        no_offload = {"engine__offload_optimizer": False, "engine__offload_params": False}
        if world_size > 1:
            candidates.append(("engine=fsdp2", {"engine__strategy": "fsdp2", "engine__zero_stage": 0, **no_offload}))
            candidates.append(("engine=zero3", {"engine__strategy": "deepspeed", "engine__zero_stage": 3, **no_offload}))
            candidates.append(
                (
                    "engine=zero3_offload",
                    {
                        "engine__strategy": "deepspeed",
                        "engine__zero_stage": 3,
                        **offload,
                    },
                )
            )
        # Offload helps one GPU too: the model's shards live in CPU memory, one unit at a time on the GPU.
        candidates.append(("engine=fsdp2_offload", {"engine__strategy": "fsdp2", "engine__zero_stage": 0, **offload}))
        candidates.append((f"data.max_seq_len={cfg.data.max_seq_len // 2}", {"data__max_seq_len": cfg.data.max_seq_len // 2}))
        for text, changes in candidates:
            if make_plan(with_(**changes), world_size, probe, shape).needed <= gpu_bytes:
                ideas.append(text)
    return plan, largest, ideas


def check_fits(cfg: DtuneConfig, world_size: int) -> str | None:
    """Before training: the plan's table if a GPU memory is known (``train.gpu_mem`` or this GPU's), else None.
    Raises ConfigError when the config is predicted not to fit, unless ``train.force``."""
    gpu = parse_bytes(cfg.train.gpu_mem, "train.gpu_mem", default_unit="G") if cfg.train.gpu_mem else gpu_memory()
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


def gpu_memory() -> int | None:
    """Total memory of this machine's GPU, if it has one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[1]
