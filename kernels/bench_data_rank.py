"""One rank of kernels/bench_data.py, launched by torchrun: ``load_data`` timed cold and warm, then training steps
drawn from ``StepSampler``, under whichever ``dtune`` is first on ``PYTHONPATH`` (the old revision's or this
checkout's). Reads its job from the JSON file named by its one argument, writes its figures to ``<out>/rank<r>.json``.

Kept apart from bench_data.py, which imports this checkout's dtune: this file imports only what both the old and
the new data path provide (``load_data``, ``StepSampler``, ``DataConfig``).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch.distributed as dist
from transformers import AutoTokenizer

import dtune
from dtune.data.batching import StepSampler
from dtune.data.load import load_data
from dtune.schema import DataConfig


class Accelerator:
    """What the data path reads of ``accelerate.Accelerator``."""

    def __init__(self, rank: int, local_rank: int) -> None:
        self.is_main_process = rank == 0
        self.is_local_main_process = local_rank == 0


class BenchEngine:
    """The attributes of ``dtune.distributed.engine.Engine`` that ``load_data`` uses, over a gloo process group."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
        self.accelerator = Accelerator(self.rank, int(os.environ["LOCAL_RANK"]))
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


def peak_rss() -> tuple[int, int]:
    """(peak RSS of this process, of the largest child it has waited for) in bytes (Linux reports KiB)."""
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_load(cfg: DataConfig, tokenizer: Any, engine: BenchEngine) -> tuple[Any, Any, Any, float, float]:
    """``load_data``'s result, wall seconds and CPU seconds (which other load on a shared machine does not inflate)."""
    engine.barrier()  # every rank starts the clock together
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    train, evals, stats = load_data(cfg, tokenizer, engine)
    return train, evals, stats, time.perf_counter() - t0, cpu_seconds() - cpu0


def draw_steps(train: Any, job: dict[str, Any], pad_id: int, engine: BenchEngine) -> dict[str, Any]:
    """``job["steps"]`` steps of this rank's micro-batches: seconds, tokens, and a digest of every tensor."""
    sampler = StepSampler(train, job["micro_batch_size"], job["grad_accum_steps"], 0, pad_id, engine.rank, engine.world_size)
    digest, tokens = hashlib.sha256(), 0
    t0 = time.perf_counter()
    for _ in range(job["steps"]):
        for batch in next(sampler):
            tokens += int(batch["attention_mask"].sum())
            for key in sorted(batch):
                digest.update(key.encode() + batch[key].numpy().tobytes())
    return {"steps_s": time.perf_counter() - t0, "step_tokens": tokens, "batches_sha256": digest.hexdigest()}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job["timeout"]))
    engine = BenchEngine()
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in job["data"].items() if k in known})
    figures: dict[str, Any] = {
        "rank": engine.rank,
        "dtune": str(Path(dtune.__file__).resolve().parent),
        "ignored_data_settings": sorted(set(job["data"]) - known),  # fields this revision's DataConfig lacks
        "rss_before_load": psutil.Process().memory_info().rss,
    }
    train, evals, stats, figures["cold_s"], figures["cold_cpu_s"] = timed_load(cfg, tokenizer, engine)
    figures["peak_rss_cold"], figures["peak_child_rss_cold"] = peak_rss()
    figures["stats"] = dataclasses.asdict(stats)
    figures["train_len"], figures["eval_len"] = len(train), len(evals)
    if job["warm"]:
        del train, evals
        gc.collect()
        train, evals, _, figures["warm_s"], figures["warm_cpu_s"] = timed_load(cfg, tokenizer, engine)
    figures.update(draw_steps(train, job, tokenizer.pad_token_id, engine))
    figures["peak_rss"], figures["peak_child_rss"] = peak_rss()
    Path(job["out"], f"rank{engine.rank}.json").write_text(json.dumps(figures, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
