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
    if cfg.model.add_special_tokens:
        tok.add_tokens(list(cfg.model.add_special_tokens), special_tokens=True)
    if cfg.model.add_tokens:
        tok.add_tokens(list(cfg.model.add_tokens))
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
    """Freeze the base as training does, so that evaluation and generation compute what training computed: a 4-bit
    base through PEFT's ``prepare_model_for_kbit_training`` (its non-quantized parameters -- embeddings, norms, head
    -- upcast to fp32; a bf16 norm gives other losses), a 16-bit base as loaded. ``checkpointing``: also enable
    gradient checkpointing (training)."""
    from peft import prepare_model_for_kbit_training

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if cfg.quant.quant_type != "none":
        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing, **kwargs)
    base.requires_grad_(False)
    if checkpointing:
        base.gradient_checkpointing_enable(**kwargs)
        base.enable_input_require_grads()
    return base


def lora_config(cfg: DtuneConfig, projections: set[str] | None = None) -> Any:
    """PEFT's LoraConfig for ``cfg.lora`` (a causal-LM task), as training and the memory plan build it.

    ``projections``: the base's decoder linear layer names (:func:`layer_projections`), which ``all-linear`` stands
    for when ``lora.layers_to_transform`` is set (PEFT takes layer indices only with a list of names). LoftQ is
    applied after the adapters exist (:func:`init_loftq`): the config says PEFT's default init.

    Raises :class:`~dtune.errors.ConfigError` naming the field when PEFT refuses the combination.
    """
    from peft import LoraConfig

    lora = cfg.lora
    targets: str | list[str] = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
        if lora.layers_to_transform is not None:
            if projections is None:
                raise ValueError("lora_config: lora.layers_to_transform with all-linear needs the base's projections")
            targets = sorted(projections)
    init: bool | str = {"default": True, "loftq": True}.get(lora.init, lora.init)
    try:
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias=lora.bias,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            init_lora_weights=init,
            modules_to_save=list(lora.modules_to_save) or None,
            layers_to_transform=list(lora.layers_to_transform) if lora.layers_to_transform is not None else None,
            rank_pattern=dict(lora.rank_pattern),
            alpha_pattern=dict(lora.alpha_pattern),
            task_type="CAUSAL_LM",
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"lora: PEFT refuses this adapter configuration: {err}") from None


def add_lora(cfg: DtuneConfig, base: nn.Module) -> nn.Module:
    """Freeze the base, enable checkpointing, attach LoRA.

    A 4-bit base goes through PEFT's ``prepare_model_for_kbit_training``, which also upcasts its small non-quantized
    parameters (embeddings, norms, head) to fp32. A 16-bit base (quant=none) stays in the dtype it was loaded in:
    upcasting all of it would double its memory, and under autocast every matmul would cast each weight back and
    keep that copy for backward (measured on SmolLM2-135M, 2 x 256 tokens: 2.8x the peak tensor memory).
    """
    from peft import get_peft_model

    base = freeze_as_trained(cfg, base, checkpointing=cfg.model.gradient_checkpointing)
    projections = layer_projections(base)
    lora = lora_config(cfg, projections)
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
        lora.trainable_token_indices = token_rows(cfg, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # adapter init depends on the seed only, not on what ran before
        try:
            model = get_peft_model(base, lora)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            raise ConfigError(f"lora.target_modules: {err}") from None
    check_modules_to_save(model, cfg.lora.modules_to_save)
    if cfg.lora.init == "loftq":
        init_loftq(cfg, model)
    for param in model.parameters():  # adapters, DoRA magnitudes and modules_to_save copies: fp32 masters
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    recorded = recorded_base(cfg.model.name_or_path)
    if recorded is not None:  # the Hub id or built-in name, not this machine's cache path: the adapter loads elsewhere
        model.peft_config["default"].base_model_name_or_path, model.peft_config["default"].revision = recorded
    warn_partial_targets(cfg.lora.target_modules, projections, model.base_model.targeted_module_names, type(base).__name__)
    return model


def token_rows(cfg: DtuneConfig, base: nn.Module) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices`` for the added tokens: their rows of the input embedding, and of the output
    head when it is untied (a tied head follows the embedding inside PEFT), so that the model can also emit them."""
    ids = trained_token_ids(cfg)
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in base.named_modules()}
    rows = {names[id(embed)]: ids}
    if head is not None and head.weight.data_ptr() != embed.weight.data_ptr():
        rows[names[id(head)]] = ids
    return rows


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Raise ConfigError when a ``lora.modules_to_save`` entry names a 4-bit layer (its packed weight cannot train)
    or no module at all."""
    if not names:
        return
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    for name in names:
        hits = [w for w in wrapped if w == name or w.endswith(f".{name}")]
        if not hits:
            raise ConfigError(f"lora.modules_to_save: {name} names no module of {type(model.get_base_model()).__name__}")
        for hit in hits:
            module = model.get_submodule(hit).original_module
            if any(type(p).__name__ == "Params4bit" for p in module.parameters()):
                raise ConfigError(
                    f"lora.modules_to_save: {hit} is a 4-bit quantized layer, which cannot train in full; give it an "
                    "adapter (lora.target_modules) or keep it out of the quantized base"
                )


def init_loftq(cfg: DtuneConfig, model: nn.Module) -> None:
    """LoftQ (Li et al. 2023, arXiv:2310.08659) for a 4-bit base, by PEFT's ``replace_lora_weights_loftq``: each
    adapter is set to the rank-r SVD of the layer's quantization error W - dequant(Q(W)), W read from the base's
    safetensors, so base + adapter starts nearer the 16-bit model. The base is not changed: the adapter applies to
    the ordinary 4-bit base like any other.

    Raises ConfigError when this process has no CUDA device (PEFT computes on CUDA) or the base has no safetensors.
    """
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    if not torch.cuda.is_available():
        raise ConfigError("lora.init: loftq runs PEFT's LoftQ, which computes on a CUDA device; this machine has none")
    directory = model_dir(cfg)
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"lora.init: loftq reads the 16-bit weights from safetensors files; {directory} has none")
    with torch.random.fork_rng(devices=[]):
        replace_lora_weights_loftq(model, model_path=str(directory))


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


def gather_dora_layers_whole(model: nn.Module) -> None:
    """Under ZeRO-3: gather each DoRA layer's parameters, its base weight included, for the layer's whole forward.

    DoRA's forward reads the base weight again after the base layer ran (the norm of W + BA, PEFT's
    ``DoraLinearLayer.forward``), when ZeRO-3 has already released it; as a DeepSpeed "leaf" module the LoRA layer's
    parameters are gathered on entering it and released on leaving.
    """
    from deepspeed.utils import set_z3_leaf_modules

    if not torch.cuda.is_available():
        raise ConfigError(
            "lora.use_dora: under ZeRO-3 DoRA needs a GPU: on the CPU, PEFT's DoRA replaces each 4-bit layer's weight "
            "in every forward (peft.utils.integrations.dequantize_module_weight), which ZeRO-3's partitioning cannot follow"
        )
    classes = {type(m) for m in model.modules() if getattr(m, "lora_magnitude_vector", None)}
    if classes:
        set_z3_leaf_modules(model, list(classes))


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
