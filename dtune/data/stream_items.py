"""A stream's records as its worker processes yield them: each record of a rank parsed and rendered, or why it gave
no sample (see :mod:`dtune.data.stream` for how the workers share a rank's records)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from dtune.data.examples import Example
from dtune.data.formats import UnknownKeys
from dtune.data.render import Renderer
from dtune.data.shards import Position, Shard, parse, scan
from dtune.distributed.preempt import SIGNALS
from dtune.errors import DataError
from dtune.schema import DataConfig


@dataclass
class Item:
    """What a worker yields for one record of its rank: the Example, or why there is none."""

    after: Position
    example: Example | None = None
    truncated: bool = False
    dropped: bool = False
    bad: str | None = None
    """The DataError of a malformed record (raised in the training process under data.bad_rows=error)."""
    fatal: bool = False
    """A file that cannot be read at all: stops the run whatever data.bad_rows says."""
    unknown: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Record keys the format does not read: name -> (count, where)."""


class RankRecords(IterableDataset):
    """The items of one rank's records from ``start`` on, endless; in a DataLoader worker, every ``workers``-th of them
    (see the module docstring)."""

    def __init__(
        self, shards: list[Shard], cfg: DataConfig, tokenizer: Any, seed: int, start: Position, rank: int, world_size: int
    ) -> None:
        self.shards, self.cfg, self.tokenizer, self.seed = shards, cfg, tokenizer, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.rank, self.world_size
        first = self.start.record + (rank - self.start.record) % world  # this rank's first record from start on

        def mine(record: int) -> bool:
            return record % world == rank and (record - first) // world % workers == worker

        renderer = Renderer(self.tokenizer, self.cfg)
        after, owned_in = self.start, self.start.epoch  # the latest epoch in which this rank owned a record
        try:
            for after, where, payload in scan(self.shards, self.seed, self.start, mine):
                if after.record % world == (rank + 1) % world:  # the record just read was this rank's
                    owned_in = after.epoch
                elif after.epoch > owned_in + 1:
                    raise DataError(f"data.source: {self.cfg.source} has fewer records than the {world} ranks")
                if payload is not None:
                    yield self.item(after, where, payload, renderer)
        except (DataError, OSError) as err:  # a file that cannot be read (removed, damaged) while streaming
            yield Item(after, bad=str(err) if isinstance(err, DataError) else f"data.source: {err}", fatal=True)

    def item(self, after: Position, where: str, payload: Any, renderer: Renderer) -> Item:
        unknown = UnknownKeys()
        stats = renderer.stats
        truncated, dropped = stats.truncated, stats.dropped
        try:
            row = parse(payload, where, self.cfg.format, unknown)
            example = renderer(row) if row is not None else None
        except DataError as err:
            return Item(after, bad=str(err), unknown=_unknown(unknown))
        return Item(after, example, stats.truncated > truncated, stats.dropped > dropped, unknown=_unknown(unknown))


def _unknown(unknown: UnknownKeys) -> dict[str, tuple[int, str]]:
    return {name: (n, unknown.first[name]) for name, n in unknown.counts.items()}


def deaf(worker: int) -> None:
    """A worker ignores the stop signals (and Ctrl-C) that reach its whole process group: the training process stops
    at a step boundary and checkpoints (dtune.distributed.preempt), which needs its workers alive until it ends them."""
    for name in (*SIGNALS, "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def stream_workers(num_proc: int | None, local_ranks: int | None = None) -> int:
    """Tokenizing worker processes per rank: ``data.num_proc`` (per node) // the ranks on the node, at least 1; null:
    the rank's share of the node's cores less one for the training process itself, at most 4 (0: tokenize in the
    training process)."""
    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if num_proc is not None:
        return max(1, num_proc // local)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, max(0, cores // local - 1))
