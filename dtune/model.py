"""Build the trainable model: a frozen base (bitsandbytes 4-bit, or plain) with PEFT LoRA adapters.

The 4-bit base uses double quantization and stores its packed weights in the compute dtype
(``bnb_4bit_quant_storage``), so ZeRO-3 and FSDP can shard them like any other tensor of that dtype.
Adapters are ordinary PEFT LoRA layers: what we save is a standard PEFT adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.assets import recorded_base, resolve_model
from dtune.data.formats import CHATML
from dtune.errors import ConfigError, DtuneError
from dtune.quant import fuse_lora_layers, use_fused_kernels
from dtune.schema import DtuneConfig
from dtune.units import DTYPES

log = logging.getLogger(__name__)


def model_dir(cfg: DtuneConfig) -> Path:
    """The local directory of ``model.name_or_path``: a built-in's, a Hub model's snapshot (fetched on first use) or
    the directory named. Raises ConfigError when it holds no model."""
    name = cfg.model.name_or_path
    path = resolve_model(name)
    if not path.exists():
        raise ConfigError(f"model.name_or_path: '{name}' is no local directory, nor a Hugging Face Hub id (owner/name)")
    if not (path / "config.json").is_file():
        of = "" if str(path) == name else f" (of {name})"
        raise ConfigError(f"model.name_or_path: {path}{of} is not a Hugging Face model directory (no config.json)")
    return path


def load_tokenizer(cfg: DtuneConfig) -> Any:
    """The base's tokenizer, with a padding token (its eos when it has none) and a chat template (ChatML when it has
    none): the template training renders with, which merge and the saved adapter carry."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir(cfg), trust_remote_code=cfg.model.trust_remote_code)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padded positions are masked out of attention and loss anyway
    return tok


