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

A record that is bad (``data.bad_rows=skip``) keeps its place in the shuffle and is left out where it falls. Only the
records the split uses are read: with ``data.train_size`` (or a mixture that samples a source down) the rest of a file
is never parsed, and its bad rows and unknown keys are not counted.
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
from dtune.data.examples import IGNORE, DataStats, TokenizedSet
from dtune.data.formats import UnknownKeys
from dtune.data.packing import fill_ratio, pack_bins
from dtune.data.records import Records
from dtune.data.render import Renderer
from dtune.data.sources import split
from dtune.errors import DataError
from dtune.fsutil import atomic_write_text
from dtune.schema import DataConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when tokenization or the cached layout changes
OK, TRUNCATED, DROPPED, BAD_RECORD, BAD_RENDER, BLANK = range(6)  # status of a tokenized record
KEY_BITS = 40  # a record's key: source number << KEY_BITS | record number
ROWS_PER_PROC = 2000  # fewer rows than this per process are not worth another process
WAIT_LOG_SECONDS = 60.0


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """Hash of everything the tokenized data depends on: the data settings (not ``num_proc``, ``streaming``), each
    source file (path, size, mtime), the tokenizer (its full JSON and chat template) and dtune's cache version."""
    h = hashlib.sha256(f"dtune-data-v{CACHE_VERSION}".encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "streaming")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for src in [cfg.source, cfg.eval_source, *(m.path for m in cfg.mix)]:
        if src and not src.startswith(BUILTIN_PREFIX) and Path(src).exists():
            files = [Path(src)] if Path(src).is_file() else sorted(p for p in Path(src).rglob("*") if p.is_file())
            for f in files:
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:24]


