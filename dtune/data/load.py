"""Rows to training and held-out examples: split, render and tokenize in parallel into Arrow, pack; cached on disk
by a hash of everything the result depends on, built by one process per node and memory-mapped by every rank.

The pipeline. Each source is indexed (:class:`~dtune.data.records.Records`: a JSONL file by the byte range of each
line), and the train/held-out split and the mixture are drawn over record numbers (:func:`~dtune.data.sources.split`,
the same rules and order as reading the rows whole). The records the split uses are rendered and tokenized in file
order by ``data.num_proc`` processes (``datasets``' ``map``), each reading its own share of the files, and written as
Arrow; the training and held-out sets are then laid out in their order (``save_to_disk``), packed by best-fit
decreasing when ``data.packing``. Every rank of the node memory-maps the result: it holds the offsets and the
current step's samples, not the set. A rank that is not building waits for the finished folder (a file marker, not
a collective: no process-group timeout however long the build).

A record that is bad (``data.bad_rows=skip``) keeps its place in the shuffle and is left out where it falls (in a
mixture, a repeat of a good sample of its source takes its place: the weights hold). Only the records the split uses
are read: with ``data.train_size`` (or a mixture that samples a source down) the rest of a file is never parsed, and
its bad rows and unknown keys are not counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dtune.assets import BUILTIN_PREFIX, cache_dir
from dtune.data.examples import DataStats, TokenizedSet
from dtune.data.tokenize import finish, open_table, tokenize
from dtune.errors import DataError
from dtune.fsutil import atomic_write_text
from dtune.schema import DataConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 12  # bump when tokenization or the cached layout changes (12: tool-call arguments given as JSON text parsed)
WAIT_LOG_SECONDS = 60.0


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """Hash of everything the tokenized data depends on: the data settings (not ``num_proc``, ``streaming``), each
    source file (path, size, mtime), the tokenizer (its full JSON and chat template) and dtune's cache version."""
    h = hashlib.sha256(f"dtune-data-v{CACHE_VERSION}".encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "streaming")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, (size, mtime_ns) in source_stats(cfg).items():
        h.update(f"{path}:{size}:{mtime_ns}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:24]


DIGEST_WHOLE = 256 * 2**20
"""Data files up to this size are hashed whole for :func:`file_digest`; larger ones by their ends."""
DIGEST_ENDS = 8 * 2**20


def file_digest(path: Path) -> str:
    """sha256 of a file (whole up to :data:`DIGEST_WHOLE` bytes; beyond, of its first and last :data:`DIGEST_ENDS`
    bytes and its size): what tells a data file edited in place from one only touched or copied."""
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size <= DIGEST_WHOLE:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
        else:
            h.update(f.read(DIGEST_ENDS))
            f.seek(size - DIGEST_ENDS)
            h.update(f.read(DIGEST_ENDS) + str(size).encode())
    return h.hexdigest()[:32]


def source_stats(cfg: DataConfig, held_out_only: bool = False, digest: bool = False) -> dict[str, list[Any]]:
    """Each local file the data settings read -- ``source``, ``eval_source``, the mixture's paths, a folder's files
    (not hidden ones) -- as resolved path -> ``[bytes, mtime_ns]`` (``digest``: and its :func:`file_digest`);
    ``held_out_only``: the files the held-out rows come from (``eval_source`` if set, else the training sources they
    are split from). Built-in data ships with dtune: left out."""
    sources = [cfg.source, *(m.path for m in cfg.mix)]
    sources = ([cfg.eval_source] if cfg.eval_source else sources) if held_out_only else [*sources, cfg.eval_source]
    stats: dict[str, list[Any]] = {}
    for src in sources:
        if src and not src.startswith(BUILTIN_PREFIX) and Path(src).exists():
            root = Path(src)
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            for f in files:
                if f != root and any(part.startswith(".") for part in f.relative_to(root).parts):
                    continue  # a folder's .lock, .cache/, .DS_Store: not data
                st = f.stat()
                stats[str(f.resolve())] = [st.st_size, st.st_mtime_ns, *([file_digest(f)] if digest else [])]
    return stats


def check_sources(recorded: dict[str, list[Any]], now: dict[str, list[Any]], what: str, remedy: str) -> None:
    """Compare the data files a run read (``recorded``, :func:`source_stats` then) with the same files ``now``.

    Raises:
        DataError: a file's size changed (rows added, removed or edited), or, where its modification time moved, its
            content (:func:`file_digest`, when recorded): ``what`` would not read the rows the run read; the message
            names the file and ``remedy``.
    A file touched or copied (same content, new time) passes; without a recorded digest (a streamed corpus, an older
    dtune's checkpoint) it passes with a warning. Files in only one of the two are not compared (other data named
    on purpose)."""
    for path in sorted(set(recorded) & set(now)):
        (size, mtime, *digest), (size_now, mtime_now, *_) = recorded[path], now[path]
        change = None
        if size != size_now:
            change = f"changed since training ({size:,} bytes then, {size_now:,} now)"
        elif mtime != mtime_now and not digest:
            log.warning("%s: modified since training, same size (%s bytes): taken to hold the same rows", path, f"{size:,}")
        elif mtime != mtime_now and file_digest(Path(path)) != digest[0]:
            change = "edited since training (same size, other content)"
        if change:
            raise DataError(f"{path}: {change}: {what} would not read the rows the run read; {remedy}")


def default_num_proc() -> int:
    """The cores this process may run on: the node's other ranks only wait while it tokenizes (under Slurm's CPU
    binding, the cores bound to this task)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _build(cfg: DataConfig, tokenizer: Any, path: Path, num_proc: int) -> DataStats:
    """Tokenize into a private folder beside ``path`` and move it into place (atomic: readers see all or nothing;
    a second builder on another node that shares the folder finds it done and drops its own). The folder holds the
    tokenized table (``tokenized*.arrow``), the training and held-out rows (``train.npy``, ``eval.npy``), the
    packing (``packs.npz``) and the counts (``stats.json``, written last: the marker the other ranks wait for)."""
    for stale in path.parent.glob(f"{path.name}.tmp-{socket.gethostname()}-*"):  # left by a builder that was killed
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        table, train_at, eval_at, stats = tokenize(cfg, tokenizer, work, num_proc)
        packs = finish(table, train_at, stats, cfg)
        np.save(work / "train.npy", train_at)
        np.save(work / "eval.npy", eval_at)
        if packs is not None:
            np.savez(work / "packs.npz", offsets=packs[0], members=packs[1])
        stats.cache_bytes = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        atomic_write_text(work / "stats.json", json.dumps(asdict(stats)))
        records = table.num_rows  # each record the split uses, once (a mixture's repeats and refills are not records)
        del table
        try:
            work.rename(path)
        except OSError:
            if not (path / "stats.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "data: tokenized %d records in %.1f s (%.0f rows/s, %d processes); %.1f MB cached in %s",
        records,
        stats.tokenize_seconds,
        records / max(stats.tokenize_seconds, 1e-9),
        stats.num_proc,
        stats.cache_bytes / 1e6,
        path,
    )
    return stats


def launch_id() -> str:
    """What the ranks of one launch share and the next launch does not: torchrun's run id, Slurm's job and step, else
    the parent process (ranks started by hand); a failure marker names it, so a marker left by an earlier launch is
    not taken for this one's."""
    for keys in (("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"), ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")):
        if os.environ.get(keys[0]):  # restarts (torchrun --max-restarts, a requeued job) keep the run's id
            return ".".join(os.environ.get(k, "0") for k in keys)
    return f"ppid-{os.getppid()}"


def _failure(failed: Path) -> str | None:
    """The reason in this launch's failure marker, if there is one."""
    try:
        marker = json.loads(failed.read_text())
    except (OSError, ValueError):
        return None
    return marker.get("error") if isinstance(marker, dict) and marker.get("launch") == launch_id() else None


def _wait(path: Path, failed: Path) -> None:
    """Until the local main process has built ``path`` (or written this launch's ``failed``), logging every minute."""
    t0 = time.monotonic()
    logged = t0
    while not (path / "stats.json").exists():
        if failed.exists() and (reason := _failure(failed)) is not None:
            raise DataError(f"data: the local main process failed to tokenize: {reason}")
        time.sleep(0.2)
        if time.monotonic() - logged >= WAIT_LOG_SECONDS:
            logged = time.monotonic()
            log.info("data: waiting %.0f s for the local main process to tokenize into %s", logged - t0, path)


def _load(path: Path, cfg: DataConfig) -> tuple[TokenizedSet, TokenizedSet, DataStats]:
    stats = DataStats(**json.loads((path / "stats.json").read_text()))
    packs = None
    if cfg.packing:
        with np.load(path / "packs.npz") as npz:
            packs = (npz["offsets"], npz["members"])
    table = open_table(path)
    train, evals = TokenizedSet(table, np.load(path / "train.npy"), packs), TokenizedSet(table, np.load(path / "eval.npy"))
    train.folder = evals.folder = path
    return train, evals, stats


def load_data(cfg: DataConfig, tokenizer: Any, engine: Any = None) -> tuple[TokenizedSet, TokenizedSet, DataStats]:
    """Training and held-out examples (sequences of :class:`~dtune.data.examples.Example`, memory-mapped) and the
    counts made on the way.

    Cached under dtune's cache (``data.cache``): on each node the local main process tokenizes with
    ``data.num_proc`` processes while the node's other ranks wait for the finished folder; then every rank
    memory-maps it. Without the cache each rank tokenizes on its own, in memory. ``engine`` (an Engine, or None for
    one process) tells the process whether it builds for its node (``accelerator.is_local_main_process``). Raises DataError
    naming the file and line of a bad record (``data.bad_rows=error``), when no sample is left, and on the waiting
    ranks when the builder failed (with its reason).
    """
    # With the cache one process per node tokenizes while the others wait; without it every rank tokenizes.
    num_proc = cfg.num_proc or max(1, default_num_proc() // (1 if cfg.cache else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if not cfg.cache:
        table, train_at, eval_at, stats = tokenize(cfg, tokenizer, None, num_proc)
        packs = finish(table, train_at, stats, cfg)
        train, evals = TokenizedSet(table, train_at, packs), TokenizedSet(table, eval_at)
    else:
        path = cache_dir() / "data" / cache_key(cfg, tokenizer)
        failed = path.parent / f"{path.name}.failed-{socket.gethostname()}"
        # One builder per node: a multi-node job may not share the cache directory.
        builder = engine is None or engine.accelerator.is_local_main_process
        if builder and not (path / "stats.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            failed.unlink(missing_ok=True)
            try:
                stats = _build(cfg, tokenizer, path, num_proc)
            except BaseException as err:
                if engine is not None:  # the node's other ranks stop waiting, with the reason
                    try:
                        atomic_write_text(failed, json.dumps({"launch": launch_id(), "error": f"{type(err).__name__}: {err}"}))
                    except OSError:  # a full disk may refuse the marker too: the build's own error matters more
                        log.exception("data: could not write %s", failed)
                raise
        elif not builder:
            _wait(path, failed)
        train, evals, stats = _load(path, cfg)
    _report(stats, cfg)
    return train, evals, stats


def _report(stats: DataStats, cfg: DataConfig) -> None:
    if stats.skipped:
        log.warning("data: skipped %d bad rows (data.bad_rows=skip); the first: %s", stats.skipped, stats.first_bad)
    for line in stats.refilled.splitlines():
        log.warning("data.mix: %s", line)
    if stats.ignored_keys:
        fmt = "their source's format" if any(m.format for m in cfg.mix) else f"data.format={cfg.format}"
        log.warning("data: keys that %s does not read were ignored: %s", fmt, stats.ignored_keys)
    if stats.truncated or stats.dropped:
        log.warning(
            "data: %d samples truncated and %d dropped at data.max_seq_len=%d (data.overlong=%s)",
            stats.truncated,
            stats.dropped,
            cfg.max_seq_len,
            cfg.overlong,
        )
    packed = f"; packed into {stats.packed_rows} rows of {cfg.max_seq_len}, {stats.pack_fill:.1%} full" if cfg.packing else ""
    log.info(
        "data: %d training samples (%d tokens, %d trained on), %d held out, from %s%s",
        stats.train_rows,
        stats.tokens,
        stats.trained_tokens,
        stats.eval_rows,
        ", ".join(m.path for m in cfg.mix) or cfg.source,
        packed,
    )
