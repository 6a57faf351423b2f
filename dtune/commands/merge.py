"""``dtune merge``: base + adapter -> a standalone model directory that ``AutoModelForCausalLM`` loads.

The adapter was trained on the 4-bit base, so by default it is merged into the base *as trained*: the NF4 weights are
dequantized (transformers' ``model.dequantize``) and the LoRA product added to them, which reproduces the trained
model up to the rounding of the saved dtype (``--into original`` merges into the unquantized base weights instead:
what some tools do, slightly different from what was trained). Written as sharded safetensors with the config,
generation config and tokenizer, into a temporary directory that is checked (every shard indexed, config loads)
and then renamed into place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtune.adapters import Trained, check_compatible, load_base, locate_args, trained_parser
from dtune.checkpoint import ADAPTER_WEIGHTS, PROMPT_FORMAT
from dtune.data.render import prompt_format
from dtune.errors import DtuneError, user_errors
from dtune.fsutil import staged_dir
from dtune.lora import dora_norms_in_fp32
from dtune.model import load_tokenizer
from dtune.moe import dequantize_experts
from dtune.units import CONFIG_DTYPE, DTYPES

log = logging.getLogger(__name__)


def merge(
    trained: Trained,
    out: Path,
    dtype: str = "bf16",
    into: str = "dequantized",
    max_shard_size: str = "5GB",
    allow_pickle: bool = False,
) -> Path:
    """Write base + adapter as one model to ``out``; nothing is published unless its logits on probe rows equal
    base + adapter's within the saved dtype's tolerance.

    Raises DtuneError when ``out`` is not empty or the written model does not verify (``out`` then stays as it was).
    """
    from peft import PeftModel
    from transformers import AutoConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DtuneError(f"--out: {out} exists and is not empty (nothing was written)")
    cpu = torch.device("cpu")
    if into == "dequantized":
        base = load_base(trained, cpu, quantized=trained.cfg.quant.quant_type != "none", allow_pickle=allow_pickle)
        if getattr(base, "hf_quantizer", None) is not None:
            base = base.dequantize(dtype=torch.float32)  # NF4 -> the values training saw, exactly, in fp32
        dequantize_experts(base, torch.float32)  # NF4 experts (MoE) alike, into dense 3-D parameters
    else:
        base = load_base(trained, cpu, quantized=False, allow_pickle=allow_pickle, dtype=torch.float32)
    base = base.float()
    check_compatible(trained.adapter_dir, base)
    untied = untie_adapted_embeddings(base, trained.adapter_dir)
    tokenizer = load_tokenizer(trained.cfg)
    adapted = PeftModel.from_pretrained(base, trained.adapter_dir)
    dora_norms_in_fp32(adapted)  # (fp32 here anyway; the floor as in training)
    probes = probe_rows(tokenizer)
    reference = [logits(adapted, ids) for ids in probes]  # base + adapter in fp32: what training computed
    merged = adapted.merge_and_unload()  # LoRA added in fp32
    merged = merged.to(DTYPES[dtype])
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.dtype = CONFIG_DTYPE[dtype]
    prompt = prompt_format(trained.cfg, tokenizer)
    stop_at_end_of_turn(merged, tokenizer, prompt["end_of_turn"])

    with staged_dir(out, mode=0o755) as tmp:  # replaces the empty --out, if there is one
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        record = {"base": trained.cfg.model.name_or_path, "adapter": str(trained.adapter_dir), "into": into, "dtype": dtype}
        record.update(prompt=prompt, untied_embeddings=untied)
        (tmp / "dtune_merge.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / PROMPT_FORMAT).write_text(json.dumps(prompt, indent=2) + "\n")
        _verify(tmp)
        verify_logits(tmp, probes, reference, dtype)
    AutoConfig.from_pretrained(out)
    return out


def untie_adapted_embeddings(base: nn.Module, adapter: Path) -> bool:
    """Give the output head its own copy of the embedding when the adapter adapts either of a tied pair.

    Training adds LoRA to one of the two modules only (the head's output, or the embedding lookup), so the trained
    model has two different matrices; merging into a shared one would change both (the input embedding too). The
    config is untied so that loading does not tie them again. Returns whether it untied."""
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    names = {n for n, m in base.named_modules() if m is head or m is embed}
    if not any(f".{n}.lora_" in f".{k}" for k in adapter_tensor_names(adapter) for n in names):
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    log.info("merge: the adapter adapts the tied embedding/output head: they are saved untied")
    return True


def adapter_tensor_names(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        return [k.removeprefix("base_model.model.") for k in f.keys()]  # noqa: SIM118


PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer:",
    "def add(a, b):\n    return a + b\n",
)


def probe_rows(tokenizer: Any) -> list[torch.Tensor]:
    """A few fixed rows of text and one chat turn, [1, seq] each: the rows merged and unmerged models must agree on."""
    rows = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    turn = [{"role": "user", "content": "Name a colour."}]
    chat = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) + "Teal."
    rows.append(tokenizer(chat, add_special_tokens=False)["input_ids"])  # the template writes its own BOS
    return [torch.tensor([ids]) for ids in rows]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# Largest |merged - reference| logit difference allowed, as a fraction of the reference logits' standard deviation.
# Rounding the saved weights to bf16 moved logits by 0.07 of their spread on the tiny random test model (its logits
# are nearly flat) and less on trained models; fp16 keeps 3 more mantissa bits. A merge that changed what the model
# computes moves them by about their whole spread or more (5.4 for a LoRA on a tied head merged into the embedding).
LOGIT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}


def verify_logits(path: Path, probes: list[torch.Tensor], reference: list[torch.Tensor], dtype: str) -> float:
    """Load the written model as any user would and compare its logits with base + adapter's. Raises DtuneError when
    they differ by more than LOGIT_TOLERANCE[dtype]; returns the worst relative difference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    worst = max(
        float((logits(model, ids) - ref).abs().max() / ref.std().clamp_min(1e-6))
        for ids, ref in zip(probes, reference, strict=True)
    )
    log.info(
        "merge: merged logits within %.2e of base + adapter's (relative to their spread; limit %.0e)",
        worst,
        LOGIT_TOLERANCE[dtype],
    )
    if worst > LOGIT_TOLERANCE[dtype]:
        raise DtuneError(
            f"merge: the merged model's logits differ from base + adapter's by {worst:.3f} of their spread (limit "
            f"{LOGIT_TOLERANCE[dtype]} at {dtype}); nothing was written"
        )
    return worst


def stop_at_end_of_turn(model: nn.Module, tokenizer: Any, end_of_turn: str | None) -> None:
    """Make ``generation_config.eos_token_id`` list the template's end-of-turn token beside the tokenizer's eos, so
    that a plain ``generate`` (transformers, vLLM) stops where training taught the answer to end."""
    config = model.generation_config
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if end_of_turn:
        token = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.append(token)
        else:
            log.warning("merge: the end-of-turn marker %r is not one token; a plain generate may run past it", end_of_turn)
    config.eos_token_id = list(dict.fromkeys(ids))


def _verify(path: Path) -> None:
    """Every weight file named by the index exists, and there is at least one."""
    index = path / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    missing = [s for s in shards if not (path / s).is_file()]
    if missing or not shards:
        raise DtuneError(f"{path}: merged model incomplete (missing {missing})")


def main(argv: list[str] | None = None) -> int:
    parser = trained_parser("dtune merge", __doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to write the model (default: <run>/merged)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the saved weights (default: bf16)")
    parser.add_argument(
        "--into",
        default="dequantized",
        choices=["dequantized", "original"],
        help="base weights to add the adapter to (default: dequantized NF4, what it trained against)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    args = parser.parse_args(argv)
    with user_errors():
        trained = locate_args(args)
        out = Path(args.out) if args.out else Path(args.run) / "merged"
        path = merge(trained, out, args.dtype, args.into, args.max_shard_size, args.allow_pickle)
        print(f"merged {trained.adapter_dir} into {trained.cfg.model.name_or_path} ({args.into} weights, {args.dtype}): {path}")
    return 0
