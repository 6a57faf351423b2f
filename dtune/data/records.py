"""Records of a data source fetched by number, in any process: what the tokenizing processes read.

A JSONL file is indexed once (the byte range and line number of every non-blank line, found with numpy in a few
seconds per GB) and its lines read on demand; a Parquet file is read a row group at a time; a ``save_to_disk``
folder is memory-mapped; a JSON array and the built-in sources are small and held whole. The parent process keeps
only the index; each tokenizing process opens the files itself. Errors name the file and line (or record), as
:mod:`dtune.data.sources` does.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from dtune.assets import BUILTIN_PREFIX
from dtune.data.formats import Row, UnknownKeys, row_from_obj
from dtune.data.sources import BUILTIN_SOURCES, _jsonl_record, _records, columnar, load_saved
from dtune.errors import DataError

CHUNK = 1 << 24  # bytes read at a time while indexing a JSONL file


def jsonl_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(byte ranges [lines, 2] int64, line numbers [lines] int64, 1-based) of the lines of ``path`` that hold more
    than ASCII whitespace. One pass in chunks of 16 MiB read into one buffer: memory stays at ~100 MB plus 24 bytes
    a line, whatever the file's size."""
    begins, ends, solid = [], [], []  # per chunk: the lines it completes
    line_begin, carry, offset = 0, 0, 0  # the line in progress: where it began, its bytes other than whitespace
    buffer = bytearray(CHUNK)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            chunk = np.frombuffer(buffer, dtype=np.uint8, count=n)
            newlines = np.flatnonzero(chunk == 10)
            filled = ~((chunk == 32) | ((chunk >= 9) & (chunk <= 13)))
            cuts = np.concatenate([[0], newlines[newlines + 1 < n] + 1])
            sums = np.add.reduceat(filled.view(np.uint8), cuts, dtype=np.int64)  # segment k: after newline k-1
            if len(newlines):
                begins.append(np.concatenate([[line_begin], newlines[:-1] + 1 + offset]))
                ends.append(newlines + offset)
                solid.append(np.concatenate([[carry + sums[0]], sums[1 : len(newlines)]]))
                line_begin = int(newlines[-1]) + 1 + offset
                carry = int(sums[len(newlines)]) if len(sums) > len(newlines) else 0
            else:
                carry += int(sums[0])
            offset += n
    if line_begin < offset:  # the last line has no newline
        begins.append(np.array([line_begin]))
        ends.append(np.array([offset]))
        solid.append(np.array([carry]))
    if not begins:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    begin, end, count = (np.concatenate(x).astype(np.int64) for x in (begins, ends, solid))
    keep = count > 0
    # A few bytes other than ASCII whitespace may still be a blank line to the JSONL reader: a byte-order mark, or
    # Unicode whitespace (U+00A0, U+3000, U+0085, U+001C-1F). Those lines are read and judged as it judges them.
    with open(path, "rb") as f:
        for i in np.flatnonzero(keep & (count <= 8)).tolist():
            f.seek(int(begin[i]))
            raw = f.read(int(end[i] - begin[i]))
            with contextlib.suppress(UnicodeDecodeError):  # not UTF-8: kept, the reader names the bad bytes
                keep[i] = bool(raw.decode("utf-8").removeprefix("\ufeff").strip())
    return np.stack([begin[keep], end[keep]], axis=1), np.arange(1, len(begin) + 1, dtype=np.int64)[keep]


