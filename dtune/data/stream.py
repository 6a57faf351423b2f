"""Streaming (``data.streaming=true``): training rows read from JSONL/Parquet shards as the run goes, tokenized on the
fly by worker processes, split across ranks, packed, resumable at any step.

What replaces what. The in-memory path (:mod:`dtune.data.load`) tokenizes every row before the first step and draws
steps from a shuffled list; a stream never holds more than a few steps of rows, so it suits corpora larger than memory
or than the disk budget of a tokenized copy. The price: no global shuffle, and the stream's length is not known in
advance (``train.max_steps`` decides the run's length; ``train.epochs`` is refused).

The stream (:mod:`dtune.data.shards`): each epoch reads every shard once, in an order shuffled by (train.seed,
epoch), records in file order. Record ``n`` of the stream belongs to rank ``n % world``: the ranks' shares are
disjoint and together cover the stream, each rank tokenizing 1/world of it.

Workers. A rank's records are tokenized by ``workers`` DataLoader processes (``data.num_proc``, see
:func:`stream_workers`; 0: in the training process). Every worker scans the whole stream (a line costs a Python loop
step; only its own records are parsed and rendered) and takes every ``workers``-th record of its rank, yielding one
item per record it takes -- an Example, or a placeholder for a blank, bad or dropped record. The DataLoader asks the
workers in turn, one item each, so the items come back in the rank's record order whatever the number of workers.
Scanning is cheap next to rendering, and a node's processes read the same bytes at about the same time, from the page
cache; a Parquet row group is decoded by every process that reads it.

Steps. Each step takes the rank's next micro_batch_size x grad_accum_steps samples -- packed rows with
``data.packing``, filled greedily in stream order (the row layout of :func:`dtune.data.examples.packed_example`) -- sorted by length (stable)
and cut into micro-batches, collated with :func:`dtune.data.batching.collate`.

Resuming. The position after the last item a step consumed (epoch, shard, byte offset or row, line, record number),
the packed row begun but not finished, and the counts so far are each rank's state; items prefetched by the workers
but not consumed are not part of it. A restored sampler seeks to that byte offset (JSONL) or row group (Parquet)
without reading what came before, and yields exactly the steps the uninterrupted run would have. Resuming needs the
same shards, world size, batch shape, packing and seed (a DataError names what changed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dtune.data.batching import collate
from dtune.data.examples import DataStats, Example, packed_example
from dtune.data.formats import UnknownKeys
from dtune.data.shards import Position, Shard, begin, find_shards, held_out, shard_order
from dtune.data.stream_items import Item, RankRecords, deaf, stream_workers
from dtune.errors import DataError
from dtune.schema import DataConfig, DtuneConfig

log = logging.getLogger(__name__)


class StreamSampler:
    """Endless optimizer steps from the stream: for each, this rank's ``grad_accum_steps`` micro-batches (the
    interface of :class:`~dtune.data.batching.StepSampler`; see the module docstring).

    :meth:`state_dict` is collective when ``gather`` is (every rank's position is saved): call it on every rank.
    """

    def __init__(
        self,
        shards: list[Shard],
        cfg: DataConfig,
        tokenizer: Any,
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        gather: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        self.shards, self.cfg, self.tokenizer, self.seed, self.pad_id = shards, cfg, tokenizer, seed, pad_id
        self.micro, self.rank, self.world_size, self.workers = micro_batch_size, rank, world_size, workers
        self.per_rank = micro_batch_size * grad_accum_steps
        self.per_step = self.per_rank * world_size
        self.gather = gather or (lambda own: [own])
        self.position = begin(shards, seed)
        self.pending: list[Example] = []
        """Packing: the samples of the row begun (consumed from the stream, not yet trained on)."""
        self.stats = DataStats()
        """This rank's counts so far (train_rows: samples taken); :meth:`run_stats` sums the ranks'."""
        self.held_skipped = 0
        """Bad rows among the held-out ones (each rank read them all)."""
        self.positions = [0, 0]
        """Of the micro-batches so far: [positions, those holding a token] (their padding)."""
        self.unknown = UnknownKeys()
        self.steps = 0
        self._items: Iterator[Item] | None = None
        self._last_example_epoch = 0

    # -- the interface of StepSampler

    steps_per_epoch = None
    """Unknown for a stream: the run's length is train.max_steps."""

    @property
    def epochs_done(self) -> float:
        """Passes over the stream so far (this rank's position), the current one's fraction by bytes read."""
        p = self.position
        order = shard_order(len(self.shards), self.seed, p.epoch)
        total = sum(s.nbytes for s in self.shards)
        done = sum(self.shards[i].nbytes for i in order[: p.shard])
        if p.shard < len(order):
            current = self.shards[order[p.shard]]
            done += current.nbytes * p.offset / max(current.size, 1)
        return p.epoch + done / max(total, 1)

    def __iter__(self) -> StreamSampler:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        samples = [self._next_row() if self.cfg.packing else self._next_example() for _ in range(self.per_rank)]
        samples.sort(key=lambda e: len(e.input_ids))  # stable: similar lengths share a micro-batch, less padding
        self.steps += 1
        batches = [collate(samples[j : j + self.micro], self.pad_id) for j in range(0, self.per_rank, self.micro)]
        masks = [b["attention_mask"] for b in batches]
        self.positions = [self.positions[0] + sum(m.numel() for m in masks), self.positions[1] + sum(int(m.sum()) for m in masks)]
        return batches

    def run_stats(self) -> DataStats:
        """The run's counts so far, every rank's share summed (collective with ``gather``); padding: the fraction of
        the positions of the micro-batches so far that are padding."""
        ranks = self.gather((self.stats, self.unknown, self.positions))
        total = DataStats.of_ranks([stats for stats, _, _ in ranks])
        total.skipped -= (len(ranks) - 1) * self.held_skipped  # every rank counted the held-out rows' bad ones
        unknown = UnknownKeys()
        for _, part, _ in ranks:
            unknown.merge(part)  # where first: where the first rank that saw a key saw it
        total.ignored_keys = unknown.summary()
        slots, real = (sum(p[i] for *_, p in ranks) for i in (0, 1))
        total.padding = 1.0 - real / max(slots, 1)
        return total

    def state_dict(self) -> dict[str, Any]:
        """The settings the position depends on and every rank's position (collective with ``gather``)."""
        own = {
            "position": asdict(self.position),
            "pending": [[e.input_ids, e.labels] for e in self.pending],
            "steps": self.steps,
            "stats": asdict(self.stats),
            "positions": self.positions,
            "unknown": {"counts": dict(self.unknown.counts), "first": self.unknown.first},
        }
        return {"stream": True, **self._settings(), "ranks": self.gather(own)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("stream"):
            raise DataError("resume: the checkpoint's data order is not a stream's (data.streaming changed)")
        for key, mine in self._settings().items():
            if state[key] != mine:
                raise DataError(f"resume: the data stream was saved with {key}={state[key]}, this run has {mine}")
        own = state["ranks"][self.rank]
        self.position = Position(**own["position"])
        self.pending = [Example(ids, labels, prompt_len=0) for ids, labels in own["pending"]]
        self.steps, self.positions = own["steps"], own.get("positions", [0, 0])
        if "positions" not in own and self.rank == 0:  # saved before streams counted them
            log.warning(
                "resume: the checkpoint (an older dtune's) holds no token, packing or padding counts of its stream: "
                "results.json's data.tokens, trained_tokens, pack_fill and padding will not be the whole run's"
            )
        for key, value in own["stats"].items():  # in place: the run's results hold this object
            setattr(self.stats, key, value)
        self.unknown = UnknownKeys()
        self.unknown.counts.update(own["unknown"]["counts"])
        self.unknown.first.update(own["unknown"]["first"])
        self._last_example_epoch = self.position.epoch
        self._items = None  # restarted from the new position at the next step

    # -- the stream

    def _settings(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "samples_per_step": self.per_step,
            "seed": self.seed,
            "packing": self.cfg.packing,
            "max_seq_len": self.cfg.max_seq_len,
            "shards": [[Path(s.path).name, s.nbytes] for s in self.shards],
        }

    def _start(self) -> Iterator[Item]:
        dataset = RankRecords(self.shards, self.cfg, self.tokenizer, self.seed, self.position, self.rank, self.world_size)
        if self.workers == 0:
            return iter(dataset)
        # batch_size=None: one item per record, in the order the workers are asked (round robin).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, prefetch_factor=16, worker_init_fn=deaf)
        return iter(loader)

    def _next_item(self) -> Item:
        if self._items is None:
            self._items = self._start()
        item = next(self._items)
        if item.fatal:
            raise DataError(item.bad)
        if item.bad is not None:
            if self.cfg.bad_rows != "skip":
                raise DataError(item.bad)
            if not self.stats.first_bad:
                log.warning("data: skipped a bad row (data.bad_rows=skip; later ones are counted): %s", item.bad)
                self.stats.first_bad = item.bad
            self.stats.skipped += 1
        for name, (n, where) in item.unknown.items():
            if name not in self.unknown.counts:
                log.warning("data: key '%s' (first at %s) is not read by data.format=%s: ignored", name, where, self.cfg.format)
            self.unknown.add(name, n, where)
        if item.unknown:
            self.stats.ignored_keys = self.unknown.summary()
        self.stats.truncated += item.truncated
        self.stats.dropped += item.dropped
        if item.after.epoch > self.position.epoch:
            self._log_epoch()
        self.position = item.after
        return item

    def _next_example(self) -> Example:
        """The rank's next sample; DataError when a whole pass over the stream gave this rank none."""
        while True:
            item = self._next_item()
            if item.example is not None:
                self._last_example_epoch = item.after.epoch
                self.stats.count(item.example)
                return item.example
            if item.after.epoch > self._last_example_epoch + 1:
                raise DataError(
                    f"data.source: a whole pass over {self.cfg.source} gave rank {self.rank} no training sample "
                    "(every row bad, blank or longer than data.max_seq_len, or fewer rows than ranks?)"
                )

    def _next_row(self) -> Example:
        """The next packed row: samples appended in stream order while they fit in data.max_seq_len."""
        while True:
            example = self._next_example()
            if self.pending and sum(len(e.input_ids) for e in self.pending) + len(example.input_ids) > self.cfg.max_seq_len:
                row = packed_example(self.pending)
                self.pending = [example]
                self.stats.count_packed_row(len(row.input_ids), self.cfg.max_seq_len)
                return row
            self.pending.append(example)

    def _log_epoch(self) -> None:
        s = self.stats
        counts = f"{s.train_rows} samples so far, {s.truncated} truncated, {s.dropped} dropped, {s.skipped} bad rows skipped"
        log.info("data: pass %d over the stream done on rank %d: %s", self.position.epoch + 1, self.rank, counts)


def stream_data(
    run: DtuneConfig,
    tokenizer: Any,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
) -> tuple[StreamSampler, list[Example], DataStats]:
    """The training stream of ``run`` (data.streaming) for ``rank``, its held-out Examples, and its counts (this rank's
    share, updated as the stream goes). ``gather``: every rank's object from each (collective), for checkpoints."""
    cfg, train = run.data, run.train
    shards, workers = find_shards(cfg.source), stream_workers(cfg.num_proc)
    evals, shards, skipped = held_out(cfg, tokenizer, shards)
    batch = {"micro_batch_size": train.micro_batch_size, "grad_accum_steps": train.grad_accum_steps, "seed": train.seed}
    sampler = StreamSampler(
        shards, cfg, tokenizer, **batch, pad_id=pad_id, rank=rank, world_size=world_size, workers=workers, gather=gather
    )
    sampler.stats.eval_rows, sampler.stats.skipped, sampler.held_skipped = len(evals), skipped, skipped
    log.info(
        "data: streaming %d shard(s) of %s, %d tokenizing worker(s) per rank; %d held-out samples. Counts of truncated, "
        "dropped and bad rows are known only as the stream goes (logged after each pass, in results.json at the end)",
        len(shards),
        cfg.source,
        workers,
        len(evals),
    )
    return sampler, evals, sampler.stats


def streamed_eval_set(cfg: DataConfig, tokenizer: Any) -> list[Example]:
    """The held-out Examples of a streamed run (``dtune eval``), without reading the training stream."""
    return held_out(cfg, tokenizer, find_shards(cfg.source))[0]
