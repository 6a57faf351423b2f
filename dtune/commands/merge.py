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

import torch

from dtune.adapters import Trained, check_compatible, load_base, locate_args, trained_parser
from dtune.errors import DtuneError, user_errors
from dtune.fsutil import staged_dir
from dtune.model import model_dir
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
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DtuneError(f"--out: {out} exists and is not empty (nothing was written)")
    cpu = torch.device("cpu")
    if into == "dequantized":
        base = load_base(trained, cpu, quantized=trained.cfg.quant.quant_type != "none", allow_pickle=allow_pickle)
        if getattr(base, "hf_quantizer", None) is not None:
            base = base.dequantize(dtype=torch.float32)  # NF4 -> the values training saw, exactly, in fp32
    else:
        base = load_base(trained, cpu, quantized=False, allow_pickle=allow_pickle, dtype=torch.float32)
    base = base.float()
    check_compatible(trained.adapter_dir, base)
    merged = PeftModel.from_pretrained(base, trained.adapter_dir).merge_and_unload()  # LoRA added in fp32
    merged = merged.to(DTYPES[dtype])
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.dtype = CONFIG_DTYPE[dtype]

    with staged_dir(out, mode=0o755) as tmp:  # replaces the empty --out, if there is one
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        AutoTokenizer.from_pretrained(model_dir(trained.cfg)).save_pretrained(tmp)
        (tmp / "dtune_merge.json").write_text(
            json.dumps(
                {"base": trained.cfg.model.name_or_path, "adapter": str(trained.adapter_dir), "into": into, "dtype": dtype},
                indent=2,
            )
            + "\n"
        )
        _verify(tmp)
    AutoConfig.from_pretrained(out)
    return out


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
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--into", default="dequantized", choices=["dequantized", "original"], help="which base weights")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    with user_errors():
        trained = locate_args(args)
        out = Path(args.out) if args.out else Path(args.run) / "merged"
        path = merge(trained, out, args.dtype, args.into, args.max_shard_size, args.allow_pickle)
        print(f"merged {trained.adapter_dir} into {trained.cfg.model.name_or_path} ({args.into} weights, {args.dtype}): {path}")
    return 0
