"""Finding and loading what a run trained, for ``dtune merge``, ``dtune generate`` and ``dtune eval``.

A *trained* thing may be named by a run directory (its ``adapter/``, else its newest checkpoint), a checkpoint
directory, or a bare PEFT adapter directory. The run's config (``config.yaml`` of a checkpoint,
``config_resolved.yaml`` of a run) says which base model and quantization it was trained with; for a bare adapter,
``--base`` or the adapter's own ``base_model_name_or_path`` (a Hub id, at the adapter's ``revision``; a built-in's
name; a directory). Before loading, the adapter's tensors are checked against the base's layers, so an adapter made
for another base fails with a message, not a shape traceback.
Pickled weights (``*.bin``) are refused unless the user asks (``--allow-pickle``): unpickling can run code.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dtune.assets import declared_base
from dtune.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINTS, PROMPT_FORMAT, checkpoints
from dtune.config import load_saved
from dtune.errors import DtuneError
from dtune.lora import dora_norms_in_fp32
from dtune.model import freeze_as_trained, load_tokenizer, pin_cpu_4bit_layout
from dtune.model import load_base as load_model_base
from dtune.moe_peft import adopt_expert_adapters, peft_view
from dtune.runtime import quiet_libraries
from dtune.schema import DtuneConfig

log = logging.getLogger(__name__)

PICKLED_ADAPTER = "adapter_model.bin"


@dataclass
class Trained:
    adapter_dir: Path
    cfg: DtuneConfig
    """The training run's config; ``cfg.model.name_or_path`` is the base."""
    source: str
    """Where the config came from (for messages)."""


def _run_config(path: Path) -> tuple[DtuneConfig, str] | None:
    for name in ("config.yaml", "config_resolved.yaml"):
        file = path / name
        if file.is_file():
            return load_saved(file), str(file)
    return None


def trained_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line that merge, generate and eval share: what to load, and how."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run", help="a run directory, checkpoint directory or adapter directory")
    parser.add_argument(
        "--base", help="base model: a directory, Hugging Face Hub id or builtin:<name> (default: the one it trained on)"
    )
    parser.add_argument("--allow-pickle", action="store_true", help="load pickled (.bin) weights; they can run code")
    return parser


def locate_args(args: argparse.Namespace) -> Trained:
    """:func:`locate` for what :func:`trained_parser` parsed; also quiets the libraries' per-load notices."""
    quiet_libraries()
    return locate(args.run, args.base, args.allow_pickle)


