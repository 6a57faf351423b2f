"""Streaming (data.streaming): the streamed samples are the Renderer's, the ranks split the stream without overlap,
bad rows name their file and line, and a sampler restored after k steps yields exactly the uninterrupted steps."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtune.config import validate
from dtune.data import Renderer
from dtune.data.examples import packed_example
from dtune.data.shards import find_shards, held_out, shard_order
from dtune.data.sources import read_source
from dtune.data.stream import StreamSampler, stream_workers
from dtune.errors import ConfigError, DataError
from dtune.schema import DataConfig
from tests.helpers import compose_config


def records(shard: int, n: int) -> list[dict]:
    # Lengths vary (packing fills rows unevenly); every 9th answer is long enough to be truncated at 96 tokens.
    return [
        {"prompt": f"shard {shard} row {i} " + "word " * (i % 5), "completion": "yes " * (60 if i % 9 == 4 else 1 + i % 3)}
        for i in range(n)
    ]


def write_shards(folder: Path, kind: str, sizes: tuple[int, ...] = (20, 17)) -> Path:
    folder.mkdir()
    for s, n in enumerate(sizes):
        rows = records(s, n)
        if kind == "jsonl":
            (folder / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:  # small row groups: a resume seeks past whole groups
            pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{s}.parquet", row_group_size=6)
    return folder


def sampler(
    tokenizer, source: Path, micro: int = 1, accum: int = 1, rank: int = 0, world: int = 1, workers: int = 0, **data
) -> StreamSampler:
    cfg = DataConfig(source=str(source), streaming=True, eval_size=3, choices=None, max_seq_len=96, **data)
    _, shards, _ = held_out(cfg, tokenizer, find_shards(cfg.source))
    return StreamSampler(shards, cfg, tokenizer, micro, accum, seed=7, pad_id=0, rank=rank, world_size=world, workers=workers)


def samples(s: StreamSampler, steps: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input ids, labels) of each sample of ``steps`` steps, padding cut."""
    out = []
    for _ in range(steps):
        for batch in next(s):
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
                n = int(mask.sum())
                out.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    return out


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_streamed_samples_are_the_renderers_examples(tokenizer, tmp_path: Path, kind: str):
    """One pass: the rows of both shards in the epoch's shard order, less the 3 held out of the first shard by name,
    rendered exactly as the in-memory path renders them (truncation included)."""
    source = write_shards(tmp_path / "shards", kind)
    s = sampler(tokenizer, source)
    renderer = Renderer(tokenizer, s.cfg)
    paths = sorted(source.iterdir())
    rows = {p: read_source(str(p), "data.source", "prompt_completion") for p in paths}
    rows[paths[0]] = rows[paths[0]][3:]
    expected = [renderer(r) for i in shard_order(2, 7, 0) for r in rows[paths[i]]]
    got = samples(s, len(expected))
    assert got == [(tuple(e.input_ids), tuple(e.labels)) for e in expected]
    assert s.stats.truncated == renderer.stats.truncated > 0 and s.stats.train_rows == 34
    assert s.epochs_done == 1.0  # at the end of the first pass
    where = rows[paths[1]][0].where
    assert where == (f"{paths[1]}:1" if kind == "jsonl" else f"{paths[1]}: row 0")


def test_the_first_shard_holds_out_the_evaluation_rows(tokenizer, tmp_path: Path):
    source = write_shards(tmp_path / "shards", "jsonl")
    cfg = DataConfig(source=str(source), streaming=True, eval_size=3, choices=None)
    evals, shards, _ = held_out(cfg, tokenizer, find_shards(cfg.source))
    renderer = Renderer(tokenizer, cfg)
    first = read_source(str(source / "part-0.jsonl"), "data.source", "prompt_completion")
    assert [e.input_ids for e in evals] == [renderer(r).input_ids for r in first[:3]]
    assert (shards[0].start_line, shards[1].start_line) == (3, 0)
    everything = DataConfig(source=str(source), streaming=True, eval_size=20, choices=None)
    _, shards, _ = held_out(everything, tokenizer, find_shards(str(source)))  # the other shard is trained on
    assert shards[0].start == shards[0].size
    for src, size in ((source, 21), (source / "part-0.jsonl", 20)):
        with pytest.raises(DataError, match=rf"data\.eval_size: {size} rows held out of .*part-0\.jsonl"):
            held_out(DataConfig(source=str(src), streaming=True, eval_size=size, choices=None), tokenizer, find_shards(str(src)))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_the_stream_without_overlap(tokenizer, tmp_path: Path, workers: int):
    """Record n goes to rank n % 2: the ranks' samples of one pass are disjoint and together all 34 training rows, in
    the order of one rank's stream (whatever the number of tokenizing workers)."""
    source = write_shards(tmp_path / "shards", "parquet")
    one = samples(sampler(tokenizer, source), 34)
    ranks = [samples(sampler(tokenizer, source, rank=r, world=2, workers=workers), 17) for r in range(2)]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_bad_row_names_its_file_and_line(tokenizer, tmp_path: Path, kind: str):
    source = write_shards(tmp_path / "shards", kind)
    bad = source / f"part-1.{kind}"
    rows = records(1, 17)
    rows[4] = {"prompt": "no answer"}
    rows[0]["id"] = 7  # a key the format does not read: counted and named, not an error
    if kind == "jsonl":
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        where, first_id = f"{bad}:5", f"{bad}:1"
    else:
        pq.write_table(pa.Table.from_pylist(rows), bad, row_group_size=6)
        where, first_id = f"{bad}: row 4", f"{bad}: row 0"
    with pytest.raises(DataError, match=f"{where}: (missing field 'completion'|field 'completion' must be a string)"):
        samples(sampler(tokenizer, source, workers=2), 40)
    skipping = sampler(tokenizer, source, bad_rows="skip")
    assert len(samples(skipping, 30)) == 30 and skipping.stats.skipped == 1
    assert "'id' " in skipping.stats.ignored_keys and f"(first at {first_id})" in skipping.stats.ignored_keys


