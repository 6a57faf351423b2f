"""Data pipeline throughput and memory: dtune's old path beside this checkout's, on 2 ranks, in one run.

    python kernels/bench_data.py                                   # 200k and 1M rows (the old path up to 200k)
    python kernels/bench_data.py --rows 20000 --json /tmp/data.json   # a small run
    python kernels/bench_data.py --rows 1000000 --paths new --num-proc 2

What it measures. Synthetic two-turn chat rows (format ``chat``: user, assistant, user, assistant; each message
``--words`` words, 5-35 by default, drawn from a fixed list of 201 English words that are one token each; seeded, so
every machine writes the same file, reused from ``--work`` when it exists) go through ``dtune.data.load.load_data``
as a training job on one node would run it: ``--ranks`` processes launched by torchrun (gloo, ``OMP_NUM_THREADS=1``),
each with a fresh ``$DTUNE_CACHE`` per (path, rows), ``data.cache=true``, SmolLM2's tokenizer and chat template
(``dtune.assets.smollm2_tokenizer``, what the default job and the tiny test models use). The default rows (20-140
words a row, ~125 tokens with the template's system prompt; 113 MB of JSONL and a ~290 MB JSON cache per 200k rows)
are the size of those the issue measured (100 MB, a 347 MB cache); ``--words 20 140`` makes each message that
long (3x the tokens). Each rank times ``load_data`` twice: cold (the cache is empty: tokenize, write the cache, read
it) and warm (read what the cold call cached), then draws ``--steps`` optimizer steps from ``StepSampler``
(micro-batch 4, 2 accumulation steps) and hashes their tensors, so the old and new paths can be seen to hand
training the same batches.

- The old path is ``dtune`` at ``--old-rev`` (default a46ce6d: rank 0 tokenizes in one process into one JSON file
  under ``$DTUNE_CACHE/data``, the other ranks wait at a barrier, every rank parses the file), extracted with
  ``git archive`` into ``--work`` and put first on ``PYTHONPATH``; the new path is this checkout's ``dtune``.
  Each rank reports which ``dtune`` it imported, and the run fails if that is not the one asked for.
- Above ``--old-max-rows`` the old path is not run (its memory grows with the rows: 4.2 GB per rank at 200k rows on
  the 2-core machine, so ~20 GB per rank at 1M); its figures are then extrapolated linearly from the largest row
  count it ran, and marked ``*``.

Units. rows/s: training + held-out rows tokenized (``DataStats.train_rows + eval_rows``) per second of the cold
``load_data`` call, the slowest rank's (when every rank holds the data); s: wall-clock seconds; CPU s: user + system
seconds of the cold call summed over the ranks and the child processes they waited for (other load on a shared
machine stretches wall time, not this); RSS: the peak
resident set of a rank process over its whole life (imports, tokenizer, both loads, the steps;
``getrusage(RUSAGE_SELF).ru_maxrss``), and separately of the largest child process it waited for (tokenizer workers;
``RUSAGE_CHILDREN``), in GB = 10^9 bytes as the issue writes them; cache: bytes of the files under
``$DTUNE_CACHE/data`` (and, apart, under the ``datasets`` cache the ranks were given), in MB = 10^6 bytes.
The goals (issue 17): the new path at least 5x the old rows/s, and at most 1 GB peak RSS per rank process at the
largest row count. Everything is written to ``--json`` (default ``kernels/results/data-<cores>cores.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from dtune.assets import smollm2_tokenizer
from dtune.subproc import run_bounded

REPO = Path(__file__).resolve().parent.parent
RANK_SCRIPT = Path(__file__).resolve().with_name("bench_data_rank.py")
GB, MB = 1e9, 1e6
SPEEDUP_GOAL, RSS_GOAL = 5.0, 1 * GB

# Plain lowercase English words: nothing in a row needs JSON escaping; each is one token to SmolLM2's tokenizer.
VOCABULARY = """
the of and to in is was that for it with as his on be at by had not are but from or have an they which one you were
her all she there would their we him been has when who will more no if out so said what up its about into than them
can only other new some could time these two may then do first any my now such like our over man me even most made
after also did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right used take three
states himself few house use during without again place around however home small found thought went say part once
general high upon school every course does got united left number often following fact early water given public
system later hand group order point city name business form line data model train token layer weight batch memory
"""
WORDS = VOCABULARY.split()
GENERATOR = 1  # bump when the rows written for the same parameters change: the file name carries it
TURNS = ("user", "assistant", "user", "assistant")
CHUNK_ROWS = 10_000  # rows drawn at a time (part of what the seed produces): the generator stays under ~200 MB


def write_chat_rows(path: Path, rows: int, words: tuple[int, int], seed: int) -> None:
    """``rows`` JSONL chat records, each message ``words[0]``..``words[1]`` words (uniform), drawn with numpy.

    Chunk by chunk, the messages' bytes are gathered from the vocabulary (every word followed by a space) into one
    buffer; the space after each message's last word is overwritten with a marker byte (1-4: which message of its row
    it ends), then each marker is replaced with the JSON that follows that message (bytes.replace, in C): 1M rows in
    4 s. Written to a temporary name and renamed, so a file under ``path`` is always whole. The first N rows of a
    longer file (same words and seed) are the N-row file: every row count measures the same kind of rows.
    """
    pieces = json.dumps({"messages": [{"role": r, "content": "@@"} for r in TURNS]}).encode().split(b"@@")
    opening, between, closing = pieces[0], pieces[1:-1], pieces[-1] + b"\n"
    vocab = np.frombuffer("".join(w + " " for w in WORDS).encode(), dtype=np.uint8)
    length = np.array([len(w) + 1 for w in WORDS])
    start = np.cumsum(length) - length
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        for first in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - first)
            count = rng.integers(words[0], words[1] + 1, size=n * len(TURNS))  # words in each message
            word = rng.integers(0, len(WORDS), size=int(count.sum()))
            size = length[word]
            end = np.cumsum(size)  # where each word (and its space) ends in the chunk's buffer
            buf = vocab[np.repeat(start[word] - (end - size), size) + np.arange(end[-1])]
            buf[end[np.cumsum(count) - 1] - 1] = np.tile(np.arange(1, len(TURNS) + 1, dtype=np.uint8), n)
            text = buf.tobytes()
            for marker, glue in enumerate([*between, closing + opening], start=1):
                text = text.replace(bytes([marker]), glue)
            f.write(opening + text.removesuffix(opening))
    os.replace(tmp, path)


def chat_file(work: Path, rows: int, words: tuple[int, int], seed: int) -> Path:
    """The rows' JSONL file under ``work``, written on first use; its name holds every parameter of its content."""
    path = work / f"chat-{rows}rows-w{words[0]}-{words[1]}-seed{seed}-g{GENERATOR}.jsonl"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_chat_rows(path, rows, words, seed)
    return path


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def old_package(rev: str, work: Path) -> tuple[str, Path]:
    """(commit, folder holding the ``dtune`` package as it was at ``rev``), extracted once with git archive."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    root = work / f"dtune-{commit[:12]}"
    if not (root / "dtune" / "__init__.py").exists():
        staging = work / f".dtune-{commit[:12]}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        git("archive", "--output", str(staging / "dtune.tar"), commit, "dtune")
        subprocess.run(["tar", "-x", "-f", "dtune.tar"], cwd=staging, check=True)
        (staging / "dtune.tar").unlink()
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return commit, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (apparent sizes; symbolic links not followed)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.exists() else 0


def rank_job(source: Path, out: Path, tokenizer: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What each rank of kernels/bench_data_rank.py runs: the data settings and the steps to draw."""
    data = {"source": str(source), "format": "chat", "max_seq_len": args.max_seq_len, "eval_size": args.eval_size, "cache": True}
    if args.num_proc is not None:
        data["num_proc"] = args.num_proc  # a revision whose DataConfig lacks it ignores it (the rank says so)
    return {
        "data": data,
        "tokenizer": str(tokenizer),
        "warm": args.warm,
        "steps": args.steps,
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "out": str(out),
        "timeout": args.timeout,
    }


