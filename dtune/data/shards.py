"""The shards of a stream (``data.streaming``): which files, in which order each epoch, and every record read from a
position on -- a byte offset in a JSONL file, a row of a Parquet file -- without reading what comes before it. Held
out for evaluation: ``data.eval_source`` if set, else the first ``data.eval_size`` rows of the first shard by name,
which no epoch trains on.

Records are numbered along the stream: every line of a JSONL shard (blank ones included) and every Parquet row,
continuing across shards and epochs; :mod:`dtune.data.stream` gives record n to rank n % world.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dtune.data.examples import Example
from dtune.data.formats import Row, UnknownKeys, row_from_obj
from dtune.data.render import Renderer, build_examples
from dtune.data.sources import BadRows, _jsonl_record, columnar, load_rows
from dtune.errors import DataError
from dtune.schema import DataConfig

SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Shard:
    """One file of the stream."""

    path: str
    kind: str
    """jsonl or parquet."""
    size: int
    """Where the file ends: bytes (JSONL) or rows (Parquet)."""
    nbytes: int
    """File size, to weigh shards in :attr:`StreamSampler.epochs_done`."""
    start: int = 0
    """Where training begins: byte offset (JSONL) or row (Parquet); past the held-out rows in the first shard."""
    start_line: int = 0
    """Records (lines or rows) before ``start``."""


@dataclass(frozen=True)
class Position:
    """Where a rank's stream goes on: before the record at ``offset`` of the ``shard``-th shard of ``epoch``'s order."""

    epoch: int = 0
    shard: int = 0
    """Index into the epoch's shard order."""
    offset: int = 0
    """Byte offset (JSONL) or row (Parquet) in that shard."""
    line: int = 0
    """Records (lines or rows) of that shard before ``offset``."""
    record: int = 0
    """Records of the stream before this position (all shards, all epochs): record n belongs to rank n % world."""


def find_shards(source: str) -> list[Shard]:
    """The shards of ``data.source``: a .jsonl or .parquet file, a folder's .jsonl and .parquet files, or a glob; sorted
    by path. Raises DataError naming data.source when there are none or one is not readable."""
    p = Path(source)
    if any(ch in source for ch in "*?["):
        paths = sorted(Path(x) for x in glob.glob(source, recursive=True) if Path(x).is_file())
    elif p.is_dir():
        paths = sorted(x for x in p.iterdir() if x.is_file() and x.suffix in SUFFIXES)
    elif p.is_file():
        paths = [p]
    else:
        raise DataError(f"data.source: data file not found: {p}")
    if not paths:
        raise DataError(f"data.source: no .jsonl or .parquet shards in {source}")
    shards = []
    for path in paths:
        if path.suffix not in SUFFIXES:
            raise DataError(f"data.source: {path}: data.streaming reads .jsonl and .parquet files")
        nbytes = path.stat().st_size
        if path.suffix == ".jsonl":
            shards.append(Shard(str(path), "jsonl", nbytes, nbytes))
            continue
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        shards.append(Shard(str(path), "parquet", rows, nbytes))
    return shards


def shard_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shards' order in ``epoch``: a function of (seed, epoch) alone."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _jsonl(shard: Shard, offset: int, line: int) -> Iterator[tuple[int, int, bytes]]:
    """(offset after, line number, raw line) from byte ``offset`` (at line ``line``) to the end."""
    with open(shard.path, "rb") as handle:
        handle.seek(offset)
        for raw in handle:
            offset += len(raw)
            line += 1
            yield offset, line, raw