@pytest.mark.parametrize(("packing", "workers"), [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_a_restored_stream_yields_the_uninterrupted_steps(tokenizer, tmp_path: Path, packing: bool, workers: int):
    """2 ranks, 2 micro-batches of 2 per step; stopped after 3 steps (items prefetched but not consumed are not part of
    the state), restored in new samplers: the next 5 steps, across epoch boundaries, and the counts are the
    uninterrupted run's."""
    source = write_shards(tmp_path / "shards", "jsonl")

    def ranks(w: int) -> list[StreamSampler]:
        return [sampler(tokenizer, source, 2, 2, rank=r, world=2, workers=w, packing=packing) for r in range(2)]

    straight = ranks(0)
    expected = [[samples(s, 1) for s in straight] for _ in range(8)]
    stopped = ranks(workers)
    assert [[samples(s, 1) for s in stopped] for _ in range(3)] == expected[:3]
    own = [s.state_dict() for s in stopped]
    state = {**own[0], "ranks": [own[0]["ranks"][0], own[1]["ranks"][0]]}  # as a checkpoint gathers them
    state = json.loads(json.dumps(state))  # through trainer_state.json
    resumed = ranks(workers)
    for s in resumed:
        s.load_state_dict(state)
    assert [[samples(s, 1) for s in resumed] for _ in range(5)] == expected[3:]
    assert [s.stats for s in resumed] == [s.stats for s in straight]
    assert straight[0].position.epoch >= 1 and straight[0].stats.truncated > 0
    if packing:
        assert straight[0].stats.packed_rows == 8 * 4 and straight[0].stats.train_rows > 8 * 4


@pytest.mark.parametrize("packing", [False, True])
def test_a_streams_counts_are_what_its_steps_took_every_ranks_share_summed(tokenizer, tmp_path: Path, packing: bool):
    """results.json's data counts of a stream: tokens and trained tokens of the samples taken, the packed rows' fill
    and the micro-batches' padding, summed over 2 ranks (a bad held-out row, which every rank reads, counted once)."""
    source = write_shards(tmp_path / "shards", "jsonl")
    lines = (source / "part-0.jsonl").read_text().splitlines(keepends=True)
    (source / "part-0.jsonl").write_text("".join([lines[0], '{"prompt": "no answer"}\n', *lines[1:]]))
    ranks = [sampler(tokenizer, source, 2, 2, rank=r, world=2, packing=packing, bad_rows="skip") for r in range(2)]
    real = slots = rows = 0
    trained: list[int] = []
    for s in ranks:
        s.held_skipped = s.stats.skipped = 1  # as stream_data counts the held-out rows' bad ones
        s.stats.eval_rows = 3  # as stream_data sets it on every rank
        for _ in range(6):
            for batch in next(s):
                real, slots = real + int(batch["attention_mask"].sum()), slots + batch["attention_mask"].numel()
                rows += len(batch["input_ids"])
                labels = batch["labels"][:, 1:]  # a packed row's samples each begin with IGNORE already
                trained.append(int((labels != -100).sum()))
    ranks[0].gather = lambda own: [own, (ranks[1].stats, ranks[1].unknown, ranks[1].positions)]
    total = ranks[0].run_stats()
    assert total.padding == pytest.approx(1 - real / slots) and 0 < total.padding < 1
    assert total.skipped == 1 and total.eval_rows == 3  # the held-out rows, which every rank holds, counted once
    assert total.train_rows == sum(s.stats.train_rows for s in ranks)
    if packing:  # the samples of the rows begun but not finished are counted as taken
        pending = sum(len(e.input_ids) for s in ranks for e in s.pending)
        assert total.packed_rows == rows == 2 * 6 * 4 and total.tokens == real + pending
        assert total.pack_fill == pytest.approx(real / (rows * 96))
    else:
        assert total.train_rows == rows and total.tokens == real and total.trained_tokens == sum(trained)
        assert total.packed_rows == 0 and total.pack_fill == 0


def test_a_stream_state_saved_before_its_token_counts_resumes_and_says_what_they_miss(tokenizer, tmp_path: Path, caplog):
    source = write_shards(tmp_path / "shards", "jsonl")
    first = sampler(tokenizer, source, 2, 2)
    samples(first, 2)
    state = first.state_dict()
    del state["ranks"][0]["positions"]  # as an older dtune saved it
    resumed = sampler(tokenizer, source, 2, 2)
    with caplog.at_level("WARNING", logger="dtune.data.stream"):
        resumed.load_state_dict(state)
    assert "will not be the whole run's" in caplog.text and resumed.steps == 2 and resumed.positions == [0, 0]
    assert samples(resumed, 1) == samples(first, 1)  # the stream goes on where it was


def test_a_stream_refuses_to_resume_with_another_world_size_or_batch(tokenizer, tmp_path: Path):
    source = write_shards(tmp_path / "shards", "jsonl")
    state = sampler(tokenizer, source, 2, 2).state_dict()
    with pytest.raises(DataError, match="saved with world_size=1, this run has 2"):
        sampler(tokenizer, source, 2, 1, world=2).load_state_dict(state)
    with pytest.raises(DataError, match="saved with samples_per_step=4, this run has 2"):
        sampler(tokenizer, source, 2, 1).load_state_dict(state)


def test_packed_rows_are_greedy_in_stream_order(tokenizer, tmp_path: Path):
    """Each packed row holds the consecutive samples that fit in data.max_seq_len, in stream order."""
    source = write_shards(tmp_path / "shards", "jsonl")
    plain = samples(sampler(tokenizer, source), 34)
    packed = sampler(tokenizer, source, packing=True)
    rows = [next(packed)[0] for _ in range(6)]
    groups, current = [], []
    for ids, labels in plain:
        if current and sum(len(e[0]) for e in current) + len(ids) > 96:
            groups.append(current)
            current = []
        current.append((ids, labels))
    from dtune.data.examples import Example

    for batch, group in zip(rows, groups, strict=False):
        ref = packed_example([Example(list(i), list(lab), 0) for i, lab in group])
        n = len(ref.input_ids)
        assert batch["input_ids"][0, :n].tolist() == ref.input_ids and batch["labels"][0, :n].tolist() == ref.labels
        assert batch["position_ids"][0, :n].tolist() == [p for e in group for p in range(len(e[0]))]


def test_streaming_settings_are_checked_at_start(tmp_path: Path):
    base = ["data=jsonl", "data.streaming=true", f"data.source={tmp_path}", "train.max_steps=5", "optim.warmup_steps=0"]
    validate(compose_config(base))
    for extra, needle in [
        (["train.max_steps=null"], r"train\.max_steps: must be set with data\.streaming"),
        (["train.max_steps=null", "train.epochs=2"], r"train\.epochs: not with data\.streaming"),
        ([f"data.mix=[{{path: {tmp_path}/a.jsonl}}]"], r"data\.mix: not with data\.streaming"),
        (["data.source=builtin:rotten_tomatoes"], r"data\.source: data\.streaming reads \.jsonl or \.parquet"),
        (["data.eval_fraction=0.1"], r"data\.eval_fraction: not with data\.streaming"),
        (["data.train_size=32"], r"data\.train_size: not with data\.streaming"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            validate(compose_config([*base, *extra]))


def test_shards_of_a_source_and_workers_per_rank(tmp_path: Path):
    source = write_shards(tmp_path / "shards", "jsonl", (3, 3))
    (source / "notes.txt").write_text("not a shard")
    assert [Path(s.path).name for s in find_shards(str(source))] == ["part-0.jsonl", "part-1.jsonl"]
    assert [Path(s.path).name for s in find_shards(f"{source}/part-1.*")] == ["part-1.jsonl"]
    with pytest.raises(DataError, match=r"data\.source: no \.jsonl or \.parquet shards"):
        find_shards(str(tmp_path / "shards" / "*.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        find_shards(str(tmp_path / "broken.parquet"))
    assert stream_workers(8, local_ranks=4) == 2 and stream_workers(1, local_ranks=4) == 1
    assert 0 <= stream_workers(None, local_ranks=1) <= 4


def test_stop_signals_leave_the_tokenizing_workers_alive(tokenizer, tmp_path: Path):
    """Slurm's SIGTERM (or SIGUSR1, Ctrl-C) reaches every process of the job: the workers ignore it, so the training
    process can finish its step and checkpoint, its stream intact."""
    source = write_shards(tmp_path / "shards", "jsonl")
    straight = samples(sampler(tokenizer, source), 30)
    before = {p.pid for p in psutil.Process().children()}  # other tests' processes (W&B, pools) may still run
    s = sampler(tokenizer, source, workers=2)
    got = samples(s, 2)
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 2
    for worker in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(worker.pid, sig)
    time.sleep(0.2)
    assert all(w.is_running() for w in workers)
    assert got + samples(s, 28) == straight
