"""Build the trainable model: a frozen base (bitsandbytes 4-bit, or plain) with PEFT LoRA adapters.

The 4-bit base uses double quantization and stores its packed weights in the compute dtype
(``bnb_4bit_quant_storage``), so ZeRO-3 and FSDP can shard them like any other tensor of that dtype.
Adapters are ordinary PEFT LoRA layers: what we save is a standard PEFT adapter.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.assets import recorded_base, resolve_model
from dtune.data.formats import CHATML
from dtune.errors import ConfigError, DtuneError
from dtune.lora import (
    check_modules_to_save,
    check_patterns,
    dora_norms_in_fp32,
    gather_dora_layers_whole,
    init_dora_magnitudes,
    init_loftq,
    layer_projections,
    load_init_adapter,
    lora_config,
    token_rows,
    warn_partial_targets,
)
from dtune.moe import experts_in_nf4, finish_experts, is_fused_experts, quantizing_experts
from dtune.moe_peft import adopt_expert_adapters, peft_view
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
    if cfg.model.add_special_tokens:
        tok.add_tokens(list(cfg.model.add_special_tokens), special_tokens=True)
    if cfg.model.add_tokens:
        # One the vocabulary has keeps its place: re-added, it would match inside any text ('shello' -> s + hello,
        # ' hello' -> ' ' + hello), tokenizing the data unlike the base. Its row trains all the same.
        vocab = tok.get_vocab()
        tok.add_tokens([t for t in cfg.model.add_tokens if t not in vocab])
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
    compute = dtype or DTYPES[cfg.train.precision]
    experts = quantized and experts_in_nf4(cfg)
    loading = quantizing_experts(compute, cfg.quant.double_quant, cfg.quant.kernel == "triton")
    try:
        with loading if experts else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(
                directory,
                quantization_config=quantization_config(cfg) if quantized else None,
                dtype=compute,
                device_map=None if device is None else {"": device},
                attn_implementation=cfg.model.attn_implementation,
                use_safetensors=True if safetensors_only else None,  # None: safetensors first, pickles allowed
                trust_remote_code=cfg.model.trust_remote_code,
            )
    except OSError as err:
        raise DtuneError(f"{directory}: cannot load the base model ({err})") from None
    if experts and (layers := finish_experts(model)):
        log.info("quant.experts: the experts of %d MoE layers are NF4, per expert", layers)
    elif quantized and cfg.quant.quant_type == "fp4" and any(is_fused_experts(m) for m in model.modules()):
        log.warning("quant.quant_type=fp4: the MoE experts stay in %s (dtune quantizes experts to nf4 only)", compute)
    pin_cpu_4bit_layout(model)
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
        grow_vocabulary(cfg, model)
    if quantized and cfg.quant.kernel == "triton":
        log.info("quant.kernel=triton: %d NF4 layers use dtune's fused kernels", use_fused_kernels(model))
    # from_pretrained returns eval mode; training needs train mode before wrapping (see pin_cpu_4bit_layout).
    return model.train() if training else model.eval()


def trained_token_ids(cfg: DtuneConfig, tokenizer: Any | None = None) -> list[int]:
    """Vocabulary ids of ``model.add_tokens`` and ``model.add_special_tokens`` (after adding them), sorted."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    names = [*cfg.model.add_special_tokens, *cfg.model.add_tokens]
    return sorted(set(tokenizer.convert_tokens_to_ids(names)))