def run_path(name: str, package_root: Path, source: Path, rows: int, tokenizer: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``args.ranks`` ranks of ``load_data`` from the ``dtune`` under ``package_root``, on a fresh cache: the ranks'
    figures and a summary (see the module docstring for the units)."""
    base = args.work / "runs" / f"{name}-{rows}rows"
    shutil.rmtree(base, ignore_errors=True)
    cache, out = base / "cache", base / "ranks"
    out.mkdir(parents=True)
    cache.mkdir()
    (cache / "models").symlink_to(tokenizer.parent, target_is_directory=True)  # the built-in models' one copy
    (base / "job.json").write_text(json.dumps(rank_job(source, out, tokenizer, args), indent=1))
    env = {
        **os.environ,
        "PYTHONPATH": str(package_root),
        "DTUNE_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),  # whatever `datasets` caches is counted too, apart
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(RANK_SCRIPT), str(base / "job.json")]
    code, output = run_bounded(cmd, args.timeout, env=env, cwd=base)  # torchrun's workers: kill the whole tree
    (base / "output.log").write_text(output)
    run: dict[str, Any] = {"path": name, "rows": rows, "dtune": str(package_root / "dtune")}
    if code != 0:
        reason = f"exit status {code}" if code is not None else f"timed out after {args.timeout} s"
        return {**run, "status": "failed", "error": reason, "cause": first_error(output), "output_tail": output[-3000:]}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    imported = {r["dtune"] for r in ranks}
    if imported != {str((package_root / "dtune").resolve())}:
        raise RuntimeError(f"{name}: the ranks imported dtune from {sorted(imported)}, not from {package_root}")
    run.update(summary(ranks), cache_bytes=tree_bytes(cache / "data"), datasets_cache_bytes=tree_bytes(cache / "datasets"))
    shutil.rmtree(cache)  # GBs at 1M rows; its size is taken
    return run


def summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's figures from its ranks': rows/s and times of the slowest rank (when every rank holds the data), peak
    RSS per rank, the largest child process of any."""
    stats = ranks[0]["stats"]
    rows, cold = stats["train_rows"] + stats["eval_rows"], max(r["cold_s"] for r in ranks)
    return {
        "status": "ok",
        "rows_tokenized": rows,
        "rows_per_s": rows / cold,
        "cold_s": cold,
        "cold_cpu_s": sum(r["cold_cpu_s"] for r in ranks),
        "warm_s": max(r["warm_s"] for r in ranks) if "warm_s" in ranks[0] else None,
        "train_rows": ranks[0]["train_len"],
        "rss_before_load": ranks[0]["rss_before_load"],
        **{f"peak_rss_rank{r['rank']}": r["peak_rss"] for r in ranks},
        "peak_child_rss": max(r["peak_child_rss"] for r in ranks),
        "steps_s": ranks[0]["steps_s"],
        "batches_sha256": [r["batches_sha256"] for r in ranks],
        "ranks": ranks,
    }


def extrapolate(measured: dict[str, Any], rows: int, max_rows: int) -> dict[str, Any]:
    """The old path's figures at ``rows``, scaled linearly from a run at fewer rows: the same rows/s, times and cache
    in proportion, and of each rank's peak RSS the part above its RSS before ``load_data`` (imports, tokenizer)."""
    scale = rows / measured["rows"]
    peaks = {
        f"peak_rss_rank{r['rank']}": r["rss_before_load"] + (r["peak_rss"] - r["rss_before_load"]) * scale
        for r in measured["ranks"]
    }
    need, total = sum(peaks.values()), psutil.virtual_memory().total
    return {
        "path": "old",
        "rows": rows,
        "status": "extrapolated",
        "from_rows": measured["rows"],
        "why": (
            f"not run (--old-max-rows {max_rows:,}); extrapolated linearly from its {measured['rows']:,}-row run: "
            f"{max(peaks.values()) / GB:.1f} GB per rank, {need / GB:.1f} GB for {len(peaks)} ranks, on a machine of "
            f"{total / GB:.1f} GB"
        ),
        "rows_tokenized": measured["rows_tokenized"] * scale,
        "rows_per_s": measured["rows_per_s"],
        "cold_s": measured["cold_s"] * scale,
        "cold_cpu_s": measured["cold_cpu_s"] * scale,
        "warm_s": measured["warm_s"] * scale if measured["warm_s"] is not None else None,
        "rss_before_load": measured["rss_before_load"],
        **peaks,
        "peak_child_rss": measured["peak_child_rss"],
        "cache_bytes": measured["cache_bytes"] * scale,
        "datasets_cache_bytes": measured["datasets_cache_bytes"] * scale,
    }


def metrics(ranks: int) -> list[tuple[str, str, float, str]]:
    """Lines of the table: (label, key of a run's summary, divisor, format)."""
    return [
        ("rows tokenized", "rows_tokenized", 1, "{:,.0f}"),
        ("rows/s", "rows_per_s", 1, "{:,.0f}"),
        ("cold load_data s", "cold_s", 1, "{:,.2f}"),
        ("cold CPU s, all ranks", "cold_cpu_s", 1, "{:,.2f}"),
        ("warm load_data s", "warm_s", 1, "{:,.2f}"),
        ("RSS before load GB", "rss_before_load", GB, "{:.2f}"),
        *((f"peak RSS rank {r} GB", f"peak_rss_rank{r}", GB, "{:.2f}") for r in range(ranks)),
        ("peak child RSS GB", "peak_child_rss", GB, "{:.2f}"),
        ("cache MB", "cache_bytes", MB, "{:,.1f}"),
        ("datasets cache MB", "datasets_cache_bytes", MB, "{:,.1f}"),
        ("steps drawn s", "steps_s", 1, "{:.2f}"),
    ]


def cell(run: dict[str, Any] | None, key: str, divisor: float, fmt: str) -> str:
    if run is None:
        return "-"
    if run["status"] in ("failed", "not run"):
        return run["status"]
    value = run.get(key)
    if value is None:
        return "-"
    return fmt.format(value / divisor) + ("*" if run["status"] == "extrapolated" else "")


def ratio(new: dict[str, Any] | None, old: dict[str, Any] | None, key: str) -> float | None:
    if not new or not old or not {new["status"], old["status"]} <= {"ok", "extrapolated"}:
        return None
    a, b = new.get(key), old.get(key)
    return a / b if a is not None and b else None


def same_batches(new: dict[str, Any] | None, old: dict[str, Any] | None) -> str:
    if not new or not old or "batches_sha256" not in new or "batches_sha256" not in old:
        return "-"
    return "yes" if new["batches_sha256"] == old["batches_sha256"] else "no"


def first_error(output: str) -> str:
    """The first exception a rank printed (``[rank0]: dtune.errors.DataError: ...``): the root cause; torchrun's own
    report, which ends the output, does not say."""
    found = re.search(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b.*$", output, re.MULTILINE)
    return found.group(0) if found else (output.strip().splitlines() or ["?"])[-1]


def table(runs: dict[tuple[str, int], dict[str, Any]], row_counts: list[int], ranks: int) -> str:
    """Old and new side by side for each row count, with new/old; ``*``: extrapolated."""
    width = 12
    head = f"{'':<22}" + "".join(f"  {f' {n:,} rows ':-^{3 * width - 2}}" for n in row_counts)
    sub = f"{'':<22}" + "".join(f"{'old':>{width}}{'new':>{width}}{'new/old':>{width}}" for _ in row_counts)
    lines = [head, sub]
    for label, key, divisor, fmt in metrics(ranks):
        line = f"{label:<22}"
        for n in row_counts:
            old, new = runs.get(("old", n)), runs.get(("new", n))
            r = ratio(new, old, key)
            line += f"{cell(old, key, divisor, fmt):>{width}}{cell(new, key, divisor, fmt):>{width}}"
            line += f"{f'{r:.2f}x' if r is not None else '':>{width}}"
        lines.append(line)
    line = f"{'same batches as old':<22}"
    for n in row_counts:
        line += f"{'':>{width}}{same_batches(runs.get(('new', n)), runs.get(('old', n))):>{width}}{'':>{width}}"
    lines.append(line)
    notes = [f"* {r['rows']:,} rows, old: {r['why']}" for r in runs.values() if r["status"] == "extrapolated"]
    notes += [f"{r['rows']:,} rows, old: {r['why']}" for r in runs.values() if r["status"] == "not run"]
    notes += [
        f"{r['rows']:,} rows, {r['path']}: failed ({r['error']}): {r['cause']}" for r in runs.values() if r["status"] == "failed"
    ]
    return "\n".join(lines + notes)


def goals(runs: dict[tuple[str, int], dict[str, Any]], row_counts: list[int], ranks: int) -> dict[str, Any]:
    """Issue 17's goals: new rows/s >= 5x old's (each row count with both), new peak RSS <= 1 GB per rank at the
    largest row count the new path ran."""
    speed = []
    for n in row_counts:
        old, new = runs.get(("old", n)), runs.get(("new", n))
        r = ratio(new, old, "rows_per_s")
        if r is not None:
            speed.append({"rows": n, "speedup": r, "old_extrapolated": old["status"] == "extrapolated", "met": r >= SPEEDUP_GOAL})
    ran = [n for n in row_counts if runs.get(("new", n), {}).get("status") == "ok"]
    memory = None
    if ran:
        new = runs[("new", max(ran))]
        peak = max(new[f"peak_rss_rank{r}"] for r in range(ranks))
        memory = {"rows": max(ran), "peak_rss": peak, "peak_child_rss": new["peak_child_rss"], "met": peak <= RSS_GOAL}
    return {"speedup_goal": SPEEDUP_GOAL, "speedup": speed, "rss_goal_bytes": RSS_GOAL, "rss": memory}


def goal_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for s in result["speedup"]:
        mark = " (old extrapolated)" if s["old_extrapolated"] else ""
        lines.append(
            f"goal rows/s new >= {SPEEDUP_GOAL:.0f}x old at {s['rows']:,} rows{mark}: {s['speedup']:.2f}x, {'met' if s['met'] else 'NOT met'}"
        )
    m = result["rss"]
    if m:
        lines.append(
            f"goal peak RSS <= {RSS_GOAL / GB:.0f} GB per rank at {m['rows']:,} rows: {m['peak_rss'] / GB:.2f} GB "
            f"(its largest child process: {m['peak_child_rss'] / GB:.2f} GB), {'met' if m['met'] else 'NOT met'}"
        )
    return lines


def meta(args: argparse.Namespace, old_commit: str | None) -> dict[str, Any]:
    uncommitted = bool(git("status", "--porcelain", "--", "dtune"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GB:.1f} GB",
        "python": platform.python_version(),
        **{p: version(p) for p in ("torch", "transformers", "tokenizers", "datasets", "pyarrow")},
        "old": {"rev": args.old_rev, "commit": old_commit},
        "new": {"commit": git("rev-parse", "HEAD"), "uncommitted_dtune_changes": uncommitted},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000], help="row counts, each a file")
    parser.add_argument("--paths", nargs="+", choices=["old", "new"], default=["old", "new"])
    parser.add_argument("--old-rev", default="a46ce6d", help="git revision of the old data path")
    parser.add_argument("--old-max-rows", type=int, default=200_000, help="above it the old path is extrapolated, not run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dtune-bench-data"), help="rows, old package, runs")
    parser.add_argument("--num-proc", type=int, help="data.num_proc of the new path (default: its own)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--eval-size", type=int, default=96)
    parser.add_argument("--words", type=int, nargs=2, default=[5, 35], metavar=("MIN", "MAX"), help="words per message")
    parser.add_argument("--seed", type=int, default=0, help="of the generated rows")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps drawn after loading")
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True, help="time a second, cached load")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for each (path, rows) run")
    parser.add_argument("--json", type=Path, default=REPO / "kernels" / "results" / f"data-{os.cpu_count()}cores.json")
    args = parser.parse_args()
    args.work = args.work.resolve()
    row_counts = sorted(set(args.rows))

    old_commit, old_root = None, None
    if "old" in args.paths:
        try:
            old_commit, old_root = old_package(args.old_rev, args.work)
        except subprocess.CalledProcessError as err:
            parser.error(f"--old-rev {args.old_rev}: {' '.join(err.cmd)} failed in {REPO}: {(err.stderr or '').strip()}")
    result: dict[str, Any] = {"meta": meta(args, old_commit), "data": {}, "runs": []}
    runs = run_all(args, row_counts, old_root, result)
    result["goals"] = goals(runs, row_counts, args.ranks)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(runs, row_counts, args.ranks))
    for line in goal_lines(result["goals"]):
        print(line)
    print(f"written {args.json}")
    if any(r["status"] == "failed" for r in runs.values()):
        sys.exit(1)


