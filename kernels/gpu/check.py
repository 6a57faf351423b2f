"""The GPU check: every stage that proves dtune on a CUDA machine, each under its own time limit, in one command.

    bash kernels/gpu/check.sh OUT_DIR              # on the GPU machine (installs .whl/, then runs this)
    bash kernels/gpu/check.sh OUT_DIR --dry-run    # anywhere: interpreter, smoke sizes, every stage end to end

Stages, in order (a stage that fails or runs out of time does not stop the next; the whole run keeps to
``--budget`` seconds, each stage getting at most its own limit, less what the stages after it are owed when the
limits add up to more: ``stage_limit``):

    env      device, driver, every version; every dtune module imports (a missing wheel fails here)
    tests    the CUDA test subset: NF4 kernels bit-exact and matmul/GEMV/LoRA-fused vs references, the custom
             ops (opcheck), QLoRA steps through quant.kernel=bnb/triton and fuse_lora equal, packing via SDPA,
             the grouped MoE kernel, and MoE experts quantized while this transformers loads them
    shard    FSDP2 and ZeRO-3 on one rank: the packed NF4 bytes each layer computes with equal the loaded ones
             at every forward (kernels/gpu/shard_check.py), and the steps train
    nf4      kernels/bench_nf4.py at 4096->11008 and 11008->4096 (1 and 4096 tokens) and 8192->28672 (Llama 70B)
    moe      kernels/bench_moe.py: Qwen3-30B-A3B's experts (128, top-8), grouped NF4 kernel vs bf16 grouped matmul vs
             bitsandbytes' dequantize + matmul per expert, forward and input gradient, 4096 and 16384 tokens
    train    kernels/bench_train.py on a Llama-3.2-1B-shaped model: engines and kernel choices beside HF Trainer
    plan     dtune plan --validate: predicted vs max_memory_allocated on the same shapes

Writes into OUT_DIR, as it goes: ``results.json`` (everything: environment, each stage's status, figures and raw
output files, rewritten after every stage), ``tests.xml`` (JUnit) and, from check.sh, ``check.log``. Ends with
one summary table. Exit status 0 only if every stage passed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGES = [
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "submitit",
    "hydra-submitit-launcher",
    "datasets",
    "safetensors",
    "pydantic",
    "numpy",
    "pytest",
    "pytest-xdist",
    "flash-attn",
    "wandb",
]
OPTIONAL = {"pytest-xdist", "flash-attn", "wandb"}  # dtune runs without these (wandb only for logger.wandb=true)


@dataclass
class Stage:
    name: str
    limit: float  # seconds on the GPU machine
    what: str
    commands: list[list[str]]
    status: str = "not run"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    tail: str = ""
    env: dict[str, str] = field(default_factory=dict)  # added to the environment of its commands
    caps: list[float | None] = field(default_factory=list)  # per command, seconds at most (x scale); None: what is left


def run_command(cmd: list[str], timeout: float, env: dict[str, str], log: Any) -> tuple[int | None, str]:
    """Run ``cmd`` from the repository root, streaming its output into ``log``; kill its whole process tree at
    ``timeout``. Returns (exit code, or None on timeout; the whole output)."""
    from dtune.subproc import run_bounded

    print(f"$ {' '.join(cmd)}", file=log, flush=True)

    def write(line: str) -> None:
        log.write(line)
        log.flush()

    # At the limit: SIGABRT first (PYTHONFAULTHANDLER=1 makes every Python process print its threads' stacks), the
    # kill 3 s later.
    return run_bounded(cmd, timeout, env=env, cwd=REPO, on_line=write, last_words=signal.SIGABRT)


def env_stage(dry_run: bool) -> tuple[str, dict[str, Any]]:
    """Versions, device and driver; import every dtune module and the libraries the engines load lazily."""
    import torch

    from dtune.commands.doctor import package_version

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "versions": {name: package_version(name) for name in PACKAGES},
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            try:
                res = subprocess.run(
                    [smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
                )
                info["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
            except subprocess.TimeoutExpired:
                info["nvidia_smi"] = "no answer in 15 s"
    failures = {}
    import dtune

    modules = [m.name for m in pkgutil.walk_packages(dtune.__path__, "dtune.") if not m.name.rsplit(".", 1)[-1].startswith("_")]
    # What the engines and kernels import inside functions: a missing wheel shows here, not an hour into a run.
    lazy = [
        "bitsandbytes",
        "deepspeed",
        "deepspeed.utils",
        "hydra",
        "omegaconf",
        "submitit",
        "hydra_plugins.hydra_submitit_launcher",
        "datasets",
        "peft",
        "accelerate",
        "safetensors",
        "triton",
    ]
    for name in [*modules, *lazy]:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure to import is what this stage reports
            failures[name] = f"{type(err).__name__}: {err}"
    info["imports_checked"] = len(modules) + len(lazy)
    info["import_failures"] = failures
    if "wandb" in sys.modules:
        failures["wandb"] = "imported by dtune although logger.wandb is off"
    missing = [p for p, v in info["versions"].items() if v is None and p not in OPTIONAL]
    info["missing_packages"] = missing
    if not dry_run and not torch.cuda.is_available():
        failures["cuda"] = "torch sees no CUDA device"
    return ("pass" if not failures and not missing else "fail"), info


def junit_figures(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append(f"{case.get('classname')}::{case.get('name')}: {(node.get('message') or '')[:300]}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed[:30]
    return counts


def verbose_figures(output: str) -> dict[str, Any]:
    """Outcome counts from pytest -v lines ("tests/x.py::name PASSED", or "[gw0] ... PASSED tests/x.py::name")."""
    found = re.findall(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL)\b.*?(tests/\S+)|(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED)", output)
    outcome: dict[str, str] = {}
    for a, b, c, d in found:
        outcome[b or c] = a or d
    counts = {k.lower(): sum(1 for v in outcome.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {
        "tests": len(outcome),
        "passed": counts["passed"],
        "failures": counts["failed"],
        "errors": counts["error"],
        "skipped": counts["skipped"],
        "failed": [k for k, v in outcome.items() if v in ("FAILED", "ERROR")][:30],
        "partial": True,
    }


def json_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


GPU_TESTS = [
    "tests/test_kernels.py",
    "tests/test_packing.py",
    "tests/test_adapters.py::test_loftq_starts_the_4bit_model_nearer_the_16bit_one",
    "tests/test_moe_kernels.py",
    "tests/test_moe.py",  # its CPU tests: experts quantized while transformers loads (this version's loader)
]
"""The tests stage's subset (tests/test_gpu_kit.py checks that each names a test)."""
NOT_ON_GPU = [
    "tests/test_moe.py::test_moe_qlora_on_two_ranks_matches_one_rank_resumes_and_merges",  # CPU ranks: the CPU suite's
]
"""Deselected from GPU_TESTS (tests/test_gpu_kit.py checks that each names a test: a stale name deselects nothing)."""


