"""Records to tokenized Arrow datasets: the ``datasets.map`` that renders and tokenizes the records a split uses, in
``data.num_proc`` processes, and the counts made on the way (see dtune.data.load for the whole pipeline)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dtune.data.examples import IGNORE, DataStats, Example, TokenizedSet, trained_count
from dtune.data.formats import UnknownKeys
from dtune.data.packing import fill_ratio, pack_bins
from dtune.data.records import Records
from dtune.data.render import Renderer
from dtune.data.sources import split
from dtune.errors import DataError
from dtune.schema import DataConfig

OK, TRUNCATED, DROPPED, BAD_RECORD, BAD_RENDER, BLANK = range(6)  # status of a tokenized record
KEY_BITS = 40  # a record's key: source number << KEY_BITS | record number
TRAINED = {"input_ids": "trained", "rejected_ids": "rejected_trained"}  # token columns -> their trained masks
ROWS_PER_PROC = 2000  # fewer rows than this per process are not worth another process


class Tokenize:
    """The ``map`` function: a batch of record keys -> their tokenized columns (and a status per record). Picklable;
    the renderer is built once per process.

    With ``data.bad_rows=error`` a bad record raises DataError naming it, and first writes its message to
    ``stop_file``: the other processes find it at their next batch and stop too, so the run fails within a batch of
    the first bad record instead of after every other process finished its share (``datasets`` waits for them all).
    Keys no format reads are counted per batch, in the batch's first ``unknown`` cell (JSON: name -> [count, first
    place]); the other cells are empty."""

    def __init__(self, sources: list[Records], tokenizer: Any, cfg: DataConfig, stop_file: Path) -> None:
        self.sources, self.tokenizer, self.cfg, self.stop_file = sources, tokenizer, cfg, stop_file
        self._renderer: Renderer | None = None
        self._schema = _features(cfg).arrow_schema  # the columns' Arrow types, made once (not per batch)

    def _fail(self, err: DataError) -> None:
        with contextlib.suppress(OSError):
            self.stop_file.write_text(str(err))
        raise err

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_renderer": None}

    def __call__(self, batch: dict[str, list[Any]]) -> Any:
        """The batch's columns as an Arrow table of :func:`_features`' types (built from flat arrays: a third of the
        time ``datasets`` takes to convert lists of lists)."""
        import pyarrow as pa

        if self.stop_file.exists():  # another process met a bad record: stop with its message
            raise DataError(self.stop_file.read_text())
        if self._renderer is None:
            self._renderer = Renderer(self.tokenizer, self.cfg)
        renderer, stats = self._renderer, self._renderer.stats
        samples: dict[str, list[Example | None]] = {"input_ids": []}
        if self.cfg.format == "preference":
            samples["rejected_ids"] = []
        cols: dict[str, list[Any]] = {k: [] for k in ("prompt_len", "n_trained", "status", "error", "unknown")}
        unknown = UnknownKeys()
        for key in batch["key"]:
            records = self.sources[key >> KEY_BITS]
            example, error, status = None, "", OK
            try:
                row = records.row(key & ((1 << KEY_BITS) - 1), unknown)
            except DataError as err:
                if self.cfg.bad_rows != "skip":
                    self._fail(err)
                row, error, status = None, str(err), BAD_RECORD
            if row is None and status == OK:
                status = BLANK
            elif row is not None:
                before = (stats.truncated, stats.dropped)
                try:
                    example = renderer(row)
                except DataError as err:
                    if self.cfg.bad_rows != "skip":
                        self._fail(err)
                    error, status = str(err), BAD_RENDER
                else:
                    status = DROPPED if example is None else TRUNCATED if stats.truncated > before[0] else OK
            samples["input_ids"].append(example)
            if "rejected_ids" in samples:
                samples["rejected_ids"].append(example.rejected if example else None)
            n_trained = sum(trained_count(s) for s in (example, example.rejected if example else None) if s is not None)
            cols["prompt_len"].append(example.prompt_len if example else 0)
            cols["n_trained"].append(n_trained)
            cols["status"].append(status)
            cols["error"].append(error)
            cols["unknown"].append("")
            if self.cfg.choices:
                cols.setdefault("choice_ids", []).append(example.choice_ids if example else [])
                cols.setdefault("gold", []).append(example.gold if example else -1)
            if self.cfg.format == "kto":
                cols.setdefault("desirable", []).append(bool(example and example.desirable))
        if unknown.counts and cols["unknown"]:
            cols["unknown"][0] = json.dumps({k: [n, unknown.first[k]] for k, n in unknown.counts.items()})
        schema = self._schema
        arrays = {}
        for name, column in samples.items():
            arrays[name], arrays[TRAINED[name]] = _token_columns(column)
        for name, values in cols.items():
            arrays[name] = pa.array(values, type=schema.field(name).type)
        return pa.table([arrays[f.name] for f in schema], schema=schema)


def _token_columns(samples: list[Example | None]) -> tuple[Any, Any]:
    """(ids, trained) list arrays of ``samples`` (an empty list for None): int32 ids, and bool where the label is
    the id (labels are the ids where trained, IGNORE elsewhere)."""
    import pyarrow as pa

    lengths = np.fromiter((len(s.input_ids) if s else 0 for s in samples), dtype=np.int32, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(s.input_ids for s in samples if s), dtype=np.int32, count=total)
    labels = np.fromiter(itertools.chain.from_iterable(s.labels for s in samples if s), dtype=np.int64, count=total)
    at = pa.array(offsets)
    return pa.ListArray.from_arrays(at, pa.array(ids)), pa.ListArray.from_arrays(at, pa.array(labels != IGNORE))


def _features(cfg: DataConfig) -> Any:
    from datasets import Features, Sequence, Value

    cols = {
        "input_ids": Sequence(Value("int32")),
        "trained": Sequence(Value("bool")),
        "prompt_len": Value("int32"),
        "n_trained": Value("int32"),
        "status": Value("int8"),
        "error": Value("string"),
        "unknown": Value("string"),
    }
    if cfg.choices:
        cols |= {"choice_ids": Sequence(Sequence(Value("int32"))), "gold": Value("int32")}
    if cfg.format == "preference":
        cols |= {"rejected_ids": Sequence(Value("int32")), "rejected_trained": Sequence(Value("bool"))}
    if cfg.format == "kto":
        cols["desirable"] = Value("bool")
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


@contextlib.contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """The Rust tokenizer without its thread pool while the map runs (the processes inherit the setting): the map
    already keeps data.num_proc processes busy, and each call encodes one record's few pieces, which threads only
    slow down (measured on 2 cores: 24% more rows/s in one process, 6% in two)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _map(
    cfg: DataConfig, tokenizer: Any, sources: list[Records], todo: np.ndarray, procs: int, workdir: Path | None, stop: Path
) -> Any:
    from datasets import Dataset

    with _tokenizers_single_threaded():
        return Dataset.from_dict({"key": todo}).map(
            Tokenize(sources, tokenizer, cfg, stop),
            batched=True,
            batch_size=1000,  # the writer's batch: fewer, larger Arrow tables (a bad record still stops all within one)
            num_proc=procs if procs > 1 else None,
            remove_columns=["key"],
            features=_features(cfg),
            cache_file_name=str(workdir / "tokenized.arrow") if workdir else None,
            keep_in_memory=workdir is None,
            new_fingerprint=f"dtune-tokenize-{os.getpid()}-{time.time_ns()}",
            desc=f"data: tokenizing {len(todo)} records ({procs} process{'es' if procs > 1 else ''})",
        )


