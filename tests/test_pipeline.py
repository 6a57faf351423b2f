"""The Arrow pipeline (dtune.data.load: records indexed, split by number, tokenized by several processes, memory-mapped)
gives row for row what reading every row into memory and rendering them one by one in order gives: the same samples in
the same order, the same spans and labels, truncation, drops, skips and ignored keys, on every format and file kind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import dtune.data.load as load
import dtune.data.tokenize as tokenize
from dtune.data.render import Renderer, build_examples
from dtune.data.sources import BadRows, split
from dtune.errors import DataError
from dtune.schema import DataConfig, MixSource
from tests.helpers import split_rows, write_jsonl

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "seven",
    "dogs",
    "ran",
    "past",
    "under",
    "grey",
    "skies",
    "and",
    "nobody",
    "said",
    "anything",
    "at",
    "all",
]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_records(fmt: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` records of ``fmt`` of varied length (some longer than 96 tokens), some with keys no format reads."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = i % 7 == 3
        q, a = words(rng, 2, 12), words(rng, 1, 60 if long else 8)
        if fmt == "prompt_completion":
            rec: dict = {"prompt": q, "completion": a}
        elif fmt == "alpaca":
            rec = {"instruction": q, "input": words(rng, 0, 3), "output": a}
            if i % 3 == 0:
                rec["history"] = [[words(rng, 1, 4), words(rng, 1, 4)]]
        elif fmt == "chat":
            rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            if i % 4 == 0:
                rec["messages"] += [{"role": "user", "content": words(rng, 1, 5)}, {"role": "assistant", "content": "ok"}]
            if i % 5 == 0:
                rec["messages"].insert(0, {"role": "system", "content": "Be brief."})
        elif fmt == "sharegpt":
            rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        else:
            rec = {"text": f"{q} {a}"}
        if i % 6 == 1:
            rec["id"] = i  # a key no format reads: counted and warned about
        out.append(rec)
    return out


def reference(cfg: DataConfig, tokenizer) -> tuple[list, list, dict]:
    """Every row read into memory, split, and rendered one by one in order (dtune's data path before the Arrow one)."""
    bad = BadRows(cfg.bad_rows)
    train_rows, eval_rows = split_rows(cfg, bad)
    renderer = Renderer(tokenizer, cfg)
    train = build_examples(train_rows, renderer, "training", bad)
    evals = build_examples(eval_rows, renderer, "evaluation", bad)
    counts = {
        "train_rows": len(train),
        "eval_rows": len(evals),
        "truncated": renderer.stats.truncated,
        "dropped": renderer.stats.dropped,
        "skipped": bad.count,
        "ignored_keys": bad.unknown.summary(),
    }
    return train, evals, counts


def assert_same(cfg: DataConfig, tokenizer, monkeypatch, tmp_path: Path, num_proc: int = 1) -> None:
    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenize, "ROWS_PER_PROC", 8)  # several processes even for a few dozen rows
    cfg.num_proc = num_proc
    want_train, want_eval, counts = reference(cfg, tokenizer)
    train, evals, stats = load.load_data(cfg, tokenizer)
    assert stats.num_proc == (1 if str(cfg.source).endswith(".json") else num_proc)  # a .json array: one process
    for got, want in ((train, want_train), (evals, want_eval)):
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert (g.input_ids, g.labels, g.prompt_len, g.choice_ids, g.gold) == (
                w.input_ids,
                w.labels,
                w.prompt_len,
                w.choice_ids,
                w.gold,
            ), f"sample {i}"
    if cfg.train_size is not None or cfg.mix:  # rows the split does not use are not read, nor their keys counted
        del counts["ignored_keys"], counts["skipped"]
    assert {k: getattr(stats, k) for k in counts} == counts
    again = load.load_data(cfg, tokenizer)  # from the cache: the same
    assert [e.labels for e in again[0]] == [e.labels for e in train]