def build_stages(args: argparse.Namespace, work: Path, py: str) -> list[Stage]:
    """The stages and their commands. Limits are seconds on the H200 (x8 with --dry-run); ``caps`` bound single
    commands so that one that hangs leaves time to the next."""
    dry = args.dry_run
    torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
    env_cmd = [py, str(Path(__file__).resolve()), str(args.out), "--env-stage", str(work / "env.json")]
    env_cmd += ["--dry-run"] if dry else []
    pytest = [py, "-m", "pytest", *GPU_TESTS, "-p", "no:cacheprovider", "-v", "-rfE", f"--junitxml={args.out / 'tests.xml'}"]
    pytest += [arg for test in NOT_ON_GPU for arg in ("--deselect", test)]
    if args.tests_k:
        pytest += ["-k", args.tests_k]
    elif dry:  # the interpreter is slow: one test of each kind; the fused layers, not a fine-tune through them
        pytest += ["-k", "bit_exact and dtype1 and storage1 and shape0 or opcheck or fused_lora_layer or packed_row"]
        pytest[-1] += " or grouped_matmul and shape0 and dtype1 or one_layer_at_a_time or pefts_lora and bnb"
    if not dry and importlib.util.find_spec("xdist"):
        pytest += ["-n", "8"]  # the first launch of every kernel config compiles: 16 cores share that
    model = "builtin:tiny-llama" if dry else "builtin:shape-llama-1b"
    build = [py, "-c", f"from dtune.assets import resolve_model; print(resolve_model({model!r}))"]
    shard_overrides = [f"model.name_or_path={model}", "train.max_steps=3", "data.train_size=16", "data.eval_size=4"]
    # bf16 storage: packed bytes read as bf16 hold NaN bit patterns, which is what the check is about.
    shard_overrides += ["train.precision=bf16"] if dry else ["train.precision=bf16", "data.max_seq_len=512"]

    def shard(engine: str, port: int) -> list[str]:
        out = str(work / f"shard-{engine}.json")
        return [*torchrun, "--master_port", str(port), "kernels/gpu/shard_check.py", "--engine", engine, "--out", out]

    # FSDP2 first (it passed on the H200 in ~35 s); then ZeRO-3, which hung there (stacks printed at its limit).
    shard_cmds = [build, [*shard("fsdp2", 29760), *shard_overrides]]
    shard_cmds += [[*shard("zero3", 29761), *shard_overrides]]
    if dry:
        nf4 = [[py, "kernels/bench_nf4.py", "--smoke", "--out", str(work / "nf4.json")]]
        moe = [py, "kernels/bench_moe.py", "--smoke", "--out", str(work / "moe.json")]
        # (FSDP2 under these versions: the shard stage; tests/test_bench.py runs the harness's engines on CPU)
        train = [py, "kernels/bench_train.py", "--smoke", "--engines", "ddp", "--kernels", "bnb,triton"]
        train += ["--out", str(work / "train.json")]
        plan = [py, "-m", "dtune", "plan", "--validate", "--grid", "gpu", "--shapes", "", "--json", str(work / "plan.json")]
    else:
        # The training shape with LoRA first (what decides quant.fuse_lora), then the 70B shape alone.
        first, *more = args.nf4_shapes.split(",")
        timing = ["--tokens", "1", "4096", "--reps", "20", "--warmup", "5"]
        nf4 = [[py, "kernels/bench_nf4.py", "--shapes", first, *timing, "--lora-ranks", "16", "--out", str(work / "nf4.json")]]
        if more:
            nf4 += [
                [py, "kernels/bench_nf4.py", "--shapes", *more, *timing, "--lora-ranks", "--out", str(work / "nf4-more.json")]
            ]
        moe = [py, "kernels/bench_moe.py", "--tokens", "4096", "16384", "--reps", "10", "--warmup", "3"]
        moe += ["--out", str(work / "moe.json")]
        train = [py, "kernels/bench_train.py", "--model", model, "--steps", "8", "--warmup", "3", "--micro", "4", "--seq", "1024"]
        train += [
            "--timeout",
            "45",
            "--engines",
            args.train_engines,
            "--kernels",
            args.train_kernels,
            "--out",
            str(work / "train.json"),
        ]
        plan = [py, "-m", "dtune", "plan", "--validate", "--grid", "gpu", "--shapes", "1b", "--json", str(work / "plan.json")]
    return [
        Stage("env", 25, "device, versions, imports", [env_cmd]),
        Stage(
            "tests",
            120,
            "CUDA test subset (kernels, custom ops, QLoRA steps bnb/triton/fuse_lora, packing)",
            [pytest],
            # Each autotune config compiles on first launch: the correctness tests try the first two (measured on
            # the H200 with all seven: 125 tests in 130 s, 64% of the stage); the nf4 stage autotunes over all.
            env={"DTUNE_NF4_AUTOTUNE_CONFIGS": "2"},
        ),
        Stage(
            "shard", 90, "FSDP2 + ZeRO-3 on one rank: packed NF4 bytes unchanged, steps train", shard_cmds, caps=[25, 45, None]
        ),
        Stage("nf4", 80, "bench_nf4: 4096x11008 @ 1/4096 tokens + LoRA r16, then 70B 8192x28672", nf4, caps=[55, None]),
        Stage(
            "moe",
            60,
            "bench_moe: Qwen3-30B-A3B experts, grouped NF4 vs bf16 grouped vs bnb per expert",
            [moe],
            env={"DTUNE_NF4_AUTOTUNE_CONFIGS": "3"},  # each config compiles on first launch: 3 x 2 kernels fit the limit
        ),
        Stage("train", 120, "bench_train: 1B-shaped QLoRA, kernel paths beside HF Trainer", [train]),
        Stage("plan", 40, "dtune plan --validate: predicted vs measured peak", [plan]),
    ]