def quantization_config(cfg: DtuneConfig) -> Any:
    if cfg.quant.quant_type == "none":
        return None
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[cfg.train.precision]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def pin_cpu_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with avx512_bf16.

    On such CPUs ``Linear4bit.forward`` in eval mode rewrites the packed weight into a CPU-specific layout, and a
    later ``state_dict()`` re-quantizes the absmax: weights drift and results differ between machines.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base(
    cfg: DtuneConfig,
    device: torch.device | None,
    *,
    quantized: bool = True,
    dtype: torch.dtype | None = None,
    safetensors_only: bool = False,
    training: bool = True,
) -> nn.Module:
    """The base model of ``cfg`` -- for training and for inference alike: 4-bit per ``quant`` (unless not
    ``quantized``), ``model.attn_implementation``, dtune's fused kernels with ``quant.kernel=triton``.

    ``device`` None lets the engine place it (ZeRO-3 loads through deepspeed.zero.Init, partitioned at load).
    ``dtype``: of the unquantized parameters (default: ``train.precision``). ``safetensors_only``: refuse pickled
    weights. Returned in train mode, or eval mode when not ``training``.

    Raises :class:`~dtune.errors.DtuneError` when the weights cannot be read (or are pickled only and refused).
    """
    from transformers import AutoModelForCausalLM

    directory = model_dir(cfg)
    if safetensors_only and not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        detail = f" (it holds pickled {', '.join(pickled[:2])}: pass --allow-pickle if you trust them)" if pickled else ""
        raise DtuneError(f"{directory}: no safetensors weights{detail}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            quantization_config=quantization_config(cfg) if quantized else None,
            dtype=dtype or DTYPES[cfg.train.precision],
            device_map=None if device is None else {"": device},
            attn_implementation=cfg.model.attn_implementation,
            use_safetensors=True if safetensors_only else None,  # None: safetensors first, pickles allowed
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as err:
        raise DtuneError(f"{directory}: cannot load the base model ({err})") from None
    pin_cpu_4bit_layout(model)
    if quantized and cfg.quant.kernel == "triton":
        log.info("quant.kernel=triton: %d NF4 layers use dtune's fused kernels", use_fused_kernels(model))
    # from_pretrained returns eval mode; training needs train mode before wrapping (see pin_cpu_4bit_layout).
    return model.train() if training else model.eval()


def freeze_as_trained(cfg: DtuneConfig, base: nn.Module, checkpointing: bool = False) -> nn.Module:
    """Freeze the base as training does, so that evaluation and generation compute what training computed: every
    parameter frozen and kept in the dtype it was loaded in (the compute dtype); for a 4-bit base under 16-bit
    autocast, the input embeddings' output cast to fp32 (:func:`_residual_in_fp32`). ``checkpointing``: also enable
    gradient checkpointing (training).

    Not PEFT's ``prepare_model_for_kbit_training``, which upcasts every non-packed parameter to fp32: 671 MB of
    Gemma-3-270M's 721 MB frozen footprint, 2 GB on Llama-3-8B. What that upcast did for the numbers is the fp32
    residual stream (bitsandbytes' layers return their input's dtype), and the hook keeps it: the loaded weights are
    16-bit values anyway, norms multiply a 16-bit weight into an fp32 stream in fp32, and autocast casts the head to
    16 bits for the matmul either way (dtune's loss then takes the logits in fp32). Measured on the default job's
    held-out set (SmolLM2, 24 rows, before training): fp32 reference 1.7984, PEFT's upcast 1.8024, this 1.8024;
    all 16-bit with a bf16 residual stream 1.7716. What PEFT's function does beyond the upcast is done here: freezing,
    and the checkpointing set-up (non-reentrant; the input-grad hook, as for a 16-bit base).
    """
    base.requires_grad_(False)
    if cfg.quant.quant_type != "none" and cfg.train.precision != "fp32":
        embeddings = base.get_input_embeddings()
        if not getattr(embeddings, "_dtune_fp32_residual", False):
            embeddings.register_forward_hook(_residual_in_fp32)
            embeddings._dtune_fp32_residual = True
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return base


def _residual_in_fp32(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the input embeddings: their output in fp32, so the residual stream is fp32 (16-bit embeddings
    hold 16-bit values: the cast is exact)."""
    return output.float()


def lora_config(cfg: DtuneConfig) -> Any:
    """PEFT's LoraConfig for ``cfg.lora`` (a causal-LM task), as training and the memory plan build it."""
    from peft import LoraConfig

    targets = list(cfg.lora.target_modules)
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )


def add_lora(cfg: DtuneConfig, base: nn.Module) -> nn.Module:
    """Freeze the base, enable checkpointing, attach LoRA.

    A 4-bit base goes through PEFT's ``prepare_model_for_kbit_training``, which also upcasts its small non-quantized
    parameters (embeddings, norms, head) to fp32. A 16-bit base (quant=none) stays in the dtype it was loaded in:
    upcasting all of it would double its memory, and under autocast every matmul would cast each weight back and
    keep that copy for backward (measured on SmolLM2-135M, 2 x 256 tokens: 2.8x the peak tensor memory).
    """
    from peft import get_peft_model

    base = freeze_as_trained(cfg, base, checkpointing=cfg.model.gradient_checkpointing)
    lora = lora_config(cfg)
    projections = layer_projections(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # adapter init depends on the seed only, not on what ran before
        try:
            model = get_peft_model(base, lora)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            raise ConfigError(f"lora.target_modules: {err}") from None
    recorded = recorded_base(cfg.model.name_or_path)
    if recorded is not None:  # the Hub id or built-in name, not this machine's cache path: the adapter loads elsewhere
        model.peft_config["default"].base_model_name_or_path, model.peft_config["default"].revision = recorded
    warn_partial_targets(cfg.lora.target_modules, projections, model.base_model.targeted_module_names, type(base).__name__)
    return model


def layer_projections(model: nn.Module) -> set[str]:
    """Names (the last part) of the linear layers inside the decoder layers: q_proj, qkv_proj, gate_up_proj, ..."""
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


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


def build_model(cfg: DtuneConfig, device: torch.device | None) -> nn.Module:
    """Base (4-bit or plain) + LoRA, in train mode, on ``device``."""
    model = add_lora(cfg, load_base(cfg, device))
    if cfg.quant.fuse_lora:
        fused = fuse_lora_layers(model)
        if fused:
            log.info("quant.fuse_lora: %d LoRA layers run inside the fused NF4 kernels", fused)
        else:  # the fused op computes plain LoRA only
            log.warning(
                "quant.fuse_lora: no layer is plain LoRA (dropout %s, DoRA or adapter bias); PEFT's path runs", cfg.lora.dropout
            )
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model: %s | trainable %s of %s parameters (%.2f%%)",
        cfg.model.name_or_path,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model
