"""Records to tokenized Arrow datasets: the ``datasets.map`` that renders and tokenizes the records a split uses, in
``data.num_proc`` processes, and the counts made on the way (see dtune.data.load for the whole pipeline)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dtune.data.examples import IGNORE, DataStats, TokenizedSet
from dtune.data.formats import UnknownKeys
from dtune.data.packing import fill_ratio, pack_bins
from dtune.data.records import Records
from dtune.data.render import Renderer
from dtune.data.sources import split
from dtune.errors import DataError
from dtune.schema import DataConfig

OK, TRUNCATED, DROPPED, BAD_RECORD, BAD_RENDER, BLANK = range(6)  # status of a tokenized record
KEY_BITS = 40  # a record's key: source number << KEY_BITS | record number
ROWS_PER_PROC = 2000  # fewer rows than this per process are not worth another process


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


def tokenize(cfg: DataConfig, tokenizer: Any, workdir: Path | None, num_proc: int) -> tuple[Any, Any, DataStats]:
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
        desc=f"data: tokenizing {len(todo)} records ({procs} process{'es' if procs > 1 else ''})",
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
            train_ds, eval_ds = open_saved(workdir / "train"), open_saved(workdir / "eval")
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


def open_saved(folder: Path) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(folder))


def finish(train_ds: Any, eval_ds: Any, stats: DataStats, cfg: DataConfig, folder: Path | None) -> DataStats:
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