def run_all(
    args: argparse.Namespace, row_counts: list[int], old_root: Path | None, result: dict[str, Any]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (path, rows) run, the old path above --old-max-rows extrapolated; ``result`` is written to --json after
    each, so that a run killed part way keeps what it measured."""
    tokenizer = smollm2_tokenizer()
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for rows in row_counts:
        source = chat_file(args.work, rows, tuple(args.words), args.seed)
        result["data"][str(rows)] = {"file": str(source), "bytes": source.stat().st_size}
        for name in args.paths:
            if name == "old" and rows > args.old_max_rows:
                measured = [r for (p, _), r in runs.items() if p == "old" and r["status"] == "ok"]
                why = f"not run above --old-max-rows {args.old_max_rows:,}, and no smaller run to extrapolate from"
                run = (
                    extrapolate(max(measured, key=lambda r: r["rows"]), rows, args.old_max_rows)
                    if measured
                    else {"path": "old", "rows": rows, "status": "not run", "why": why}
                )
            else:
                print(f"{name}: {rows:,} rows ({source.stat().st_size / MB:,.0f} MB) ...", flush=True)
                run = run_path(name, old_root if name == "old" else REPO, source, rows, tokenizer, args)
            runs[(name, rows)] = run
            print(json.dumps({k: v for k, v in run.items() if k not in ("ranks", "output_tail")}), flush=True)
            result["runs"] = list(runs.values())
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    return runs


if __name__ == "__main__":
    main()
