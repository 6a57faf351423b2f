"""Preference training against SFT on the same rows, under each engine: step time and peak memory side by side.

    python kernels/bench_preference.py                       # CPU: 2 gloo ranks, SmolLM2-135M, writes the JSON
    python kernels/bench_preference.py --engines ddp,zero3,fsdp2 --ranks 1 --precision bf16 --seq 1024   # one GPU

Each engine trains the same generated pairs three ways: ``sft`` on each pair's prompt + chosen reply (a
prompt_completion row), ``dpo`` (the reference's forward at every step, the adapter switched off) and ``dpo+pre``
(train.precompute_ref: the reference's log-probabilities computed once before training). A DPO micro-batch of n pairs
is 2n rows, so per step DPO does two rows' forward and backward (and the reference's forward) where SFT does one:
the step-time ratio against SFT is the cost of the objective. Step time is the median over the steps after
``--warmup`` (tokens of the step / its tokens per second); peak memory is results.json's (CUDA
``max_memory_allocated``, or on the CPU the fullest rank's peak RSS, which includes the process's libraries).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from dtune.subproc import run_bounded

REPO = Path(__file__).resolve().parent.parent
ENGINES = ["ddp", "zero2", "zero3", "fsdp2"]
RUNS = {"sft": [], "dpo": ["train.objective=dpo"], "dpo+pre": ["train.objective=dpo", "train.precompute_ref=true"]}
WORDS = [
    "the",
    "a",
    "film",
    "story",
    "cast",
    "plot",
    "scene",
    "music",
    "actor",
    "director",
    "review",
    "critic",
    "audience",
    "ending",
    "pace",
    "tone",
]


def write_pairs(folder: Path, rows: int, prompt_words: int, reply_words: int) -> tuple[Path, Path]:
    """(pairs.jsonl, sft.jsonl): ``rows`` pairs and the same rows as prompt + chosen reply."""
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    pairs = [{"prompt": text(prompt_words), "chosen": text(reply_words), "rejected": text(reply_words)} for _ in range(rows)]
    pair_file, sft_file = folder / "pairs.jsonl", folder / "sft.jsonl"
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft_file.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs))
    return pair_file, sft_file


def run(engine: str, name: str, args: argparse.Namespace, work: Path, files: tuple[Path, Path], port: int) -> dict[str, Any]:
    out = work / f"{engine}-{name}"
    data = ["data=preference", f"data.source={files[0]}"] if name != "sft" else ["data=jsonl", f"data.source={files[1]}"]
    overrides = [
        f"model.name_or_path={args.model}",
        *data,
        "data.eval_size=8",
        f"data.max_seq_len={args.seq}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro}",
        "train.grad_accum_steps=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"train.precision={args.precision}",
        "optim.warmup_steps=1",
        "logger=none",
        "logger.progress=false",
        f"engine={engine}",
        *RUNS[name],
        f"hydra.run.dir={out}",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port", str(port)]
    code, output = run_bounded([*launch, "-m", "dtune.train", *overrides], args.timeout)
    row: dict[str, Any] = {"engine": engine, "run": name}
    if code != 0:
        return {**row, "error": output[-2000:] if code is not None else f"timed out after {args.timeout} s"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/tokens_per_s" in r]
    seconds = []
    for before, r in itertools.pairwise(steps):
        if r["step"] > args.warmup:
            seconds.append((r["train/tokens"] - before["train/tokens"]) / r["train/tokens_per_s"])
    results = json.loads((out / "results.json").read_text())
    return {
        **row,
        "step_s": statistics.median(seconds),
        "tokens_per_step": statistics.median(r["train/tokens"] - b["train/tokens"] for b, r in itertools.pairwise(steps)),
        "peak_memory_bytes": results["peak_memory"]["bytes"],
        "peak_memory_kind": results["peak_memory"]["kind"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Step seconds and peak memory per (engine, run), each with its ratio to the engine's SFT run."""
    lines = [f"{'engine':<14}{'run':<10}{'s/step':>9}{'x sft':>8}{'peak GB':>10}{'x sft':>8}{'tokens/step':>13}"]
    sft = {r["engine"]: r for r in rows if r["run"] == "sft" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['engine']:<14}{r['run']:<10}  failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        base = sft.get(r["engine"])
        time_ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        mem_ratio = f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x" if base else "-"
        lines.append(
            f"{r['engine']:<14}{r['run']:<10}{r['step_s']:>9.3f}{time_ratio:>8}{r['peak_memory_bytes'] / 1e9:>10.2f}"
            f"{mem_ratio:>8}{r['tokens_per_step']:>13.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {','.join(RUNS)}")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--reply-words", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=2, help="pairs (DPO) or rows (SFT) per micro-batch")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, help="JSON file (default kernels/results/preference-<N>cores.json)")
    args = parser.parse_args()
    out = args.out or REPO / "kernels" / "results" / f"preference-{os.cpu_count()}cores.json"
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtune-bench-pref-") as tmp:
        work = Path(tmp)
        files = write_pairs(work, args.rows, args.prompt_words, args.reply_words)
        for e, engine in enumerate(args.engines.split(",")):
            for k, name in enumerate(args.runs.split(",")):
                rows.append(run(engine, name, args, work, files, 29800 + 8 * e + k))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