def default_num_proc(local_world_size: int = 1) -> int:
    """The node's cores (those this process may run on) shared by its ranks, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


class Tokenize:
    """The ``map`` function: a batch of record keys -> their tokenized columns (and a status per record). Picklable;
    the renderer is built once per process. With ``data.bad_rows=error`` a bad record raises DataError naming it."""

    def __init__(self, sources: list[Records], tokenizer: Any, cfg: DataConfig) -> None:
        self.sources, self.tokenizer, self.cfg = sources, tokenizer, cfg
        self._renderer: Renderer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_renderer": None}

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if self._renderer is None:
            self._renderer = Renderer(self.tokenizer, self.cfg)
        renderer, stats = self._renderer, self._renderer.stats
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_len": [], "status": [], "error": [], "unknown": []}
        if self.cfg.choices:
            out |= {"choice_ids": [], "gold": []}
        for key in batch["key"]:
            records = self.sources[key >> KEY_BITS]
            unknown = UnknownKeys()
            example, error, status = None, "", OK
            try:
                row = records.row(key & ((1 << KEY_BITS) - 1), unknown)
            except DataError as err:
                if self.cfg.bad_rows != "skip":
                    raise
                row, error, status = None, str(err), BAD_RECORD
            if row is None and status == OK:
                status = BLANK
            elif row is not None:
                before = (stats.truncated, stats.dropped)
                try:
                    example = renderer(row)
                except DataError as err:
                    if self.cfg.bad_rows != "skip":
                        raise
                    error, status = str(err), BAD_RENDER
                else:
                    status = DROPPED if example is None else TRUNCATED if stats.truncated > before[0] else OK
            out["input_ids"].append(example.input_ids if example else [])
            out["labels"].append(example.labels if example else [])
            out["prompt_len"].append(example.prompt_len if example else 0)
            out["status"].append(status)
            out["error"].append(error)
            out["unknown"].append(json.dumps([[k, unknown.first[k]] for k in unknown.counts]) if unknown.counts else "")
            if self.cfg.choices:
                out["choice_ids"].append(example.choice_ids if example else [])
                out["gold"].append(example.gold if example else -1)
        return out


def _features(cfg: DataConfig) -> Any:
    from datasets import Features, Sequence, Value

    cols = {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "prompt_len": Value("int32"),
        "status": Value("int8"),
        "error": Value("string"),
        "unknown": Value("string"),
    }
    if cfg.choices:
        cols |= {"choice_ids": Sequence(Sequence(Value("int32"))), "gold": Value("int32")}
    return Features(cols)


def _plan(cfg: DataConfig) -> tuple[list[Records], np.ndarray, np.ndarray]:
    """The sources and the split, over record keys: (sources, training keys, held-out keys), in set order."""
    sources: list[Records] = []

    def index(source: str, field_name: str, fmt: str) -> list[int]:
        sources.append(Records(source, field_name, fmt))
        n = len(sources) - 1
        return [(n << KEY_BITS) | i for i in range(len(sources[-1]))]

    train, evals = split(cfg, index)
    return sources, np.asarray(train, dtype=np.int64), np.asarray(evals, dtype=np.int64)


def _tokenize(cfg: DataConfig, tokenizer: Any, workdir: Path | None, num_proc: int) -> tuple[Any, Any, DataStats]:
    """(training set, held-out set, stats) as ``datasets.Dataset`` s: the training set packed into rows when
    ``data.packing`` (a ``packs`` column set aside in the stats' companion, see :func:`_build`)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    started = time.perf_counter()
    sources, train_keys, eval_keys = _plan(cfg)
    todo = np.unique(np.concatenate([train_keys, eval_keys]))
    procs = max(1, min(num_proc, len(todo) // ROWS_PER_PROC))
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each process tokenizes on one core
    mapped = Dataset.from_dict({"key": todo}).map(
        Tokenize(sources, tokenizer, cfg),
        batched=True,
        batch_size=256,
        num_proc=procs if procs > 1 else None,
        remove_columns=["key"],
        features=_features(cfg),
        cache_file_name=str(workdir / "tokenized.arrow") if workdir else None,
        keep_in_memory=workdir is None,
        new_fingerprint=f"dtune-tokenize-{os.getpid()}-{time.time_ns()}",
        desc=f"data: tokenizing {len(todo)} records ({procs} processes)",
    )
    seconds = time.perf_counter() - started
    status = np.asarray(mapped.data.table.column("status").to_numpy(zero_copy_only=False), dtype=np.int8)
    stats = DataStats(tokenize_seconds=seconds, num_proc=procs)
    train_at, eval_at = np.searchsorted(todo, train_keys), np.searchsorted(todo, eval_keys)
    bad_records = np.flatnonzero(status == BAD_RECORD)  # once per record, as reading them would count
    bad_renders = np.concatenate([train_at, eval_at])[np.isin(status[np.concatenate([train_at, eval_at])], BAD_RENDER)]
    stats.skipped = len(bad_records) + len(bad_renders)
    if stats.skipped:
        first = int(bad_records[0]) if len(bad_records) else int(bad_renders[0])
        stats.first_bad = mapped[first]["error"]
    used = np.concatenate([train_at, eval_at])
    stats.truncated = int(np.sum(status[used] == TRUNCATED))
    stats.dropped = int(np.sum(status[used] == DROPPED))
    stats.ignored_keys = _unknown_summary(mapped)
    train_at = train_at[np.isin(status[train_at], (OK, TRUNCATED))]
    eval_at = eval_at[np.isin(status[eval_at], (OK, TRUNCATED))]
    for what, at in (("training", train_at), ("evaluation", eval_at)):
        if not len(at):
            raise DataError(f"data: no {what} sample is left after tokenization (all bad, or longer than data.max_seq_len?)")
    mapped = mapped.remove_columns(["status", "error", "unknown"])
    disable_progress_bar()
    try:
        if workdir is not None:
            mapped.select(train_at).save_to_disk(str(workdir / "train"))
            mapped.select(eval_at).save_to_disk(str(workdir / "eval"))
            for f in workdir.glob("tokenized*.arrow"):
                f.unlink()
            train_ds, eval_ds = _open(workdir / "train"), _open(workdir / "eval")
        else:
            train_ds, eval_ds = mapped.select(train_at).flatten_indices(), mapped.select(eval_at).flatten_indices()
    finally:
        enable_progress_bar()
    stats.train_rows, stats.eval_rows = len(train_ds), len(eval_ds)
    return train_ds, eval_ds, stats


def _unknown_summary(mapped: Any) -> str:
    """The keys no format reads, over the records in file order, as :class:`UnknownKeys` says them."""
    import pyarrow.compute as pc

    column = mapped.data.table.column("unknown")
    unknown = UnknownKeys()
    for cell in pc.filter(column, pc.not_equal(column, "")).to_pylist():
        for name, where in json.loads(cell):
            unknown.counts[name] += 1
            unknown.first.setdefault(name, where)
    return unknown.summary()


def _open(folder: Path) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(folder))


def _finish(train_ds: Any, eval_ds: Any, stats: DataStats, cfg: DataConfig, folder: Path | None) -> DataStats:
    """Token counts, and with ``data.packing`` the packing of the training set (saved beside it in ``folder``)."""
    train = TokenizedSet(train_ds.data)
    stats.tokens = int(train.lengths.sum())
    stats.trained_tokens = int(_trained_tokens(train_ds))
    if cfg.packing:
        offsets, members = pack_bins(train.lengths, cfg.max_seq_len)
        stats.packed_rows = len(offsets) - 1
        stats.pack_fill = fill_ratio(train.lengths, stats.packed_rows, cfg.max_seq_len)
        if folder is not None:
            np.savez(folder / "packs.npz", offsets=offsets, members=members)
    return stats


def _trained_tokens(ds: Any) -> int:
    """Labels that are not IGNORE, the first of each sample excluded (it predicts nothing)."""
    import pyarrow.compute as pc

    total = 0
    for batch in ds.data.table.column("labels").chunks:
        flat = batch.flatten()
        total += int(pc.sum(pc.not_equal(flat, IGNORE)).as_py() or 0)
        firsts = pc.list_element(batch.filter(pc.greater(pc.list_value_length(batch), 0)), 0)
        total -= int(pc.sum(pc.not_equal(firsts, IGNORE)).as_py() or 0)
    return total


def _build(cfg: DataConfig, tokenizer: Any, path: Path, num_proc: int) -> None:
    """Tokenize into a private folder beside ``path`` and move it into place (atomic: readers see all or nothing;
    a second builder on another node that shares the folder finds it done and drops its own)."""
    work = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        train_ds, eval_ds, stats = _tokenize(cfg, tokenizer, work, num_proc)
        _finish(train_ds, eval_ds, stats, cfg, work)
        stats.cache_bytes = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        atomic_write_text(work / "stats.json", json.dumps(asdict(stats)))
        del train_ds, eval_ds
        try:
            work.rename(path)
        except OSError:
            if not (path / "stats.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait(path: Path, failed: Path, since: float) -> None:
    """Until the local main process has built ``path`` (or written ``failed``), logging every minute."""
    t0 = time.monotonic()
    logged = t0
    while not (path / "stats.json").exists():
        if failed.exists() and failed.stat().st_mtime >= since - 2:
            raise DataError(f"data: the local main process failed to tokenize: {failed.read_text().strip()}")
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
    return TokenizedSet(_open(path / "train").data, packs), TokenizedSet(_open(path / "eval").data), stats


def load_data(cfg: DataConfig, tokenizer: Any, engine: Any = None) -> tuple[TokenizedSet, TokenizedSet, DataStats]:
    """Training and held-out examples (sequences of :class:`~dtune.data.examples.Example`, memory-mapped) and the
    counts made on the way.

    Cached under dtune's cache (``data.cache``): on each node the local main process tokenizes with
    ``data.num_proc`` processes while the node's other ranks wait for the finished folder; then every rank
    memory-maps it. Without the cache each rank tokenizes on its own, in memory. ``engine`` (an Engine, or None for
    one process) tells the process its place on the node: ``accelerator.is_local_main_process``,
    ``local_world_size``. Raises DataError naming the file and line of a bad record (``data.bad_rows=error``) and
    when no sample is left.
    """
    local_ranks = getattr(engine, "local_world_size", 1) if engine is not None else 1
    num_proc = cfg.num_proc or default_num_proc(local_ranks)
    if not cfg.cache:
        train_ds, eval_ds, stats = _tokenize(cfg, tokenizer, None, num_proc)
        _finish(train_ds, eval_ds, stats, cfg, None)
        packs = pack_bins(TokenizedSet(train_ds.data).lengths, cfg.max_seq_len) if cfg.packing else None
        train, evals = TokenizedSet(train_ds.data, packs), TokenizedSet(eval_ds.data)
    else:
        path = cache_dir() / "data" / cache_key(cfg, tokenizer)
        failed = path.parent / f"{path.name}.failed-{socket.gethostname()}"
        # One builder per node: a multi-node job may not share the cache directory.
        builder = engine is None or engine.accelerator.is_local_main_process
        since = time.time()
        if builder and not (path / "stats.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                _build(cfg, tokenizer, path, num_proc)
            except BaseException as err:
                if engine is not None:  # the node's other ranks stop waiting, with the reason
                    atomic_write_text(failed, f"{type(err).__name__}: {err}")
                raise
            stats = DataStats(**json.loads((path / "stats.json").read_text()))
            log.info(
                "data: tokenized %d records in %.1f s (%.0f rows/s, %d processes); %.1f MB cached in %s",
                stats.train_rows + stats.eval_rows + stats.skipped + stats.dropped,
                stats.tokenize_seconds,
                (stats.train_rows + stats.eval_rows) / max(stats.tokenize_seconds, 1e-9),
                stats.num_proc,
                stats.cache_bytes / 1e6,
                path,
            )
        elif not builder:
            _wait(path, failed, since)
        train, evals, stats = _load(path, cfg)
    _report(stats, cfg)
    return train, evals, stats


def _report(stats: DataStats, cfg: DataConfig) -> None:
    if stats.skipped:
        log.warning("data: skipped %d bad rows (data.bad_rows=skip); the first: %s", stats.skipped, stats.first_bad)
    if stats.ignored_keys:
        log.warning("data: keys that data.format=%s does not read were ignored: %s", cfg.format, stats.ignored_keys)
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
        "data: %d training samples (%d tokens, %d trained on), %d held out%s",
        stats.train_rows,
        stats.tokens,
        stats.trained_tokens,
        stats.eval_rows,
        packed,
    )