def _parquet(shard: Shard, row: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Any]]:
    """(row, record or None) from ``row`` to the end; only the ``wanted`` rows are decoded into Python objects, and
    row groups before ``row`` are not read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard.path)
    except Exception as err:
        raise DataError(f"{shard.path}: not a readable Parquet file ({err})") from None
    start = 0
    for group in range(pf.num_row_groups):
        end = start + pf.metadata.row_group(group).num_rows
        if end > row:
            rows = range(max(row, start), end)
            take = [i for i in rows if wanted(i)]
            records = iter(pf.read_row_group(group).take([i - start for i in take]).to_pylist() if take else [])
            chosen = set(take)
            for i in rows:
                yield i, (next(records) if i in chosen else None)
        start = end


def scan(shards: list[Shard], seed: int, start: Position, wanted: Callable[[int], bool]) -> Iterator[tuple[Position, str, Any]]:
    """Every record of the stream from ``start`` on, epoch after epoch: (position after it, where, payload), the payload
    (a raw JSONL line or a Parquet record) only for the records whose number is ``wanted``, else None."""
    epoch, s, offset, line, record = start.epoch, start.shard, start.offset, start.line, start.record
    while True:
        order = shard_order(len(shards), seed, epoch)
        while s < len(order):
            shard = shards[order[s]]
            if shard.kind == "jsonl":
                for end, number, raw in _jsonl(shard, offset, line):
                    yield Position(epoch, s, end, number, record + 1), f"{shard.path}:{number}", raw if wanted(record) else None
                    record += 1
            else:
                first = record - offset  # the record number of row 0
                for row, obj in _parquet(shard, offset, lambda i, first=first: wanted(first + i)):
                    yield Position(epoch, s, row + 1, row + 1, first + row + 1), f"{shard.path}: row {row}", obj
                record = first + shard.size
            s += 1
            if s < len(order):
                offset, line = shards[order[s]].start, shards[order[s]].start_line
        epoch, s = epoch + 1, 0
        head = shards[shard_order(len(shards), seed, epoch)[0]]
        offset, line = head.start, head.start_line


def begin(shards: list[Shard], seed: int) -> Position:
    """The stream's first position: the first shard of epoch 0's order, past its held-out rows."""
    first = shards[shard_order(len(shards), seed, 0)[0]]
    return Position(0, 0, first.start, first.start_line, 0)


def parse(payload: Any, where: str, fmt: str, unknown: UnknownKeys) -> Row | None:
    """The Row of a record (a raw JSONL line or a Parquet record); None for a blank line. DataError naming ``where``."""
    if isinstance(payload, bytes):
        return _jsonl_record(payload, where, fmt, unknown)
    return row_from_obj(columnar(payload), where, fmt, unknown)


def head_rows(shard: Shard, count: int, fmt: str, bad: BadRows) -> tuple[list[Row], Position]:
    """The first ``count`` good rows of ``shard`` (bad ones go to ``bad``) and the position after the last record
    read; fewer rows when the shard has fewer."""
    rows: list[Row] = []
    last = Position()
    for after, where, payload in scan([shard], 0, Position(), lambda _: True):
        if after.epoch > 0 or len(rows) == count:
            break
        last = after
        try:
            row = parse(payload, where, fmt, bad.unknown)
        except DataError as err:
            bad(err)
            continue
        if row is not None:
            rows.append(row)
    return rows, last


def held_out(cfg: DataConfig, tokenizer: Any, shards: list[Shard]) -> tuple[list[Example], list[Shard], int]:
    """(held-out Examples, the shards with the held-out rows cut from the first, bad rows skipped among them):
    ``data.eval_source``, else the first ``data.eval_size`` rows of the first shard by name."""
    bad = BadRows(cfg.bad_rows)
    renderer = Renderer(tokenizer, cfg)
    if cfg.eval_source is not None:
        rows = load_rows(cfg.eval_source, "data.eval_source", cfg.format, bad)
        return build_examples(rows, renderer, "evaluation", bad), shards, bad.count
    first = shards[0]
    rows, last = head_rows(first, cfg.eval_size, cfg.format, bad)
    if len(rows) < cfg.eval_size or (len(shards) == 1 and last.offset >= first.size):
        raise DataError(
            f"data.eval_size: {cfg.eval_size} rows held out of {first.path} (the first shard, {len(rows)} good rows read) "
            "leave no row to train on or are more than it holds; hold out fewer, or give data.eval_source"
        )
    cut = replace(first, start=last.offset, start_line=last.line)
    return build_examples(rows, renderer, "evaluation", bad), [cut, *shards[1:]], bad.count