def stage_limit(limits: list[float], index: int, left: float, budget: float) -> float:
    """Seconds the stage at ``index`` may take: its own limit, less what the stages after it are owed.

    The first stage (env: everything after it needs its answer) is owed its whole limit. When the others' limits add
    up to more than what remains of ``budget``, each is owed the same fraction of its limit, so a stage that runs to
    its limit (a hang) cannot leave the last ones nothing; a stage that ends early passes its time on. All in
    seconds; ``left``: the budget not yet spent."""
    rest = sum(limits[1:])
    fraction = min(1.0, max(0.0, budget - limits[0]) / rest) if rest > 0 else 1.0
    owed = sum(limits[index + 1 :]) * fraction
    return max(0.0, min(limits[index], left - owed))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def figures_of(stage: Stage, work: Path, output: str, out_dir: Path) -> dict[str, Any]:
    try:
        return _figures_of(stage, work, output, out_dir)
    except Exception as err:  # a malformed result file must not end the run: the next stages still go
        return {"figures_error": f"{type(err).__name__}: {err}"}


def _figures_of(stage: Stage, work: Path, output: str, out_dir: Path) -> dict[str, Any]:
    if stage.name == "env":
        return read_json(work / "env.json") or {}
    if stage.name == "tests":
        # JUnit is written at the end; a stage cut short leaves only the verbose lines to count.
        return junit_figures(out_dir / "tests.xml") or verbose_figures(output)
    if stage.name == "shard":
        return {e: read_json(work / f"shard-{e}.json") for e in ("fsdp2", "zero3")}
    if stage.name == "nf4":  # written after every shape: a stage cut short keeps the shapes it finished
        data, more = read_json(work / "nf4.json"), read_json(work / "nf4-more.json")
        return {"targets": (data or {}).get("targets"), "raw": data, "raw_more_shapes": more} if data or more else {}
    if stage.name == "moe":
        data = read_json(work / "moe.json")
        return {"rows": data["rows"], "shape": data["shape"], "grouped_bf16": data["grouped_bf16"]} if data else {}
    if stage.name == "train":
        data = read_json(work / "train.json")
        rows = data["rows"] if data else [r for r in json_lines(output) if "engine" in r]
        return {"rows": rows, "meta": data.get("meta") if data else None}
    if stage.name == "plan":  # written after every config
        data = read_json(work / "plan.json")
        rows = data["rows"] if data else []
        return {"rows": rows, "largest_deviation": max((abs(r["measured"] / r["predicted"] - 1) for r in rows), default=None)}
    return {}


