"""What tokenized data is: an Example (token ids, labels, prompt length, answer choices, packed segments) and the
counts gathered while making them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

IGNORE = -100  # label of a position that carries no loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """input_ids with prompt positions set to IGNORE."""
    prompt_len: int
    """Number of prompt tokens: the first completion token is predicted at position prompt_len - 1."""
    choice_ids: list[list[int]] = field(default_factory=list)
    """For closed answer sets: token ids of each choice's completion, rendered after this prompt."""
    gold: int = -1
    """Index of the row's completion in data.choices (-1 when there are no choices)."""
    segments: list[int] | None = None
    """Packed rows: the lengths of the samples packed into this row (see dtune.data.packing)."""
    rejected: Example | None = None
    """A preference pair: this example is the prompt and the chosen reply, ``rejected`` the same prompt (the same
    tokens) and the rejected reply."""
    desirable: bool | None = None
    """A KTO row: whether the completion is desirable."""
    ref_logps: tuple[float, float] | None = None
    """A preference pair with precomputed reference log-probabilities (chosen, rejected; dtune.reference)."""


@dataclass
class DataStats:
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    packed_rows: int = 0
    skipped: int = 0
    first_bad: str = ""
    """The first bad row's error (data.bad_rows=skip)."""
    ignored_keys: str = ""
    """Record keys the format does not read, with counts (warned about on every load, cached or not)."""
    refilled: str = ""
    """data.mix: for each source that lost training samples at tokenization, a line saying how many, replaced by repeats
    of its good ones (warned about on every load, cached or not)."""
    tokens: int = 0
    """Tokens of the training samples (before packing; padding not counted)."""
    trained_tokens: int = 0
    """Of those, the tokens that carry loss (labels not IGNORE, the first of each sample excluded)."""
    pack_fill: float = 0.0
    """With packing: the training tokens over the room of the packed rows (1.0: no padding in any row)."""
    cache_bytes: int = 0
    """Size of the tokenized data on disk (0 without the cache)."""
    tokenize_seconds: float = 0.0
    """Wall time of the tokenization that built the cache (0 when another run built it)."""
    num_proc: int = 0
    """Processes that tokenized."""
    padding: float = 0.0
    """The fraction of the positions of the first epoch's micro-batches that are padding (set by the training loop; a
    stream: of the micro-batches trained on)."""

    def figures(self) -> dict[str, float]:
        """The counts as ``data/<name>`` figures (for W&B's run summary); text fields left out."""
        return {f"data/{k}": v for k, v in self.__dict__.items() if isinstance(v, int | float)}

    def count(self, example: Example) -> None:
        """A sample taken from a stream: a training row, its tokens (of both replies of a pair) and trained tokens."""
        self.train_rows += 1
        for sample in (example, example.rejected):
            if sample is not None:
                self.tokens += len(sample.input_ids)
                self.trained_tokens += trained_count(sample)

    def count_packed_row(self, tokens: int, room: int) -> None:
        """A packed row of ``tokens`` tokens out of ``room`` (data.max_seq_len) made from a stream: pack_fill kept as
        the mean over the rows."""
        rows = self.packed_rows
        self.pack_fill = (self.pack_fill * rows + tokens / max(room, 1)) / (rows + 1)
        self.packed_rows = rows + 1

    @classmethod
    def of_ranks(cls, ranks: Sequence[DataStats]) -> DataStats:
        """The whole run's counts from each rank's count of its own share (a stream): counts summed, the held-out
        rows' (the same on every rank) taken once, pack_fill weighted by packed rows; the first rank's text."""
        total = cls()
        for key, first in asdict(ranks[0]).items():
            if key == "eval_rows" or isinstance(first, str):
                setattr(total, key, next((getattr(r, key) for r in ranks if getattr(r, key)), first))
            elif isinstance(first, int):
                setattr(total, key, sum(getattr(r, key) for r in ranks))
        total.pack_fill = sum(r.pack_fill * r.packed_rows for r in ranks) / max(total.packed_rows, 1)
        return total


def trained_count(example: Example) -> int:
    """Labelled positions of a sample, the first (never predicted) left out."""
    return max(len(example.labels) - 1 - example.labels[1:].count(IGNORE), 0)


