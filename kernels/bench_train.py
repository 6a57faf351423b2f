"""End-to-end QLoRA training throughput and memory: dtune under each engine beside HF Trainer + PEFT + bitsandbytes.

    python kernels/bench_train.py                      # 8B-shaped model, one GPU: writes kernels/results/train-<gpu>.json
    python kernels/bench_train.py --engines ddp,fsdp2 --steps 30 --micro 2 --seq 2048
    python kernels/bench_train.py --smoke              # CPU, tiny model: checks the harness runs
    python kernels/bench_train.py --engines ddp --kernels bnb,triton,triton+lora --no-hf --merge   # add rows to the JSON

Every run trains the same model (``builtin:shape-llama-8b``: Llama-3.1-8B shapes, random weights, NF4 + double
quant, LoRA r16 on all seven projections, gradient checkpointing, bf16) on the same tokens: text documents longer
than ``--seq`` tokens, truncated to exactly ``--seq`` by dtune's data pipeline (both sides train on the rows it
produces), loss on every token, ``--micro`` rows per step: every step of every run is the same work. Each configuration runs in a fresh process (one
rank, launched by torchrun for dtune); tokens/s is the median over the steps after ``--warmup``, peak memory is
``torch.cuda.max_memory_allocated``. ``--kernels`` runs each engine with bitsandbytes' matmul (``bnb``), dtune's
fused NF4 kernels (``triton``: quant=nf4_triton) and those with the LoRA path fused too (``triton+lora``). One
device command may be time-limited: ``--merge`` adds this call's rows to an existing result file (same name
replaces), ``--no-hf`` skips the baseline when it is already there. The HF baseline is ``transformers.Trainer`` with the same model, quantization,
LoRA targets, batch, optimizer (AdamW, torch) and schedule, its loss over full-vocabulary logits as HF computes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dtune.subproc import run_bounded

REPO = Path(__file__).resolve().parent.parent
ENGINES = ["ddp", "zero2", "zero3", "zero3_offload", "fsdp2"]  # those that run on one GPU (zero1 = ddp there)
KERNELS = {
    "bnb": [],
    "triton": ["quant=nf4_triton"],
    "triton+lora": ["quant=nf4_triton", "quant.fuse_lora=true"],
}


WORDS = [
    "model",
    "data",
    "train",
    "step",
    "loss",
    "token",
    "layer",
    "weight",
    "adapter",
    "rank",
    "batch",
    "memory",
    "kernel",
    "tensor",
    "grad",
]


def write_corpus(path: Path, rows: int, seq: int) -> Path:
    """``rows`` documents, each longer than ``seq`` tokens: truncated to exactly ``seq``, every row is the same work."""
    with path.open("w") as f:
        for i in range(rows):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 * seq)]
            f.write(json.dumps({"text": f"document {i}: " + " ".join(words)}) + "\n")
    return path


def dtune_overrides(args: argparse.Namespace, corpus: Path) -> list[str]:
    """The run every configuration shares: fixed-length text rows, loss on every token."""
    return [
        *(["debug=smoke"] if args.smoke else []),
        f"model.name_or_path={args.model}",
        "data=jsonl",
        f"data.source={corpus}",
        "data.format=text",
        f"data.max_seq_len={args.seq}",
        "data.overlong=truncate",
        "data.eval_size=8",
        "data.train_size=null",
        "model.gradient_checkpointing=true",  # as the HF Trainer side (the default model group turns it off)
        f"train.micro_batch_size={args.micro}",
        "train.grad_accum_steps=1",
        f"train.max_steps={args.steps}",
        "train.eval_every=0",
        "train.eval_batch_size=4",
        "train.checkpoint_every=0",
        "train.save_adapter=false",
        f"train.precision={args.precision}",
        "logger=none",
        "train.force=true",
    ]


def run_dtune(engine: str, kernel: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    name = engine if kernel == "bnb" else f"{engine}+{kernel}"
    out = workdir / f"dtune-{name}"
    corpus = workdir / "corpus.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(29700 + ENGINES.index(engine)),
    ]
    cmd += ["-m", "dtune.train", *dtune_overrides(args, corpus), f"engine={engine}", *KERNELS[kernel], f"hydra.run.dir={out}"]
    code, output = run_bounded(cmd, args.timeout)  # torchrun's worker has a session of its own: kill the tree
    if code != 0:
        return {
            "engine": name,
            "kernel": kernel,
            "error": output[-2000:] if code is not None else f"timed out after {args.timeout} s",
        }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/tokens_per_s_per_device" in r and r["step"] > args.warmup]
    results = json.loads((out / "results.json").read_text())
    return {
        "engine": name,
        "kernel": kernel,
        "tokens_per_s": statistics.median(r["train/tokens_per_s_per_device"] for r in steps),
        "peak_memory_bytes": results["peak_memory"]["bytes"],  # training steps only, like the HF side
        "peak_memory_kind": results["peak_memory"]["kind"],
        "mfu": statistics.median(r["train/mfu"] for r in steps) if steps and "train/mfu" in steps[0] else None,
    }


def run_hf(args: argparse.Namespace, corpus: Path) -> dict[str, Any]:
    """HF Trainer in this process (started fresh by the parent): same model, tokens, batch and optimizer."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dtune.config import compose
    from dtune.data import IGNORE, collate, load_data
    from dtune.lora import lora_config
    from dtune.model import DTYPES, load_tokenizer, model_dir, pin_cpu_4bit_layout, quantization_config

    cfg = compose(dtune_overrides(args, corpus))
    tokenizer = load_tokenizer(cfg)
    rows, _, _ = load_data(cfg.data, tokenizer)  # the very rows dtune trains on
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(cfg), quantization_config=quantization_config(cfg), dtype=DTYPES[cfg.train.precision], device_map={"": device}
    )
    pin_cpu_4bit_layout(model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, lora_config(cfg))  # the adapters dtune trains

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    def collator(examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = collate(examples, tokenizer.pad_token_id)
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] == IGNORE, -100)
        return batch

    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-bench-"),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=False,  # already enabled by prepare_model_for_kbit_training
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=training, train_dataset=rows, data_collator=collator, callbacks=[StepTimer()]).train()
    tokens = args.micro * args.seq
    steady = times[args.warmup :] or times
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if peak is None:
        from dtune.flops import peak_memory_bytes

        peak = peak_memory_bytes(device)[0]
    return {"engine": "hf_trainer", "tokens_per_s": tokens / statistics.median(steady), "peak_memory_bytes": peak}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:shape-llama-8b")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--kernels", default="bnb", help=f"comma-separated, of {','.join(KERNELS)}")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF Trainer baseline")
    parser.add_argument("--merge", action="store_true", help="add to (not replace) the rows of an existing result file")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, 3 steps, fp32")
    parser.add_argument("--out", help="JSON file (default kernels/results/train-<device>.json)")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)  # the corpus file: run the HF baseline here
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps, args.warmup, args.micro, args.seq, args.precision = "builtin:tiny-llama", 3, 1, 2, 64, "fp32"
    if args.hf_worker:
        print("RESULT " + json.dumps(run_hf(args, Path(args.hf_worker))), flush=True)
        return

    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"--kernels: unknown {unknown}; choose from {list(KERNELS)}")
    out = Path(args.out or REPO / "kernels" / "results" / f"train-{device_name().replace(' ', '_')}.json")
    earlier = []
    if args.merge and out.is_file():
        previous = json.loads(out.read_text())
        same = ("model", "steps", "warmup", "micro", "seq", "precision", "smoke")
        changed = [k for k in same if previous["meta"]["args"].get(k) != vars(args)[k]]
        if changed:
            parser.error(f"--merge: {out} holds runs with other {', '.join(changed)}; use the same settings or another --out")
        earlier = previous["rows"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtune-bench-") as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", args.micro * args.steps + 8, args.seq)
        for engine in args.engines.split(","):
            for kernel in kernels:
                rows.append(run_dtune(engine, kernel, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_hf:
            _, output = run_bounded([sys.executable, __file__, *sys.argv[1:], "--hf-worker", str(corpus)], args.timeout)
            line = next((x for x in output.splitlines() if x.startswith("RESULT ")), None)
            rows.append(json.loads(line[7:]) if line else {"engine": "hf_trainer", "error": output[-2000:]})
    new = {r["engine"] for r in rows}
    rows = [r for r in earlier if r["engine"] not in new] + rows
    hf = next((r for r in rows if r["engine"] == "hf_trainer"), {})
    print(f"\n{'configuration':<20}{'tokens/s':>12}{'vs HF':>8}{'peak GiB':>10}{'vs HF':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<20}  failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        speed = r["tokens_per_s"] / hf["tokens_per_s"] if "tokens_per_s" in hf else float("nan")
        memory = r["peak_memory_bytes"] / hf["peak_memory_bytes"] if "peak_memory_bytes" in hf else float("nan")
        print(f"{r['engine']:<20}{r['tokens_per_s']:>12,.0f}{speed:>7.2f}x{r['peak_memory_bytes'] / 2**30:>10.2f}{memory:>7.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "args": {k: v for k, v in vars(args).items() if k != "hf_worker"},
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
