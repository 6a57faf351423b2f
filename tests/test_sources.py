"""Data sources: JSONL, JSON, Parquet, save_to_disk folders; mixing by weight; the held-out split."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from dtune.data.sources import read_source
from dtune.errors import DataError
from dtune.schema import DataConfig, MixSource
from tests.helpers import split_rows, write_jsonl


def records(tag: str, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(n)]


def test_every_file_kind_reads_the_same_rows(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    recs = records("x", 5)
    write_jsonl(tmp_path / "d.jsonl", recs)
    (tmp_path / "d.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    expected = [r["completion"] for r in recs]
    for name in ("d.jsonl", "d.json", "d.parquet", "saved"):
        rows = read_source(str(tmp_path / name), "data.source", "prompt_completion")
        assert [r.completion for r in rows] == expected, name
        assert rows[0].messages[0]["content"] == "x question 0"


def test_bad_sources_name_the_file_and_record(tmp_path: Path):
    (tmp_path / "bad.json").write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}]')
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON"):
        read_source(str(tmp_path / "bad.json"), "data.source", "prompt_completion")
    write_jsonl(tmp_path / "lines.json", records("x", 2))  # JSONL named .json: said so, not only "Extra data"
    with pytest.raises(DataError, match=r"lines\.json:2: malformed JSON: Extra data .*name the file \.jsonl"):
        read_source(str(tmp_path / "lines.json"), "data.source", "prompt_completion")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match="must hold a list of records"):
        read_source(str(tmp_path / "obj.json"), "data.source", "prompt_completion")
    (tmp_path / "rec.json").write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "a"}]')
    with pytest.raises(DataError, match=r"rec\.json: record 1: missing field 'completion'"):
        read_source(str(tmp_path / "rec.json"), "data.source", "prompt_completion")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file"):
        read_source(str(tmp_path / "d.csv"), "data.source", "prompt_completion")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        read_source(str(tmp_path / "folder"), "data.source", "prompt_completion")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_source(str(tmp_path / "junk.parquet"), "data.source", "prompt_completion")


def test_mix_follows_the_weights_and_holds_out_from_each_source(tmp_path: Path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", records("a", 100))
    b = write_jsonl(tmp_path / "b.jsonl", records("b", 20))
    cfg = DataConfig(mix=[MixSource(str(a), 3.0), MixSource(str(b), 1.0)], eval_fraction=0.1, train_size=400)
    with caplog.at_level("INFO", logger="dtune.data.sources"):
        train, evals = split_rows(cfg)
    # what each source gave, said (a newcomer had to decode the cache to find repeats and unused rows)
    assert f"{a} 300 (90 rows, each 3.3x); {b} 100 (18 rows, each 5.6x)" in caplog.text
    with caplog.at_level("INFO", logger="dtune.data.sources"):
        split_rows(replace(cfg, train_size=40))
    assert f"{a} 30 (30 of 90 rows: 60 unused)" in caplog.text
    share = Counter(r.completion[0] for r in train)
    assert share == {"a": 300, "b": 100}  # b repeats: its share exceeds its 18 training rows
    assert Counter(r.completion[0] for r in evals) == {"a": 10, "b": 2}
    held = {r.completion for r in evals}
    assert not held & {r.completion for r in train}, "a held-out row leaked into training"
    assert split_rows(cfg)[0] == train  # deterministic for a seed


def test_eval_fraction_and_size(tmp_path: Path):
    src = write_jsonl(tmp_path / "d.jsonl", records("d", 50))
    train, evals = split_rows(DataConfig(source=str(src), eval_fraction=0.2))
    assert (len(train), len(evals)) == (40, 10)
    train, evals = split_rows(DataConfig(source=str(src), eval_size=7))
    assert (len(train), len(evals)) == (43, 7)
    with pytest.raises(DataError, match="leaves none"):
        split_rows(DataConfig(source=str(src), eval_size=50))


def test_a_train_size_beyond_the_data_is_said(tmp_path: Path, caplog):
    src = write_jsonl(tmp_path / "d.jsonl", records("d", 20))
    with caplog.at_level("WARNING", logger="dtune.data.sources"):
        train, _ = split_rows(DataConfig(source=str(src), eval_size=8, train_size=32))
    assert len(train) == 12
    assert f"data.train_size=32, but {src} leaves 12 training rows after 8 held out: training on those" in caplog.text


def test_tokenized_data_is_cached_and_rebuilt_when_inputs_change(tmp_path: Path, tokenizer, monkeypatch):
    import os
    import time

    import dtune.data.load as data

    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "d.jsonl", records("d", 30))
    cfg = DataConfig(source=str(src), eval_size=5, choices=None)
    first = data.load_data(cfg, tokenizer)
    assert len(list((tmp_path / "cache" / "data").glob("*/stats.json"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(data, "tokenize", no_tokenizing)
    again = data.load_data(cfg, tokenizer)
    assert [e.input_ids for e in again[0]] == [e.input_ids for e in first[0]]
    assert [e.labels for e in again[1]] == [e.labels for e in first[1]]
    monkeypatch.undo()
    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    time.sleep(0.01)
    write_jsonl(src, records("e", 30))  # new content: a new key
    os.utime(src)
    changed = data.load_data(cfg, tokenizer)
    assert changed[0][0].input_ids != first[0][0].input_ids
    data.load_data(DataConfig(source=str(src), eval_size=6, choices=None), tokenizer)  # new settings: a new key
    assert len(list((tmp_path / "cache" / "data").glob("*/stats.json"))) == 3
    assert not list((tmp_path / "cache" / "data").glob("*.tmp-*"))  # no build folder left behind


def test_a_mix_source_keeps_its_share_when_tokenization_drops_some_of_its_rows(tmp_path: Path, tokenizer, caplog, monkeypatch):
    """Rows of a mixture source lost at tokenization (longer than data.max_seq_len with data.overlong=drop, or bad) are
    replaced by repeats of that source's good rows: the trained mixture still follows the weights (was: b's share fell
    from 1/2 to 1/3 when half its rows were too long: 40 a, 20 b; silently)."""
    import dtune.data.load as data

    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    a = write_jsonl(tmp_path / "a.jsonl", records("a", 40))
    long_rows = [{"prompt": f"b question {i} " + "very long " * 60 * (i % 2), "completion": f"b answer {i}"} for i in range(40)]
    b = write_jsonl(tmp_path / "b.jsonl", [*long_rows, {"prompt": "no answer"}])
    mix = [MixSource(str(a), 1.0), MixSource(str(b), 1.0)]
    cfg = DataConfig(mix=mix, eval_size=4, train_size=80, choices=None, max_seq_len=64, overlong="drop", bad_rows="skip")
    with caplog.at_level("WARNING", logger="dtune.data.tokenize"):
        train, _, stats = data.load_data(cfg, tokenizer)
    share = Counter(tokenizer.decode(e.input_ids).split("question")[0].strip()[-1] for e in train)
    assert share == {"a": 40, "b": 40} and stats.train_rows == 80 and stats.dropped > 10
    assert all(len(e.input_ids) <= 64 for e in train)
    assert f"of the 40 training samples drawn from {b} were bad, blank or longer than data.max_seq_len" in caplog.text
    assert str(a) not in caplog.text  # a lost nothing
    with pytest.raises(DataError, match=r"data\.mix\[1\]\.path: no training sample of .*c\.jsonl is left"):
        data.load_data(
            replace(cfg, mix=[mix[0], MixSource(str(write_jsonl(tmp_path / "c.jsonl", long_rows[1::2])), 1.0)]), tokenizer
        )


def test_a_mix_refill_is_warned_on_a_cached_load_too_and_not_counted_as_records(tmp_path: Path, tokenizer, caplog, monkeypatch):
    """The warning that a mixture source's lost samples were replaced by repeats comes with every load, the cached one
    too (was: only the build's); the build's log counts the records it tokenized, once each (was: the refills too)."""
    import dtune.data.load as data

    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    a = write_jsonl(tmp_path / "a.jsonl", records("a", 30))
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": f"b {i} " + "long " * 90 * (i % 3 == 0), "completion": "x"} for i in range(12)]
    )
    cfg = DataConfig(mix=[MixSource(str(a), 3.0), MixSource(str(b), 1.0)], train_size=20, eval_size=4, choices=None)
    cfg = replace(cfg, max_seq_len=64, overlong="drop")
    refilled = f"of the 5 training samples drawn from {b} were bad, blank or longer than data.max_seq_len"
    with caplog.at_level("INFO", logger="dtune.data"):
        data.load_data(cfg, tokenizer)  # builds the cache: 20 training and 4 held-out samples, 24 distinct records
        assert refilled in caplog.text
        assert "data: tokenized 24 records" in caplog.text  # (was 26: the 2 refills counted with the 2 dropped)
        caplog.clear()
        _, _, stats = data.load_data(cfg, tokenizer)  # the cached set
    assert refilled in caplog.text and refilled in stats.refilled and "tokenized" not in caplog.text


def test_bad_rows_skip_counts_and_warns(tmp_path: Path, tokenizer, caplog, monkeypatch):
    import dtune.data.load as data

    monkeypatch.setenv("DTUNE_CACHE", str(tmp_path / "cache"))
    src = write_jsonl(tmp_path / "d.jsonl", [*records("d", 12), '{"prompt": "x"', {"prompt": "y"}])
    src.write_bytes(src.read_bytes() + b'{"prompt": "caf\xe9", "completion": "z"}\n')  # line 15: not UTF-8
    with pytest.raises(DataError, match=r"d\.jsonl:13: malformed JSON"):
        data.load_data(DataConfig(source=str(src), eval_size=2, choices=None), tokenizer)
    with caplog.at_level("WARNING"):
        train, evals, stats = data.load_data(DataConfig(source=str(src), eval_size=2, choices=None, bad_rows="skip"), tokenizer)
    assert stats.skipped == 3 and len(train) + len(evals) == 12
    assert "skipped 3 bad rows" in caplog.text and "d.jsonl:13: malformed JSON" in caplog.text


def test_mix_and_fraction_edge_cases_are_clear_errors(tmp_path: Path):
    tiny = write_jsonl(tmp_path / "tiny.jsonl", records("t", 1))
    big = write_jsonl(tmp_path / "big.jsonl", records("b", 5))
    # The pooled hold-out takes 3 of the 6 rows: with some seeds the tiny source's only row, which is refused naming
    # that source; with others a valid split that trains on both sources. Both must happen over these seeds.
    outcomes = set()
    for seed in range(8):
        cfg = DataConfig(mix=[MixSource(str(tiny)), MixSource(str(big))], eval_size=3, seed=seed)
        try:
            train, evals = split_rows(cfg)
        except DataError as err:
            assert f"every row of {tiny} went to evaluation" in str(err)
            outcomes.add("refused")
        else:
            assert len(evals) == 3 and any("tiny.jsonl" in r.where for r in train)
            outcomes.add("split")
    assert outcomes == {"refused", "split"}
    with pytest.raises(DataError, match=r"data\.eval_fraction: 0\.01 of 5 rows"):
        split_rows(DataConfig(source=str(big), eval_fraction=0.01))


def test_parquet_rows_keep_their_own_tool_call_arguments_and_tool_parameters(tmp_path: Path):
    """Arrow gives a struct every key any row's struct has, the others' null: a tool call's arguments came back with
    the other rows' argument names as nulls, and were trained so (``{"city": "Oslo", "query": null}``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from dtune.data.records import Records
    from dtune.data.shards import parse

    def record(name: str, args: dict) -> dict:
        props = {k: {"type": "string"} for k in args}
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        return {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
            "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}],
        }

    recs = [record("weather", {"city": "Oslo"}), record("search", {"query": "x", "limit": "3"})]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "t.parquet")
    Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    table = pq.read_table(tmp_path / "t.parquet").to_pylist()
    for name in ("t.parquet", "saved"):
        source = Records(str(tmp_path / name), "data.source", "chat")
        read = [read_source(str(tmp_path / name), "data.source", "chat"), [source.row(i, None) for i in range(2)]]
        read.append([parse(obj, "t.parquet: row 0", "chat", None) for obj in table])  # the stream's reader
        for rows in read:
            for row, rec in zip(rows, recs, strict=True):
                assert row.messages[1]["tool_calls"] == rec["messages"][1]["tool_calls"], name
                assert row.tools == rec["tools"], name
