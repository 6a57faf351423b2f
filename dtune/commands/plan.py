"""``dtune plan``: per-GPU peak memory of a run predicted from its config (see :mod:`dtune.plan`)."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from dtune.config import compose
from dtune.errors import ConfigError, user_errors
from dtune.plan.measure import measure, validate_plans, validation_grid
from dtune.plan.memory import fit, format_plan, gpu_memory, make_plan
from dtune.runtime import quiet_libraries
from dtune.units import parse_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dtune plan",
        description="Predict per-GPU peak memory of a dtune run from its config (no weights are loaded).",
        epilog="Overrides are those of dtune train, e.g.: dtune plan --gpu-mem 80GiB --world-size 8 engine=zero3 model.name_or_path=/models/llama-8b",
    )
    parser.add_argument(
        "--gpu-mem", help="memory of one GPU (e.g. 80GiB); default: train.gpu_mem, else this machine's GPU, if any"
    )
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

    quiet_libraries()
    with user_errors():
        if args.validate:
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
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"--world-size: must be at least 1, got {args.world_size}")
        cfg = compose(args.overrides)
        world = args.world_size or cfg.launcher.nproc_per_node * cfg.launcher.nnodes
        if args.gpu_mem:
            gpu = parse_bytes(args.gpu_mem, "--gpu-mem", default_unit="G")
        else:  # what dtune train checks against with the same overrides
            gpu = parse_bytes(cfg.train.gpu_mem, "train.gpu_mem", default_unit="G") if cfg.train.gpu_mem else gpu_memory()
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