def grow_vocabulary(cfg: DtuneConfig, model: nn.Module) -> None:
    """Resize the embedding (and an untied head) to the tokenizer with ``model.add_tokens`` added. New rows start at
    the mean of the old ones plus noise of their covariance (transformers' ``mean_resizing``), drawn from
    ``train.seed``: the same on every rank and in every process that loads the base."""
    size = len(load_tokenizer(cfg))
    if size <= model.get_input_embeddings().weight.shape[0]:
        return  # the tokens fit in the rows the base has (padded vocabularies): nothing grows
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model.resize_token_embeddings(size, mean_resizing=True)
    log.info("model.add_tokens: vocabulary grown to %d tokens", size)


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
    # DeepSpeed runs a 16-bit model without autocast (its bf16/fp16 mode casts the whole module): an fp32 residual
    # would meet 16-bit weights in its ZeRO-3 linear. There the residual stays 16-bit, as under PEFT's upcast (which
    # DeepSpeed's cast undid).
    autocast = cfg.engine.strategy != "deepspeed"
    if cfg.quant.quant_type != "none" and cfg.train.precision != "fp32" and autocast:
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


def add_lora(cfg: DtuneConfig, base: nn.Module) -> nn.Module:
    """Freeze the base (:func:`freeze_as_trained`: every frozen parameter stays in the dtype it was loaded in, the
    residual stream in fp32), enable checkpointing, attach LoRA with the variant set-up ``cfg.lora`` asks for
    (:mod:`dtune.lora`); the trainable parameters (adapters, DoRA magnitudes, modules_to_save copies, added token
    rows) are fp32 masters.

    Raises :class:`~dtune.errors.ConfigError` naming the field when PEFT or dtune refuses the adapter settings.
    """
    from peft import get_peft_model

    base = freeze_as_trained(cfg, base, checkpointing=cfg.model.gradient_checkpointing)
    projections = layer_projections(base)
    layers = base.config.get_text_config().num_hidden_layers
    if cfg.lora.layers_to_transform and max(cfg.lora.layers_to_transform) >= layers:
        raise ConfigError(
            f"lora.layers_to_transform: {list(cfg.lora.layers_to_transform)} names layers beyond the model's {layers} "
            f"(0 to {layers - 1})"
        )
    lora = lora_config(cfg, projections)
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
        lora.trainable_token_indices = token_rows(base, trained_token_ids(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # adapter init depends on the seed only, not on what ran before
        try:
            with peft_view(base):
                model = get_peft_model(base, lora)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            if "ParamWrapper does not work with" in str(err):  # LoRA on MoE experts (3-D parameters)
                raise ConfigError(
                    f"lora: the MoE experts take plain LoRA only ({err}); set lora.dropout=0 and lora.use_dora=false, "
                    "or keep the experts out of the targets (lora=attn_only: lora.target_modules=[q_proj,k_proj,v_proj,o_proj])"
                ) from None
            raise ConfigError(f"lora.target_modules: {err}") from None
    adopt_expert_adapters(model)
    dora_norms_in_fp32(model)
    check_modules_to_save(model, cfg.lora.modules_to_save)
    check_patterns(model, cfg.lora)
    if cfg.lora.init == "loftq":
        init_loftq(model, model_dir(cfg))
    for param in model.parameters():  # adapters, DoRA magnitudes and modules_to_save copies: fp32 masters
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.lora.use_dora:
        init_dora_magnitudes(model)  # from fp32 norms: at init the adapter computes the base
    if cfg.train.init_adapter:  # into the fp32 masters: the saved fp32 values, not rounded to the base's dtype
        load_init_adapter(model, cfg.train.init_adapter)
    recorded = recorded_base(cfg.model.name_or_path)
    if recorded is not None:  # the Hub id or built-in name, not this machine's cache path: the adapter loads elsewhere
        model.peft_config["default"].base_model_name_or_path, model.peft_config["default"].revision = recorded
    warn_partial_targets(cfg.lora.target_modules, projections, model.base_model.targeted_module_names, type(base).__name__)
    return model


def build_model(cfg: DtuneConfig, device: torch.device | None) -> nn.Module:
    """Base (4-bit or plain) + LoRA, in train mode, on ``device``."""
    model = add_lora(cfg, load_base(cfg, device))
    if cfg.lora.use_dora and device is None:  # ZeRO-3 (partitioned at load)
        gather_dora_layers_whole(model)
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