@pytest.mark.parametrize("fmt", ["prompt_completion", "alpaca", "chat", "sharegpt", "text"])
def test_every_format_tokenizes_as_rendering_row_by_row(fmt, tokenizer, monkeypatch, tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", make_records(fmt, 60))
    src.write_text(src.read_text().replace("\n", "\n\n", 3))  # blank lines are not records
    cfg = DataConfig(source=str(src), format=fmt, eval_size=9, max_seq_len=96, choices=None)
    assert_same(cfg, tokenizer, monkeypatch, tmp_path, num_proc=2 if fmt in ("chat", "text") else 1)


@pytest.mark.parametrize("kind", ["json", "parquet", "saved"])
def test_every_file_kind_tokenizes_as_rendering_row_by_row(kind, tokenizer, monkeypatch, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    recs = make_records("chat", 40)
    for r in recs:
        r.pop("id", None)  # one schema for Parquet and Arrow
    if kind == "json":
        (path := tmp_path / "d.json").write_text(json.dumps(recs))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(recs), path := tmp_path / "d.parquet", row_group_size=7)
    else:
        Dataset.from_list(recs).save_to_disk(str(path := tmp_path / "saved"))
    cfg = DataConfig(source=str(path), format="chat", eval_size=5, max_seq_len=96, overlong="drop", choices=None)
    assert_same(cfg, tokenizer, monkeypatch, tmp_path, num_proc=2)  # each process reads its share of the file


def test_another_template_mixtures_and_the_default_job(family_tokenizer, tokenizer, monkeypatch, tmp_path: Path):
    """Qwen3's template (empty think blocks, earlier turns rewritten), a weighted mixture with per-source hold-out and
    repeats, a fixed held-out file, and the built-in set with answer choices."""
    qwen3 = family_tokenizer("qwen3")
    a = write_jsonl(tmp_path / "a.jsonl", make_records("chat", 30, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_records("alpaca", 12, seed=2))
    mix = [MixSource(str(a), weight=1.0), MixSource(str(b), weight=2.0, format="alpaca")]
    cfg = DataConfig(mix=mix, format="chat", eval_fraction=0.2, max_seq_len=128, choices=None, train_size=50)
    assert_same(cfg, qwen3, monkeypatch, tmp_path / "1", num_proc=2)
    cfg = DataConfig(mix=mix, format="chat", eval_size=6, max_seq_len=128, choices=None, seed=3)
    assert_same(cfg, qwen3, monkeypatch, tmp_path / "2")
    held = write_jsonl(tmp_path / "held.jsonl", make_records("chat", 8, seed=3))
    cfg = DataConfig(source=str(a), eval_source=str(held), format="chat", max_seq_len=128, choices=None)
    assert_same(cfg, qwen3, monkeypatch, tmp_path / "3")
    cfg = DataConfig(source="builtin:rotten_tomatoes", train_size=200, eval_size=40, choices=["positive", "negative"])
    assert_same(cfg, tokenizer, monkeypatch, tmp_path / "4")


def test_bad_rows_are_skipped_where_they_fall_or_stop_the_run(tokenizer, monkeypatch, tmp_path: Path):
    """A record the template or format refuses is counted, named and left out where it falls in the shuffled order
    (data.bad_rows=skip), and with data.bad_rows=error stops the run naming its line, from any process."""
    recs: list = make_records("chat", 40)
    recs[5] = '{"messages": [{"role": "user", "content": "x"}'  # line 6: malformed JSON
    recs[17] = {"messages": [{"role": "assistant", "content": "a greeting"}]}  # line 18: no user turn, nothing to train
    recs[30] = {"messages": "hi"}  # line 31: not a list
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = DataConfig(source=str(src), format="chat", eval_size=6, max_seq_len=96, choices=None, bad_rows="skip", num_proc=2)
    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenize, "ROWS_PER_PROC", 8)
    train, evals, stats = load.load_data(cfg, tokenizer)
    assert stats.skipped == 3 and "d.jsonl:6: malformed JSON" in stats.first_bad
    # Expected: the split drawn over all 40 records, the bad ones then left out where they fall.
    bad_lines = {6, 18, 31}
    lines = list(range(1, 41))
    train_lines, eval_lines = split(cfg, lambda *_: list(lines))
    renderer = Renderer(tokenizer, cfg)
    from dtune.data.formats import row_from_obj

    def render(line: int):
        return renderer(row_from_obj(json.loads(src.read_text().splitlines()[line - 1]), f"{src}:{line}", "chat"))

    for got, want_lines in ((train, train_lines), (evals, eval_lines)):
        want = [render(n) for n in want_lines if n not in bad_lines]
        assert [e.input_ids for e in got] == [e.input_ids for e in want]
    cfg.bad_rows = "error"
    with pytest.raises(DataError, match=r"d\.jsonl:(6|18|31): "):
        load.load_data(cfg, tokenizer)
    assert not list((tmp_path / "cache" / "data").glob("*.tmp-*"))  # the failed build left nothing behind


def test_no_rows_left_and_missing_files_are_clear_errors(tokenizer, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no rows"):
        load.load_data(DataConfig(source=str(blank), choices=None), tokenizer)
    with pytest.raises(DataError, match=r"data\.source: data file not found"):
        load.load_data(DataConfig(source=str(tmp_path / "none.jsonl"), choices=None), tokenizer)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a " * 200, "completion": "b"}] * 5)
    with pytest.raises(DataError, match="no training sample is left"):
        load.load_data(DataConfig(source=str(long), eval_size=1, max_seq_len=32, overlong="drop", choices=None), tokenizer)


def test_without_the_cache_each_process_tokenizes_in_memory(tokenizer, monkeypatch, tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", make_records("prompt_completion", 30))
    cfg = DataConfig(source=str(src), eval_size=4, max_seq_len=256, choices=None, cache=False, packing=True)
    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    train, _evals, stats = load.load_data(cfg, tokenizer)
    assert not (tmp_path / "cache").exists()
    want_train, _, _ = reference(cfg, tokenizer)
    assert stats.packed_rows == len(train) < len(want_train)
    assert sorted(n for e in train for n in e.segments) == sorted(len(e.input_ids) for e in want_train)
    assert stats.tokens == sum(len(e.input_ids) for e in want_train)
    assert 0.5 < stats.pack_fill <= 1.0


RANK_SCRIPT = """
import datetime, logging, os, sys, time
import torch.distributed as dist
from types import SimpleNamespace
from transformers import AutoTokenizer
import dtune.data.load as load
from dtune.schema import DataConfig

source, tokenizer_dir, mode = sys.argv[1:4]
logging.basicConfig(level=logging.INFO)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
rank = dist.get_rank()
real = load.tokenize

def slow_builder(*args, **kwargs):  # a build that takes longer than the process group's timeout
    time.sleep(6)
    if mode == "fail":
        raise OSError("No space left on device (a test)")
    return real(*args, **kwargs)

load.tokenize = slow_builder
load.WAIT_LOG_SECONDS = 2.0
engine = SimpleNamespace(accelerator=SimpleNamespace(is_local_main_process=rank == 0))
try:
    if mode == "barrier":  # the control: a collective wait instead of the file marker
        if rank == 0:
            time.sleep(6)
        dist.barrier()
        train = []
    else:
        train, _, _ = load.load_data(DataConfig(source=source, eval_size=2, choices=None), AutoTokenizer.from_pretrained(tokenizer_dir), engine)
    dist.barrier()  # both ranks alive, the group intact
except Exception as err:
    print(f"rank {rank} failed: {type(err).__name__}: {err}", flush=True)
    time.sleep(3 if rank == 0 else 0)  # torchrun stops every rank once one exits: let rank 1 see the failure first
    os._exit(3)
print(f"rank {rank}: {len(train)} samples", flush=True)
dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.integration
def test_ranks_wait_for_a_slow_builder_past_the_process_group_timeout(tmp_path: Path):
    """The node's other ranks wait for the local main process's tokenization on a file marker, not in a collective:
    a build of 6 s under a process-group timeout of 2 s passes (a barrier in its place times out), the waiting rank
    logs that it waits, and a failed build stops it with the builder's reason instead of leaving it waiting (under a launcher that does not stop the
    other ranks, srun without --kill-on-bad-exit, it would wait for ever)."""
    import subprocess

    from dtune.assets import resolve_model
    from tests.helpers import ENV, torchrun

    src = write_jsonl(tmp_path / "d.jsonl", make_records("prompt_completion", 12))
    (script := tmp_path / "rank.py").write_text(RANK_SCRIPT)
    tokenizer_dir = str(resolve_model("builtin:tiny-llama"))
    env = {**ENV, "DTUNE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}

    def launch(mode: str) -> subprocess.CompletedProcess[str]:
        logs = tmp_path / f"logs-{mode}"
        cmd = [*torchrun(2), "--log-dir", str(logs), "--redirects", "3", str(script), str(src), tokenizer_dir, mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        proc.stdout = "\n".join(p.read_text() for p in sorted(logs.rglob("std*.log")))
        return proc

    control = launch("barrier")
    assert control.returncode != 0 and "rank 1 failed" in control.stdout, control.stdout[-2000:]
    ok = launch("ok")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "rank 0: 10 samples" in ok.stdout and "rank 1: 10 samples" in ok.stdout
    assert "waiting" in ok.stdout and "for the local main process to tokenize" in ok.stdout
    (tmp_path / "cache").rename(tmp_path / "cache-old")  # build again, and fail
    failed = launch("fail")
    assert failed.returncode != 0
    assert "rank 1 failed: DataError: data: the local main process failed to tokenize: OSError: No space left" in (
        failed.stdout
    ), failed.stdout[-3000:]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3"])
def test_the_fast_tokenizer_call_gives_the_tokenizers_ids(family, family_tokenizer):
    """The renderer tokenizes pieces through the Rust tokenizer's encode_batch_fast when its probe agrees with the
    tokenizer: the ids then equal ``tokenizer(texts, add_special_tokens=False)`` on text with special tokens, spaces,
    non-ASCII and digits, for every family (SentencePiece ones included)."""
    tok = family_tokenizer(family)
    renderer = Renderer(tok, DataConfig(choices=None))
    rng = random.Random(0)
    specials = [t for t in (tok.eos_token, tok.bos_token, "<|im_end|>") if t]
    texts = [f"{words(rng, 0, 9)}{rng.choice(specials)}\n\n {rng.randint(0, 999)} é中 {words(rng, 1, 5)}  \t" for _ in range(40)]
    if renderer.encoder.piecewise:
        assert renderer.encoder._fast is not None  # the fast path is taken
    assert renderer.encoder.pieces(texts) == tok(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 24])
def test_jsonl_index_finds_every_line_that_is_not_blank(chunk, monkeypatch, tmp_path: Path):
    """The byte range and number of each line holding more than whitespace, with lines cut across read chunks,
    CRLF ends, blank lines, lines of ASCII or Unicode whitespace or only a byte-order mark, and a last line with or
    without its newline."""
    import dtune.data.records as records

    monkeypatch.setattr(records, "CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(60):
        lines = [
            rng.choice([b"", b"   ", b"\t", b'{"a": 1}', b"x" * rng.randint(1, 40), b"  y \r", b"\r"])
            for _ in range(rng.randint(0, 25))
        ]
        data = b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n"])
        (path := tmp_path / "d.jsonl").write_bytes(data)
        want, at = [], 0
        for number, line in enumerate(data.split(b"\n")[: len(data.split(b"\n")) - data.endswith(b"\n")], start=1):
            if line.decode().removeprefix("\ufeff").strip():  # as the JSONL reader judges a blank line
                want.append((at, at + len(line), number))
            at += len(line) + 1
        ranges, numbers = records.jsonl_index(path)
        assert [(int(a), int(b), int(n)) for (a, b), n in zip(ranges, numbers, strict=True)] == want, data


def test_a_bad_record_stops_every_tokenizing_process_within_a_batch(tokenizer, tmp_path: Path):
    """With data.bad_rows=error the process that meets a bad record leaves its message in the stop file; every other
    process raises it at its next batch (datasets would otherwise let them finish their shares first)."""
    import pickle

    from dtune.data.records import Records

    src = write_jsonl(tmp_path / "d.jsonl", [*make_records("prompt_completion", 4), {"prompt": "no answer"}])
    records = Records(str(src), "data.source", "prompt_completion")
    records.spill(tmp_path)  # what the processes receive: the index's path, not the index
    assert pickle.loads(pickle.dumps(records)).row(0, None).where == f"{src}:1"
    cfg = DataConfig(source=str(src), choices=None)
    fn = tokenize.Tokenize([records], tokenizer, cfg, tmp_path / "stop")
    assert fn({"key": [0, 1]})["status"].to_pylist() == [tokenize.OK, tokenize.OK]
    with pytest.raises(DataError, match=r"d\.jsonl:5: missing field 'completion'"):
        fn({"key": [2, 3, 4]})
    other = pickle.loads(pickle.dumps(fn))  # another process, before its next batch
    with pytest.raises(DataError, match=r"d\.jsonl:5: missing field 'completion'"):
        other({"key": [0]})


def test_a_failure_marker_counts_only_for_its_own_launch(monkeypatch, tmp_path: Path):
    marker = tmp_path / "key.failed-host"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-1")
    marker.write_text(json.dumps({"launch": load.launch_id(), "error": "OSError: disk full"}))
    assert load._failure(marker) == "OSError: disk full"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the workers: the marker is stale
    assert load._failure(marker) is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-2")  # the next launch
    assert load._failure(marker) is None