def packed_example(samples: Sequence[Example]) -> Example:
    """One packed row: ``samples`` back to back, each sample's first label IGNORE (see dtune.data.packing)."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in samples:
        ids += ex.input_ids
        labels += [IGNORE, *ex.labels[1:]]
    return Example(ids, labels, prompt_len=-1, segments=[len(ex.input_ids) for ex in samples])


class TokenizedSet:
    """Examples held in an Arrow table (memory-mapped from dtune's data cache, or in memory), read one at a time: a
    rank holds the index and the lengths (16 bytes a sample) and the examples of the current step, whatever the size
    of the set.

    ``table`` (a ``datasets`` Table) has columns ``input_ids`` (lists of int32), ``trained`` (lists of bool: the
    label is the token where true, IGNORE elsewhere), ``prompt_len``, and with ``data.choices`` ``choice_ids`` and
    ``gold``; preference pairs also ``rejected_ids`` and ``rejected_trained`` (a pair's length is its longer reply's,
    ``tokens`` counts both), KTO rows ``desirable``; ``ref`` holds precomputed reference log-probabilities. Sample i is table row ``index[i]`` (all rows in order when None). With ``packs`` (CSR ``offsets``
    [rows + 1], ``members`` [samples] over the samples, see :func:`dtune.data.packing.pack_bins`) item r is packed
    row r. A sequence: ``len``, indexing (an :class:`Example`; a slice gives a list), iteration; ``lengths`` [items]
    holds each item's tokens (int64), read from the table's offsets alone.
    """

    def __init__(self, table: Any, index: np.ndarray | None = None, packs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        import pyarrow.compute as pc

        self.table, self.packs = table, packs

        def lengths(name: str) -> np.ndarray:
            column = table.table.column(name)
            return pc.list_value_length(column).to_numpy().astype(np.int64) if len(column) else np.zeros(0, np.int64)

        every = lengths("input_ids")
        self.index = np.arange(len(every), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        self.sample_lengths = every[self.index]
        self.pairs = "rejected_ids" in table.column_names
        self.tokens = int(self.sample_lengths.sum())
        """Tokens of the samples (of both replies of a pair)."""
        if self.pairs:  # a pair takes two rows of its micro-batch: its length is the longer reply's
            rejected = lengths("rejected_ids")[self.index]
            self.tokens += int(rejected.sum())
            self.sample_lengths = np.maximum(self.sample_lengths, rejected)
        self.desirable = "desirable" in table.column_names
        self.folder: Path | None = None
        """The data cache folder the table is memory-mapped from (None: in memory)."""
        self.ref: np.ndarray | None = None
        """[samples, 2] float32: precomputed reference log-probabilities of each pair (dtune.reference), or None."""
        if packs is None:
            self.lengths = self.sample_lengths
        else:
            offsets, members = packs
            sums = np.concatenate([[0], np.cumsum(self.sample_lengths[members])])
            self.lengths = sums[offsets[1:]] - sums[offsets[:-1]]
        self.choices = "choice_ids" in table.column_names

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int) -> Example:
        """Sample ``i`` (not a packed row)."""
        row = self.table.fast_slice(int(self.index[i]), 1)
        ids = row.column("input_ids").chunk(0).flatten().to_numpy()
        trained = row.column("trained").chunk(0).flatten().to_numpy(zero_copy_only=False)
        prompt_len = int(row.column("prompt_len")[0].as_py())
        ex = Example(ids.tolist(), np.where(trained, ids, IGNORE).tolist(), prompt_len)
        if self.pairs:
            ids = row.column("rejected_ids").chunk(0).flatten().to_numpy()
            trained = row.column("rejected_trained").chunk(0).flatten().to_numpy(zero_copy_only=False)
            ex.rejected = Example(ids.tolist(), np.where(trained, ids, IGNORE).tolist(), prompt_len)
        if self.desirable:
            ex.desirable = bool(row.column("desirable")[0].as_py())
        if self.ref is not None:
            ex.ref_logps = (float(self.ref[i, 0]), float(self.ref[i, 1]))
        if self.choices:
            ex.choice_ids = row.column("choice_ids")[0].as_py()
            ex.gold = int(row.column("gold")[0].as_py())
        return ex

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        if self.packs is None:
            return self.sample(i)
        offsets, members = self.packs
        return packed_example([self.sample(j) for j in members[offsets[i] : offsets[i + 1]]])

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]