class Records:
    """The records of one source. ``row(i)`` parses record ``i`` (a :class:`Row`, or None for a line that holds
    only a byte-order mark); raises DataError naming the file and line. Picklable: files are opened lazily in the
    process that reads them."""

    def __init__(self, source: str, field_name: str, fmt: str) -> None:
        self.source, self.field_name, self.fmt = source, field_name, fmt
        self._handle: Any = None
        self._group: tuple[int, Any] | None = None
        self._spilled: Path | None = None
        self.kind, self.count = self._open()

    def _open(self) -> tuple[str, int]:
        if self.source.startswith(BUILTIN_PREFIX):
            name = self.source[len(BUILTIN_PREFIX) :]
            if name not in BUILTIN_SOURCES:
                known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_SOURCES)
                raise DataError(f"{self.field_name}: unknown built-in data source '{self.source}' (known: {known})")
            self.rows: list[Row] = BUILTIN_SOURCES[name]()
            return "rows", len(self.rows)
        path = Path(self.source)
        if not path.exists():
            raise DataError(f"{self.field_name}: data file not found: {path}")
        if path.is_file() and path.suffix == ".jsonl":
            self.ranges, self.lines = jsonl_index(path)
            if not len(self.lines):
                raise DataError(f"{path}: no rows (the file is empty, or every row was bad)")
            return "jsonl", len(self.lines)
        if path.is_file() and path.suffix not in (".json", ".parquet"):
            raise DataError(
                f"{self.field_name}: {path}: unsupported data file (.jsonl, .json, .parquet, or a save_to_disk folder)"
            )
        if path.is_file() and path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataError(f"{path}: not a readable Parquet file ({err})") from None
            self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            count = int(self.group_starts[-1])
            kind = "parquet"
        elif path.is_dir():
            count, kind = len(self._dataset()), "arrow"
        else:
            self.objects = [rec for _, rec in _records(path, self.field_name)]
            count, kind = len(self.objects), "json"
        if count == 0:
            raise DataError(f"{path}: no rows (the file is empty, or every row was bad)")
        return kind, count

    def _dataset(self) -> Any:
        if self._handle is None:
            self._handle = load_saved(Path(self.source), self.field_name)
        return self._handle

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_handle": None, "_group": None}
        if self._spilled is not None:  # the processes memory-map the index instead of each receiving a copy
            state |= {"ranges": None, "lines": None}
        return state

    def __del__(self) -> None:  # also on an object whose construction raised (no kind yet)
        if getattr(self, "kind", None) == "jsonl" and isinstance(self._handle, int):
            with contextlib.suppress(OSError):
                os.close(self._handle)

    def spill(self, folder: Path) -> None:
        """Write a JSONL index to ``folder`` (kept there while the processes read): pickled, this object then carries
        the index's path, not the index (24 bytes a line; 2.4 GB at 100M lines, once per process otherwise)."""
        if self.kind == "jsonl":
            self._spilled = folder / f"index-{id(self)}"
            np.save(f"{self._spilled}-ranges.npy", self.ranges)
            np.save(f"{self._spilled}-lines.npy", self.lines)

    def _index(self) -> None:
        if self.ranges is None:
            self.ranges = np.load(f"{self._spilled}-ranges.npy", mmap_mode="r")
            self.lines = np.load(f"{self._spilled}-lines.npy", mmap_mode="r")

    def where(self, i: int) -> str:
        path = Path(self.source)
        if self.kind == "jsonl":
            self._index()
            return f"{path}:{int(self.lines[i])}"
        return f"{path}: {'row' if self.kind == 'parquet' else 'record'} {i}"

    def row(self, i: int, unknown: UnknownKeys) -> Row | None:
        if self.kind == "rows":
            return self.rows[i]
        if self.kind == "jsonl":
            if self._handle is None:
                self._handle = os.open(self.source, os.O_RDONLY)
            self._index()
            begin, end = (int(x) for x in self.ranges[i])
            raw = os.pread(self._handle, end - begin, begin)
            return _jsonl_record(raw, self.where(i), self.fmt, unknown)
        return row_from_obj(self._object(i), self.where(i), self.fmt, unknown)

    def _object(self, i: int) -> Any:
        if self.kind == "json":
            return self.objects[i]
        if self.kind == "arrow":
            return columnar(self._dataset()[i])
        group = int(np.searchsorted(self.group_starts, i, side="right") - 1)
        if self._group is None or self._group[0] != group:  # one row group held, as Arrow (a row made Python on use)
            import pyarrow.parquet as pq

            try:
                self._group = (group, pq.ParquetFile(self.source).read_row_group(group))
            except Exception as err:  # pyarrow raises several types for a damaged page
                raise DataError(f"{self.source}: row group {group} is not readable ({err})") from None
        return columnar(self._group[1].slice(i - int(self.group_starts[group]), 1).to_pylist()[0])