def tokenize(
    cfg: DataConfig, tokenizer: Any, workdir: Path | None, num_proc: int
) -> tuple[Any, np.ndarray, np.ndarray, DataStats]:
    """(table, training rows, held-out rows, stats). The table (a ``datasets`` Table, written to ``workdir`` as
    ``tokenized*.arrow``, or in memory when it is None) holds every record the split uses, tokenized, in file order;
    the two index arrays give the table rows of the training and held-out samples in set order, bad and dropped
    records left out. The parent process reads only the small columns (status, counts): no pass over the tokens."""
    started = time.perf_counter()
    sources, train_keys, eval_keys = _plan(cfg)
    todo = np.unique(np.concatenate([train_keys, eval_keys]))
    procs = max(1, min(num_proc, len(todo) // ROWS_PER_PROC))
    if any(s.kind == "json" for s in sources):
        procs = 1  # a .json array is held whole: one copy, not one per process (big sets: JSONL, Parquet)
    scratch = Path(tempfile.mkdtemp(prefix="dtune-tokenize-", dir=workdir))
    if workdir is not None:
        for s in sources:
            s.spill(scratch)  # the processes memory-map the JSONL indexes instead of each receiving a copy
    try:
        mapped = _map(cfg, tokenizer, sources, todo, procs, workdir, scratch / "stop")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = mapped.data
    status = np.asarray(table.table.column("status").to_numpy(zero_copy_only=False), dtype=np.int8)
    stats = DataStats(tokenize_seconds=time.perf_counter() - started, num_proc=procs)
    train_at, eval_at = np.searchsorted(todo, train_keys), np.searchsorted(todo, eval_keys)
    used = np.concatenate([train_at, eval_at])
    bad_records = np.flatnonzero(status == BAD_RECORD)  # once per record, as reading them would count
    bad_renders = used[status[used] == BAD_RENDER]  # per use, as rendering each use would count
    stats.skipped = len(bad_records) + len(bad_renders)
    if stats.skipped:
        first = int(bad_records[0]) if len(bad_records) else int(bad_renders[0])
        stats.first_bad = table.table.column("error")[first].as_py()
    stats.truncated = int(np.sum(status[used] == TRUNCATED))
    stats.dropped = int(np.sum(status[used] == DROPPED))
    stats.ignored_keys = _unknown_summary(table)
    good = np.isin(status[train_at], (OK, TRUNCATED))
    train_at = _refill_mix(cfg, train_at, train_keys >> KEY_BITS, good, stats) if cfg.mix else train_at[good]
    eval_at = eval_at[np.isin(status[eval_at], (OK, TRUNCATED))]
    for what, at in (("training", train_at), ("evaluation", eval_at)):
        if not len(at):
            raise DataError(f"data: no {what} sample is left after tokenization (all bad, or longer than data.max_seq_len?)")
    stats.train_rows, stats.eval_rows = len(train_at), len(eval_at)
    return table, train_at, eval_at, stats


def _refill_mix(cfg: DataConfig, at: np.ndarray, source: np.ndarray, good: np.ndarray, stats: DataStats) -> np.ndarray:
    """data.mix: the training samples a source lost at tokenization (bad, or dropped for length) replaced, where they
    fall in the set's order, by its own good ones repeated in set order, so that every source keeps its weight's share.
    ``at``: the training samples' table rows; ``source``: each one's source number; ``good``: which survived. What was
    replaced goes into ``stats.refilled`` (warned about by every load, a cached one too)."""
    out, notes = at.copy(), []
    for i, src in enumerate(cfg.mix):
        mine = source == i
        lost, kept = np.flatnonzero(mine & ~good), at[mine & good]
        if not len(lost):
            continue
        if not len(kept):
            raise DataError(
                f"data.mix[{i}].path: no training sample of {src.path} is left after tokenization (all bad, or longer "
                "than data.max_seq_len?)"
            )
        out[lost] = kept[np.arange(len(lost)) % len(kept)]
        notes.append(
            f"{len(lost)} of the {int(mine.sum())} training samples drawn from {src.path} were bad, blank or longer than "
            f"data.max_seq_len; repeats of its good samples take their places, keeping its share of "
            f"{src.weight / sum(m.weight for m in cfg.mix):.3g}"
        )
    stats.refilled = "\n".join(notes)
    return out


def _unknown_summary(table: Any) -> str:
    """The keys no format reads, summed over the batches in file order, as :class:`UnknownKeys` says them."""
    import pyarrow.compute as pc

    column = table.table.column("unknown")
    unknown = UnknownKeys()
    for cell in pc.filter(column, pc.not_equal(column, "")).to_pylist():
        for name, (count, where) in json.loads(cell).items():
            unknown.add(name, count, where)
    return unknown.summary()


def open_table(folder: Path) -> Any:
    """The tokenized table of a cache folder, memory-mapped (the map's files, in order)."""
    from datasets import Dataset, concatenate_datasets

    files = sorted(folder.glob("tokenized*.arrow"))
    return concatenate_datasets([Dataset.from_file(str(f)) for f in files]).data


def finish(table: Any, train_at: np.ndarray, stats: DataStats, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """Token counts into ``stats``, and with ``data.packing`` the packing of the training set (CSR, see
    :func:`~dtune.data.packing.pack_bins`)."""
    samples = TokenizedSet(table, train_at)
    lengths = samples.lengths
    stats.tokens = samples.tokens
    counts = np.asarray(table.table.column("n_trained").to_numpy(zero_copy_only=False), dtype=np.int64)
    stats.trained_tokens = int(counts[train_at].sum())
    packs = None
    if cfg.packing:
        packs = pack_bins(lengths, cfg.max_seq_len)
        stats.packed_rows = len(packs[0]) - 1
        stats.pack_fill = fill_ratio(lengths, stats.packed_rows, cfg.max_seq_len)
    return packs
