"""Reading, rendering, masking and batching prompt/completion data; every bad input names its file and line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dtune.data import IGNORE, Renderer, collate, train_batches
from dtune.data.sources import read_jsonl, rotten_tomatoes
from dtune.errors import DataError
from dtune.schema import DataConfig
from tests.helpers import split_rows, write_jsonl

GOOD = {"prompt": "What is 2+2?", "completion": "4"}


def test_jsonl_rows_are_read_with_their_location(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {"prompt": "Hi", "completion": "Hello"}])
    rows = read_jsonl(str(path), "data.source")
    assert [r.completion for r in rows] == ["4", "Hello"]
    assert rows[1].where == f"{path}:3"  # the blank line 2 is skipped but counted


@pytest.mark.parametrize(
    "lines,needle",
    [
        ([GOOD, '{"prompt": "x", "completion": '], ":2: malformed JSON"),
        ([GOOD, GOOD, {"prompt": "x"}], ":3: missing field 'completion'"),
        ([{"prompt": 3, "completion": "y"}], ":1: field 'prompt' must be a string"),
        ([["prompt", "completion"]], ":1: expected a JSON object"),
        ([{"prompt": "x", "completion": "  "}], ":1: field 'completion' is empty"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, lines, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_jsonl(str(path), "data.source")
    assert str(path) + needle in str(err.value)


def test_missing_empty_and_undecodable_files(tmp_path: Path):
    with pytest.raises(DataError, match=r"data.source: data file not found: .*nope.jsonl"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "data.source")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        read_jsonl(str(tmp_path / "empty.jsonl"), "data.source")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not valid UTF-8"):
        read_jsonl(str(tmp_path / "latin1.jsonl"), "data.source")


def test_rotten_tomatoes_is_balanced_real_text():
    rows = rotten_tomatoes()
    assert len(rows) > 10_000
    assert Counter(r.completion for r in rows[:200]) == {"positive": 100, "negative": 100}
    assert all("Review: " in r.messages[0]["content"] and len(r.messages[0]["content"]) > 60 for r in rows[:50])


def test_split_holds_out_eval_rows_disjoint_from_training():
    train, evals = split_rows(DataConfig(eval_size=64, train_size=100))
    assert len(train) == 100 and len(evals) == 64
    assert not {r.where for r in train} & {r.where for r in evals}


def test_only_the_completion_and_end_of_turn_are_labelled(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    ex = renderer(Row.single("Is this good?", "positive", "t:1"))
    labelled = [t for t in ex.labels if t != IGNORE]
    assert tokenizer.decode(labelled) == "positive<|im_end|>"
    # Labels are the inputs at labelled positions, and the first one follows the prompt.
    assert ex.labels[ex.prompt_len] != IGNORE and all(x == IGNORE for x in ex.labels[: ex.prompt_len])
    assert tokenizer.decode(ex.input_ids[: ex.prompt_len]).endswith("<|im_start|>assistant\n")


def test_plain_rendering_without_chat_template(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(chat_template=False, choices=None))
    ex = renderer(Row.single("2+2=", "4", "t:1"))
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE]) == "4" + tokenizer.eos_token
    assert tokenizer.decode(ex.input_ids[: ex.prompt_len]) == "2+2="


def test_choices_give_gold_index_and_candidate_tokens(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(choices=["positive", "negative"]))
    ex = renderer(Row.single("Good film?", "negative", "t:1"))
    assert ex.gold == 1
    assert [tokenizer.decode(ids) for ids in ex.choice_ids] == ["positive<|im_end|>", "negative<|im_end|>"]
    with pytest.raises(DataError, match=r"t:2: completion 'meh' is not one of data.choices"):
        renderer(Row.single("Good film?", "meh", "t:2"))


def test_overlong_samples_are_truncated_dropped_or_refused(tokenizer):
    from dtune.data import Row

    long_prompt = Row.single("word " * 100, "yes", "f.jsonl:7")
    short = Row.single("hi", "yes " * 40, "f.jsonl:8")
    trunc = Renderer(tokenizer, DataConfig(max_seq_len=64, overlong="truncate", choices=None))
    assert trunc(long_prompt) is None  # truncating would cut off every completion token: dropped, counted
    ex = trunc(short)
    assert ex is not None and len(ex.input_ids) == 64
    assert (trunc.stats.truncated, trunc.stats.dropped) == (1, 1)
    drop = Renderer(tokenizer, DataConfig(max_seq_len=64, overlong="drop", choices=None))
    assert drop(short) is None and drop.stats.dropped == 1
    strict = Renderer(tokenizer, DataConfig(max_seq_len=64, overlong="error", choices=None))
    with pytest.raises(DataError, match=r"f.jsonl:8: \d+ tokens exceeds data.max_seq_len=64"):
        strict(short)


def test_collate_pads_right_and_masks(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    a, b = renderer(Row.single("a", "b", "x:1")), renderer(Row.single("a much longer prompt here", "b", "x:2"))
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids) :] == IGNORE).all()


def test_batch_order_is_a_function_of_seed_and_epoch(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    examples = [renderer(Row.single(f"prompt {i}", str(i), f"x:{i}")) for i in range(10)]

    def first_ids(seed: int, n: int) -> list[list[int]]:
        it = train_batches(examples, 4, seed, 0)
        return [next(it)["input_ids"].tolist() for _ in range(n)]

    assert first_ids(0, 5) == first_ids(0, 5)
    assert first_ids(0, 5) != first_ids(1, 5)
    with pytest.raises(DataError, match=r"train\.micro_batch_size"):
        next(train_batches(examples, 11, 0, 0))


def test_ranks_split_each_step_like_accumulation_on_one_rank(tokenizer):
    """2 ranks x 1 micro-batch see exactly the samples of 1 rank x 2 micro-batches, step after step."""
    from dtune.data import Row, StepSampler

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    examples = [renderer(Row.single(f"prompt {i}", str(i), f"x:{i}")) for i in range(21)]

    def ids(batches) -> list[list[int]]:
        return [row for b in batches for row in b["input_ids"].tolist()]

    one = StepSampler(examples, 4, 2, seed=3, pad_id=0)
    ranks = [StepSampler(examples, 4, 1, seed=3, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # crosses an epoch boundary (21 samples, 8 per step)
        assert ids(next(one)) == ids(next(ranks[0])) + ids(next(ranks[1]))


def test_micro_batches_of_a_step_are_grouped_by_length(tokenizer):
    """A step's samples are those of the seeded order, regrouped shortest first into micro-batches that the ranks
    take in turn: less padding than the order's own micro-batches, the same step on 1 rank or 2."""
    from dtune.data import Row, StepSampler

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    examples = [renderer(Row.single("word " * (i * 7 % 23), str(i), f"x:{i}")) for i in range(48)]

    def rows(batch) -> list[tuple[int, ...]]:
        return [tuple(r[: int(m.sum())]) for r, m in zip(batch["input_ids"].tolist(), batch["attention_mask"], strict=True)]

    one = StepSampler(examples, 4, 4, seed=1, pad_id=0)
    ranks = [StepSampler(examples, 4, 2, seed=1, pad_id=0, rank=r, world_size=2) for r in range(2)]
    padded = unsorted = 0
    for index in range(3):
        order = one.order(0)[index * 16 : (index + 1) * 16]
        micro = next(one)
        assert sorted(r for b in micro for r in rows(b)) == sorted(tuple(examples[i].input_ids) for i in order)
        widths = [b["input_ids"].shape[1] for b in micro]
        assert widths == sorted(widths)
        padded += sum(b["input_ids"].numel() for b in micro)
        unsorted += sum(4 * max(len(examples[i].input_ids) for i in order[j : j + 4]) for j in range(0, 16, 4))
        r0, r1 = next(ranks[0]), next(ranks[1])
        assert [rows(b) for b in (r0[0], r1[0], r0[1], r1[1])] == [rows(b) for b in micro]
    assert padded < unsorted


