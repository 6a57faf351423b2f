"""Are the packed NF4 bytes that each layer computes with, under a sharding engine, the bytes that were loaded?

    torchrun --nproc_per_node 1 kernels/gpu/shard_check.py --engine fsdp2 --out fsdp2.json [dtune overrides ...]

bitsandbytes issue 1945 reports FSDP2 rewriting about 0.1% of the NF4 bytes of a 4-bit weight held in bf16 storage:
packed bytes read as bf16 include NaN bit patterns, and a copy that goes through floating-point arithmetic may
canonicalise them. dtune stores the packed weights in the compute dtype so that ZeRO-3 and FSDP2 can shard them, so
it must show that no path (sharding at load, all-gather before each forward, the recomputation of gradient
checkpointing, optimizer steps) changes a byte.

The check: load the base once without any engine (the reference bytes of every 4-bit layer, kept on the device),
then train ``train.max_steps`` steps through dtune's own loop (``dtune.train.run``) under ``--engine``, with a
wrapper around every 4-bit layer's forward that compares the unsharded weight it is about to use with the reference,
byte for byte, at every call. It also counts the NaN bit patterns in the reference (the bytes at risk: without
them the check would prove nothing) and writes one JSON with per-engine totals, the losses and a verdict.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def layer_key(name: str) -> str:
    """The same 4-bit layer's name in the plain model and in the PEFT/loss-wrapped one: from 'layers.<i>.' on."""
    name = name.replace(".base_layer", "")
    match = re.search(r"layers\.\d+\..*", name)
    return match.group(0) if match else name


def packed_bytes(module: torch.nn.Module) -> torch.Tensor:
    """The 4-bit weight's storage as a flat uint8 view (the packed nibbles, whatever the storage dtype)."""
    return module.weight.data.contiguous().view(torch.uint8).reshape(-1)


def is_4bit(module: torch.nn.Module) -> bool:
    """bitsandbytes' layer (or dtune's subclass of it), not PEFT's LoRA wrapper of the same class name."""
    return (
        type(module).__name__.endswith("Linear4bit")
        and not hasattr(module, "base_layer")
        and hasattr(module.weight, "quant_state")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True, choices=["ddp", "zero3", "zero3_offload", "fsdp2"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*", help="dtune config overrides (model, steps, ...)")
    args = parser.parse_args()
    # dtune's phase messages (plan, data, load, shard, steps): a time-limited GPU call then says how far a run got.
    # Where it hangs, check.py's time limit sends SIGABRT first, and PYTHONFAULTHANDLER=1 prints every stack.
    # (Periodic dumps from a watchdog thread are not safe: one crashed a run inside a torch.compile'd frame.)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.engine.startswith("zero") and not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (shm_comm) at every process-group start,
        # its build keyed to this install's paths: 35-140 s on two cores, again each time another DeepSpeed install
        # used the shared torch-extensions folder last. One rank reduces nothing, and the GPU machine's CUDA
        # accelerator has no such op: marked incompatible, DeepSpeed's comm skips it (deepspeed.comm.torch.build_shm_op).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    import dtune.train.loop
    from dtune.config import compose
    from dtune.model import load_base
    from dtune.train import run

    cfg = compose(
        ["logger=none", "train.save_adapter=false", "train.checkpoint_every=0", *args.overrides, f"engine={args.engine}"]
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    base = load_base(cfg, device)
    reference = {layer_key(n): packed_bytes(m).clone() for n, m in base.named_modules() if is_4bit(m)}
    storage = next(m for m in base.modules() if is_4bit(m)).weight.dtype
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    nan_patterns = 0
    if storage in (torch.bfloat16, torch.float16):
        nan_patterns = int(sum(torch.isnan(ref.view(storage)).sum().item() for ref in reference.values()))

    seen: dict[str, dict[str, int]] = {}

    def check(module: torch.nn.Module, _inputs: object, key: str) -> None:
        got = packed_bytes(module)
        ref = reference[key]
        entry = seen.setdefault(key, {"calls": 0, "bytes": ref.numel(), "mismatched_bytes": 0, "shape_mismatch": 0})
        entry["calls"] += 1
        if got.numel() != ref.numel():
            entry["shape_mismatch"] += 1
            return
        entry["mismatched_bytes"] = max(entry["mismatched_bytes"], int((got != ref.to(got.device)).sum().item()))

    def watch(module: torch.nn.Module, key: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*x: Any, **kw: Any) -> Any:
            check(module, x, key)
            return forward(*x, **kw)

        return watched

    real_build = dtune.train.loop.build_model

    def build_and_watch(*a: object, **k: object) -> torch.nn.Module:
        model = real_build(*a, **k)
        for name, module in model.named_modules():
            if is_4bit(module):
                # Around forward itself, not as a pre-hook: ZeRO-3 gathers parameters in hooks it registers later,
                # which run after ours; by the time forward runs, every engine has the full weight in place.
                module.forward = watch(module, layer_key(name), module.forward)
        return model

    dtune.train.loop.build_model = build_and_watch  # the name the training loop calls
    out_dir = args.out.with_suffix("")
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: an earlier one's checkpoint would be resumed
    run(cfg, out_dir)
    losses = [json.loads(x).get("train/loss") for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]

    mismatched = sum(e["mismatched_bytes"] for e in seen.values())
    total = sum(ref.numel() for ref in reference.values())
    unchecked = sorted(set(reference) - set(seen))
    report = {
        "engine": args.engine,
        "storage_dtype": str(storage).replace("torch.", ""),
        "layers": len(reference),
        "layers_checked": len(seen),
        "unchecked_layers": unchecked[:10],
        "forward_calls_checked": sum(e["calls"] for e in seen.values()),
        "packed_bytes": total,
        "nan_bit_patterns_in_reference": nan_patterns,
        "mismatched_bytes": mismatched,
        "shape_mismatches": sum(e["shape_mismatch"] for e in seen.values()),
        "worst_layers": sorted(((e["mismatched_bytes"], k) for k, e in seen.items()), reverse=True)[:5],
        "losses": losses,
    }
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    report["passed"] = mismatched == 0 and report["shape_mismatches"] == 0 and not unchecked and len(reference) > 0 and finite
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(
        f"{verdict} {args.engine}: {len(seen)}/{len(reference)} layers, {report['forward_calls_checked']} forward calls, "
        f"{mismatched} of {total:,} packed bytes changed ({nan_patterns:,} NaN patterns at risk), losses {losses}",
        flush=True,
    )
    from dtune.distributed.env import shutdown_distributed

    shutdown_distributed(exit_code=0 if report["passed"] else 1)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