def locate(path: str | Path, base: str | None = None, allow_pickle: bool = False) -> Trained:
    """The adapter and training config that ``path`` names (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DtuneError(f"{path}: no such run, checkpoint or adapter directory")
    if (path / ADAPTER_CONFIG).is_file():
        adapter, config_dirs = path, [path.parent, path.parent.parent]  # <run>/adapter or <checkpoint>/adapter
    elif (path / "adapter" / ADAPTER_CONFIG).is_file():
        adapter, config_dirs = path / "adapter", [path]
    elif found := checkpoints(path / CHECKPOINTS):
        adapter, config_dirs = found[-1][1] / "adapter", [found[-1][1]]
    else:
        raise DtuneError(f"{path}: holds no adapter ({ADAPTER_CONFIG}), adapter/ folder or complete checkpoint")
    check_files(adapter, allow_pickle)
    run = next((found for d in config_dirs if (found := _run_config(d))), None)
    if run is None:
        declared = json.loads((adapter / ADAPTER_CONFIG).read_text())
        if not (base or declared.get("base_model_name_or_path")):
            raise DtuneError(f"{adapter}: no training config beside it and no base named; pass --base MODEL")
        cfg, source = DtuneConfig(), f"{adapter / ADAPTER_CONFIG}"
        # A Hub id (at the adapter's pinned revision), a built-in's name or a local directory.
        cfg.model.name_or_path = base or declared_base(str(declared["base_model_name_or_path"]), declared.get("revision"))
        settings_from_adapter(cfg, adapter)
    else:
        cfg, source = run
    if base:
        cfg.model.name_or_path = base
    return Trained(adapter, cfg, source)


def settings_from_adapter(cfg: DtuneConfig, adapter: Path) -> None:
    """For an adapter folder without its run's config: what the folder itself says about how it was trained. The
    tokens added to the vocabulary (its tokenizer's, beyond the base's: the base is grown to them and prompts keep
    them whole), a 16-bit base for an adapter whose init moved part of the base into it (PiSSA, OLoRA), and how
    prompts were rendered (``prompt_format.json``: chat template or plain text, the system prompt)."""
    if mutates_base(adapter):
        cfg.quant.quant_type = "none"
    if (adapter / PROMPT_FORMAT).is_file():  # how training rendered prompts: template or plain text, system prompt
        saved = json.loads((adapter / PROMPT_FORMAT).read_text())
        cfg.data.chat_template = bool(saved.get("chat_template", True))
        cfg.data.system_prompt = saved.get("system_prompt")
    if not (adapter / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    ours, theirs = AutoTokenizer.from_pretrained(adapter), load_tokenizer(cfg)
    known = theirs.get_added_vocab()
    added = {name: i for name, i in ours.get_added_vocab().items() if name not in known}
    special = [name for name, i in sorted(added.items(), key=lambda kv: kv[1]) if ours.added_tokens_decoder[i].special]
    cfg.model.add_special_tokens = special
    cfg.model.add_tokens = [name for name, _ in sorted(added.items(), key=lambda kv: kv[1]) if name not in special]


def check_files(adapter: Path, allow_pickle: bool) -> None:
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise DtuneError(f"{adapter}: missing {ADAPTER_CONFIG}")
    if (adapter / ADAPTER_WEIGHTS).is_file():
        return
    if (adapter / PICKLED_ADAPTER).is_file():
        if allow_pickle:
            log.warning("%s: loading pickled weights (--allow-pickle)", adapter / PICKLED_ADAPTER)
            return
        raise DtuneError(
            f"{adapter / PICKLED_ADAPTER}: pickled weights are not loaded (unpickling can run code); convert them to "
            f"{ADAPTER_WEIGHTS}, or pass --allow-pickle if you trust the file"
        )
    raise DtuneError(f"{adapter}: missing {ADAPTER_WEIGHTS}")


def check_compatible(adapter: Path, base: nn.Module) -> None:
    """Every LoRA tensor of the adapter must fit a linear layer of the base: raise DtuneError naming the first that
    does not (an adapter trained for another base)."""
    from safetensors import safe_open

    if not (adapter / ADAPTER_WEIGHTS).is_file():
        return  # pickled (allowed by the user): PEFT's own checks apply
    modules = dict(base.named_modules())
    declared = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            shape = tuple(f.get_slice(key).get_shape())
            if ".token_adapter." in key:  # rows of added tokens (model.add_tokens): PEFT checks their indices
                continue
            name, lora, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if not lora:  # a module trained in full (lora.modules_to_save): the base's parameter, whole
                name, _, kind = kind.rpartition(".")
            name = name.replace(".base_layer", "")  # a wrapped parameter (PEFT's LoRA on fused MoE experts)
            module = modules.get(name)
            if module is None:
                raise DtuneError(f"{adapter}: adapter tensor {key} has no layer '{name}' in this base (made for {declared}?)")
            if not lora:
                param = getattr(module, kind, None)
                want = tuple(param.shape) if isinstance(param, torch.Tensor) else None
            elif not hasattr(module, "in_features"):
                continue  # a 3-D expert parameter, not a linear layer: PEFT checks its shapes when loading
            elif kind.startswith("magnitude_vector"):  # DoRA: one magnitude per output feature
                want = (module.out_features,)
            else:
                want = (shape[0], module.in_features) if kind.startswith("A") else (module.out_features, shape[1])
            if shape != want:
                raise DtuneError(
                    f"{adapter}: {key} is {list(shape)} but layer '{name}' wants {list(want or [])} in this base: the "
                    f"adapter was made for another base ({declared})"
                )


def load_base(
    trained: Trained,
    device: torch.device,
    quantized: bool = True,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The base as it was trained (4-bit when ``quantized``; the run's attention and kernel settings), in eval mode,
    from safetensors unless ``allow_pickle``. See :func:`dtune.model.load_base`."""
    return load_model_base(
        trained.cfg, device, quantized=quantized, dtype=dtype, safetensors_only=not allow_pickle, training=False
    )


def mutates_base(adapter: Path) -> bool:
    """Whether the adapter's init moved part of the base weights into it (PiSSA, OLoRA): PEFT then re-derives the
    residual base when loading it, and the adapter switched off is not the base."""
    init = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda"))


def switched_off_is_not_base(adapter: Path) -> bool:
    """Whether the adapter switched off (PEFT's ``disable_adapter``) leaves another model than the base: an init that
    moved part of the base into it (:func:`mutates_base`), or trained biases (``bias`` all or lora_only: PEFT trains
    and loads the base's own bias tensors, which switching the adapter off keeps)."""
    bias = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("bias", "none")
    return mutates_base(adapter) or bias not in (None, "none")


def load_frozen_base(trained: Trained, device: torch.device, allow_pickle: bool = False) -> nn.Module:
    """The base alone, frozen as training froze it, in eval mode (its 4-bit layout pinned by :func:`load_base`)."""
    return freeze_as_trained(trained.cfg, load_base(trained, device, allow_pickle=allow_pickle)).eval()


def load_trained(trained: Trained, device: torch.device, allow_pickle: bool = False) -> nn.Module:
    """Base (4-bit, frozen as trained) + adapter, ready for inference: it computes what training did."""
    from peft import PeftModel

    base = load_frozen_base(trained, device, allow_pickle)
    check_compatible(trained.adapter_dir, base)
    with peft_view(base):  # LoRA on NF4 experts (MoE): PEFT sizes it from stand-ins of the 16-bit experts
        model = PeftModel.from_pretrained(base, trained.adapter_dir, is_trainable=False)
    adopt_expert_adapters(model)
    dora_norms_in_fp32(model)  # as training computed it
    pin_cpu_4bit_layout(model)
    return model.eval()