def test_sampler_resumes_with_the_next_step_on_another_world_size(tokenizer):
    """The position is state: resume after step k gives step k+1 (not step 1 again), also from 2 ranks to 1."""
    from dtune.data import Row, StepSampler

    renderer = Renderer(tokenizer, DataConfig(choices=None))
    examples = [renderer(Row.single(f"prompt {i}", str(i), f"x:{i}")) for i in range(21)]

    def ids(batches) -> list[list[int]]:
        return [row for b in batches for row in b["input_ids"].tolist()]

    straight = StepSampler(examples, 4, 2, seed=5, pad_id=0)
    expected = [ids(next(straight)) for _ in range(7)]
    ranks = [StepSampler(examples, 4, 1, seed=5, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # 3 steps on 2 ranks
        for r in ranks:
            next(r)
    resumed = StepSampler(examples, 4, 2, seed=5, pad_id=0)
    resumed.load_state_dict(ranks[0].state_dict())
    assert [ids(next(resumed)) for _ in range(4)] == expected[3:]
    other = StepSampler(examples, 4, 1, seed=5, pad_id=0)  # another global batch: refused, not silently shifted
    with pytest.raises(DataError, match=r"samples_per_step=8, this run has 4 \(.*: train\.grad_accum_steps=2 with micro_batch"):
        other.load_state_dict(resumed.state_dict())


def test_truncated_rows_keep_prompt_len_inside_the_row(tokenizer):
    from dtune.data import Row

    renderer = Renderer(tokenizer, DataConfig(max_seq_len=16, train_on="all", choices=None))
    ex = renderer(Row.single("word " * 50, "yes", "f.jsonl:1"))
    assert len(ex.input_ids) == 16 and ex.prompt_len <= 16


def test_chat_template_refusals_name_the_row(tokenizer):
    import copy

    from dtune.data import Row
    from dtune.errors import ConfigError

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match=r"data\.system_prompt: the chat template takes no system message"):
        Renderer(strict, DataConfig(system_prompt="Be brief.", choices=None))  # refused once, at start
    with pytest.raises(DataError, match=r"c\.jsonl:4: the chat template refuses this conversation: no system"):
        Renderer(strict, DataConfig(choices=None))(Row.single("hi", "yo", "c.jsonl:4", system="Be brief."))


def test_padding_is_measured_as_the_sampler_batches():
    """StepSampler.padding() is the padded fraction of the positions of the epoch's collated micro-batches."""
    from dtune.data import Example, StepSampler

    rng = __import__("random").Random(0)
    examples = [Example(list(range(n)), list(range(n)), 1) for n in (rng.randint(3, 40) for _ in range(37))]
    sampler = StepSampler(examples, 3, 2, seed=5, pad_id=0, rank=0, world_size=2)
    peers = StepSampler(examples, 3, 2, seed=5, pad_id=0, rank=1, world_size=2)
    real = total = 0
    for _ in range(sampler.steps_per_epoch):
        for batch in [*next(sampler), *next(peers)]:
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
    assert sampler.padding() == pytest.approx(1 - real / total)
    assert 0 < sampler.padding() < 0.5
