"""Record formats and the loss mask each one gets: only assistant turns by default, everything for text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dtune.data import Renderer
from dtune.data.formats import row_from_obj
from dtune.data.sources import read_jsonl
from dtune.errors import DataError
from dtune.schema import DataConfig
from tests.helpers import trained_runs, write_jsonl


def tool_turn(calls):
    return {"role": "assistant", "content": None, "tool_calls": calls}


def call_with(arguments):
    return tool_turn([{"type": "function", "function": {"name": "f", "arguments": arguments}}])


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    row = row_from_obj(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        "c.jsonl:1",
        "chat",
    )
    ex = Renderer(tokenizer, DataConfig(format="chat", choices=None))(row)
    assert trained_runs(tokenizer, ex) == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert tokenizer.decode(ex.input_ids[: ex.prompt_len]).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_alpaca_and_prompt_completion_render_alike(tokenizer):
    renderer = Renderer(tokenizer, DataConfig(choices=None))
    a = renderer(row_from_obj({"instruction": "Translate", "input": "chat", "output": "cat"}, "a:1", "alpaca"))
    b = renderer(row_from_obj({"prompt": "Translate\n\nchat", "completion": "cat"}, "b:1", "prompt_completion"))
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    no_input = renderer(row_from_obj({"instruction": "Say hi", "output": "hi"}, "a:2", "alpaca"))
    assert "Say hi<|im_end|>" in tokenizer.decode(no_input.input_ids)


def test_text_format_and_train_on_all_label_every_token(tokenizer):
    ex = Renderer(tokenizer, DataConfig(format="text", choices=None))(row_from_obj({"text": "Once upon a time"}, "t:1", "text"))
    assert all(lab == tok for tok, lab in zip(ex.input_ids, ex.labels, strict=True))
    everything = Renderer(tokenizer, DataConfig(train_on="all", choices=None))
    ex = everything(row_from_obj({"prompt": "Q", "completion": "A"}, "p:1", "prompt_completion"))
    assert all(lab == tok for tok, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_builtin_chatml_when_the_tokenizer_has_no_template(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    ex = Renderer(bare, DataConfig(choices=None))(row_from_obj({"prompt": "Q?", "completion": "A."}, "p:1", "prompt_completion"))
    assert bare.decode(ex.input_ids).startswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert trained_runs(bare, ex) == ["A.<|im_end|>"]


@pytest.mark.parametrize(
    "fmt,record,needle",
    [
        ("alpaca", {"instruction": "x"}, ":3: missing field 'output'"),
        ("alpaca", {"instruction": "x", "input": 5, "output": "y"}, ":3: field 'input' must be a string"),
        ("chat", {"messages": []}, ":3: field 'messages' must be a non-empty list"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, ":3: messages[0]: role 'bot' is not one of"),
        ("chat", {"messages": [{"role": "user", "content": "x"}]}, ":3: no assistant message"),
        ("text", {"body": "x"}, ":3: missing field 'text'"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}, call_with("{oops")]},
            ":3: messages[1]: tool_calls[0]: tool call 'f'",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}, call_with("[1]")]},
            ":3: messages[1]: tool_calls[0]: tool call 'f'",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}, tool_turn([{"arguments": {}}])]},
            ":3: messages[1]: tool_calls[0]",
        ),
        (
            "prompt_completion",
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            ":3: field 'completion': a reply is assistant",
        ),
        (
            "prompt_completion",
            {"prompt": [{"role": "assistant", "content": "x"}], "completion": "y"},
            ":3: the prompt must end with a user",
        ),
        ("prompt_completion", {"prompt": [{"role": "user", "content": "q"}]}, ":3: missing field 'completion'"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path: Path, fmt, record, needle):
    good = {
        "prompt_completion": {"prompt": "a", "completion": "b"},
        "alpaca": {"instruction": "a", "output": "b"},
        "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "text": {"text": "a"},
    }[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, record])
    with pytest.raises(DataError) as err:
        read_jsonl(str(path), "data.source", fmt)
    assert f"{path}{needle}" in str(err.value)


def test_tool_calls_a_template_cannot_render_are_refused_not_trained_as_an_empty_answer(tokenizer):
    """No ``tools`` list, and a template without tool-call support (ChatML): the call vanished from the rendering and
    the turn was trained as an immediate end of turn."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages += [{"role": "tool", "content": "-3"}, {"role": "assistant", "content": "Cold."}]
    renderer = Renderer(tokenizer, DataConfig(format="chat", choices=None))
    with pytest.raises(DataError, match=r"c\.jsonl:1: messages\[1\]: the chat template does not render this turn's tool"):
        renderer(row_from_obj({"messages": messages}, "c.jsonl:1", "chat"))
    share = [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f"}'}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(DataError, match="tool calls"):
        renderer(row_from_obj({"conversations": share}, "s.jsonl:1", "sharegpt"))


def test_conversational_prompt_completion_trains_the_completion_only(tokenizer):
    """TRL's conversational prompt-completion rows: the prompt's messages (system, earlier turns) are context, what the
    completion holds is trained -- as a chat row whose earlier answer is opted out."""
    renderer = Renderer(tokenizer, DataConfig(choices=None))
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]}
    ex = renderer(row_from_obj(row, "p.jsonl:1", "prompt_completion"))
    assert trained_runs(tokenizer, ex) == ["4<|im_end|>"]
    chat = [*copy.deepcopy(prompt), {"role": "assistant", "content": "4"}]
    chat[2]["train"] = False
    same = renderer(row_from_obj({"messages": chat}, "c.jsonl:1", "chat"))
    assert (ex.input_ids, ex.labels) == (same.input_ids, same.labels)
    # Either side a string or one message: the same single turn as the plain form.
    plain = renderer(row_from_obj({"prompt": "Q", "completion": "A"}, "p.jsonl:2", "prompt_completion"))
    for mixed in (
        {"prompt": [{"role": "user", "content": "Q"}], "completion": "A"},
        {"prompt": "Q", "completion": {"role": "assistant", "content": "A"}},
    ):
        ex = renderer(row_from_obj(mixed, "p.jsonl:3", "prompt_completion"))
        assert (ex.input_ids, ex.labels) == (plain.input_ids, plain.labels)