def stage_passed(stage: Stage, codes: list[int | None]) -> str:
    if any(c is None for c in codes):
        return "timeout"
    if stage.name == "env" and not stage.figures:
        return "fail"
    if any(c != 0 for c in codes):
        return "fail"
    if stage.name == "tests" and (
        stage.figures.get("failures") or stage.figures.get("errors") or not stage.figures.get("passed")
    ):
        return "fail"
    if stage.name == "train" and (not stage.figures.get("rows") or any("error" in r for r in stage.figures["rows"])):
        return "fail"
    return "fail" if "figures_error" in stage.figures else "pass"


def key_figures(stage: Stage) -> str:
    f = stage.figures
    try:
        if stage.name == "env":
            return f"{f.get('device', 'cpu')}, torch {f['versions']['torch']}, triton {f['versions']['triton']}, bnb {f['versions']['bitsandbytes']}"
        if stage.name == "tests" and f:
            return f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
        if stage.name == "shard":
            return "; ".join(
                f"{e}: {r['mismatched_bytes']} of {r['packed_bytes']:,} bytes changed ({r['nan_bit_patterns_in_reference']} NaN patterns)"
                for e, r in f.items()
                if r
            )
        if stage.name == "nf4" and f.get("targets"):
            return "; ".join(str(t) for t in f["targets"])[:300]
        if stage.name == "moe" and f.get("rows"):
            return "; ".join(
                f"{r['projection']} {r['tokens']}: nf4 {r['forward_nf4_ms']:.2f} ms, bnb/nf4 {r['forward_bnb_over_nf4']:.1f}x, "
                f"nf4/bf16 {r['forward_nf4_over_bf16']:.2f}x"
                for r in f["rows"]
            )[:300]
        if stage.name == "train":
            return "; ".join(
                f"{r['engine']} {r['tokens_per_s']:,.0f} tok/s {r['peak_memory_bytes'] / 2**30:.1f} GiB"
                if "tokens_per_s" in r
                else f"{r['engine']} failed"
                for r in f["rows"]
            )
        if stage.name == "plan" and f.get("largest_deviation") is not None:
            return f"{len(f['rows'])} configs, largest deviation {f['largest_deviation']:.1%}"
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        return f"(figures incomplete: {err})"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: Triton interpreter, smoke sizes, every stage")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all stages together (GPU machine)")
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument("--tests-k", help="pytest -k expression for the tests stage (default: all of its tests)")
    parser.add_argument(
        "--nf4-shapes",
        default="4096x11008,8192x28672",
        help="the nf4 stage's KxN shapes, comma-separated (the first also with LoRA)",
    )
    parser.add_argument("--train-engines", default="ddp", help="the train stage's engines (bench_train --engines)")
    parser.add_argument(
        "--train-kernels", default="bnb,triton,triton+lora", help="the train stage's kernel paths (bench_train --kernels)"
    )
    parser.add_argument("--env-stage", type=Path, help=argparse.SUPPRESS)  # run the env stage here, write this JSON
    parser.add_argument("--limits", help="per-stage limits in seconds, e.g. tests=100,nf4=60 (default: each stage's own)")
    parser.add_argument("--scale", type=float, default=None, help="multiply every time limit (default 1; 8 with --dry-run)")
    args = parser.parse_args()
    if args.env_stage:  # in a process of its own, so that its limit holds (an import or nvidia-smi can hang)
        status, info = env_stage(args.dry_run)
        args.env_stage.write_text(json.dumps(info, indent=1, default=str) + "\n")
        print(json.dumps(info, indent=1, default=str), flush=True)
        return 0 if status == "pass" else 1
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    scale = args.scale or (8.0 if args.dry_run else 1.0)  # the interpreter on two CPU cores is that much slower
    py = sys.executable
    env = dict(os.environ)
    cache = Path(env.setdefault("DTUNE_CACHE", str(Path(tempfile.gettempdir()) / "dtune-gpu-cache")))
    tokenizer = Path(env.get("DTUNE_ASSETS", REPO / ".whl" / "assets")) / "smollm2-tokenizer"
    seeded = cache / "models" / "smollm2-tokenizer"
    if tokenizer.is_dir() and not seeded.exists():  # the built-in models are built from this tokenizer alone
        shutil.copytree(tokenizer, seeded)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
        DTUNE_CACHE=str(cache),
    )
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")
    os.environ.update(env)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT at a time limit must not write GB-sized core files
    work = Path(tempfile.mkdtemp(prefix="dtune-gpu-check-"))
    stages = build_stages(args, work, py)
    if args.only:
        wanted = set(args.only.split(",")) - {"env"}
        unknown = wanted - {s.name for s in stages}
        if unknown:
            parser.error(f"--only: unknown stages {sorted(unknown)}")
        order = ["env", *args.only.split(",")]  # in the order given: the most wanted first when time is short
        stages = sorted((s for s in stages if s.name in order), key=lambda s: order.index(s.name))
    for item in filter(None, (args.limits or "").split(",")):
        name, _, seconds = item.partition("=")
        match = [s for s in stages if s.name == name]
        if not match or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limits: expected stage=seconds with a known stage, got {item!r}")
        match[0].limit = float(seconds)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": args.dry_run}
    start = time.monotonic()
    budget = args.budget * scale

    def save() -> None:
        results["stages"] = {
            s.name: {"status": s.status, "seconds": round(s.seconds, 1), "what": s.what, "figures": s.figures, "tail": s.tail}
            for s in stages
        }
        results["elapsed_s"] = round(time.monotonic() - start, 1)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(args.out / "results.json")

    log = sys.stdout
    save()  # a call cut short before the first stage ends still returns a results.json
    limits = [s.limit * scale for s in stages]
    for index, stage in enumerate(stages):
        limit = stage_limit(limits, index, budget - (time.monotonic() - start), budget)
        print(f"\n===== stage {stage.name}: {stage.what} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        if limit < 5:
            stage.status = "skipped (budget spent)"
            save()
            continue
        if stage.name == "tests":
            (args.out / "tests.xml").unlink(missing_ok=True)  # an earlier run's would be read as this one's
        codes, output = [], ""
        for i, cmd in enumerate(stage.commands):
            remaining = limit - (time.monotonic() - t0)
            cap = stage.caps[i] if i < len(stage.caps) else None
            if cap is not None:
                remaining = min(remaining, cap * scale)
            if remaining < 2:
                codes.append(None)
                break
            code, text = run_command(cmd, remaining, {**env, **stage.env}, log)
            codes.append(code)
            output += text
        stage.figures = figures_of(stage, work, output, args.out)
        stage.tail = output[-3000:]
        stage.status = stage_passed(stage, codes)
        if stage.name == "env":
            results["env"] = stage.figures
        stage.seconds = time.monotonic() - t0
        print(f"===== stage {stage.name}: {stage.status.upper()} in {stage.seconds:.0f} s", flush=True)
        save()

    print(f"\n{'stage':<8}{'result':<10}{'seconds':>8}  key figures")
    for s in stages:
        print(f"{s.name:<8}{s.status:<10}{s.seconds:>8.0f}  {key_figures(s)}")
    print(f"total {time.monotonic() - start:.0f} s; everything in {args.out / 'results.json'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s.status == "pass" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
