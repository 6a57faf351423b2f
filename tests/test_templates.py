"""Chat templates of every family, and the formats users bring: what is trained is exactly each assistant turn as
it appears in the final rendering, and every failure names the row."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from dtune.data import Renderer
from dtune.data.formats import row_from_obj
from dtune.data.load import load_data
from dtune.data.sources import BadRows, read_jsonl
from dtune.errors import ConfigError, DataError
from dtune.schema import DataConfig
from tests.families import FAMILIES
from tests.helpers import trained_runs, write_jsonl

PICK = {
    "messages": [
        {"role": "user", "content": "Pick a colour."},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "And a fruit?"},
        {"role": "assistant", "content": "Plum."},
    ]
}
PRIME = {"messages": [{"role": "user", "content": "Name a prime below 10."}, {"role": "assistant", "content": "7"}]}
GREETING = {
    "messages": [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Opening hours?"},
        {"role": "assistant", "content": "9 to 5."},
    ]
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
TOOL_ROW = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "-3 C, snow"},
        {"role": "assistant", "content": "Snowing, -3 C."},
    ],
}


def render(tok, obj, fmt="chat", **cfg):
    return Renderer(tok, DataConfig(format=fmt, choices=None, **cfg))(row_from_obj(obj, "rows.jsonl:1", fmt))


def test_qwen3_template_trains_each_turn_as_finally_rendered(family_tokenizer):
    """Fault 1: the think block on the last turn only, so prefixes do not render as prefixes."""
    tok = family_tokenizer("qwen3")
    assert trained_runs(tok, render(tok, PICK)) == ["Teal.<|im_end|>", "<think>\n\n</think>\n\nPlum.<|im_end|>"]
    assert trained_runs(tok, render(tok, PRIME)) == ["<think>\n\n</think>\n\n7<|im_end|>"]
    # Earlier reasoning is dropped by the template: what is trained is what the sequence holds.
    reasoned = json.loads(json.dumps(PICK))
    reasoned["messages"][1]["content"] = "<think>\nBlue-green.\n</think>\n\nTeal."
    reasoned["messages"][3]["content"] = "<think>\nSomething purple.\n</think>\n\nPlum."
    ex = render(tok, reasoned)
    assert "Blue-green" not in tok.decode(ex.input_ids)
    assert trained_runs(tok, ex) == ["Teal.<|im_end|>", "<think>\nSomething purple.\n</think>\n\nPlum.<|im_end|>"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_trains_answers_and_end_of_turn_only(family_tokenizer, name):
    tok = family_tokenizer(name)
    fam = FAMILIES[name]
    runs = trained_runs(tok, render(tok, PICK))
    assert len(runs) == 2, runs
    assert "Teal." in runs[0] and "Plum." in runs[1] and runs[1].endswith(fam.end_of_turn)
    for run in runs:  # nothing of the user turns or headers
        assert "colour" not in run and "fruit" not in run and "user" not in run


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_and_generate_render_the_prompt_alike(family_tokenizer, name):
    """The tokens before the last answer are the tokens ``dtune generate`` feeds for the same prompt."""
    from dtune.commands.generate import render as generate_render

    tok = family_tokenizer(name)
    system = "Be brief." if FAMILIES[name].system else None
    renderer = Renderer(tok, DataConfig(format="chat", choices=None, system_prompt=system))
    ex = renderer(row_from_obj(PRIME, "p:1", "chat"))
    text, templated = generate_render(renderer, "Name a prime below 10.", system)
    assert templated
    assert tok(text, add_special_tokens=False)["input_ids"] == ex.input_ids[: ex.prompt_len]


def test_a_leading_assistant_turn_is_context_or_a_named_error(family_tokenizer, tokenizer):
    """Fault 2: a conversation opened by the assistant."""
    ex = render(tokenizer, GREETING)  # ChatML takes it: the greeting is context, the answer is trained
    assert trained_runs(tokenizer, ex) == ["9 to 5.<|im_end|>"]
    assert "Hello, how can I help?" in tokenizer.decode(ex.input_ids)
    gemma = family_tokenizer("gemma3")  # roles must alternate from the user: a named, skippable error
    with pytest.raises(DataError, match=r"rows\.jsonl:1: the chat template refuses this conversation: Conversation roles"):
        render(gemma, GREETING)


def test_template_failures_are_skippable_rows(tmp_path: Path, family_tokenizer):
    tok = family_tokenizer("gemma3")
    path = write_jsonl(tmp_path / "rows.jsonl", [PICK, GREETING, PRIME, PICK])
    cfg = DataConfig(source=str(path), format="chat", eval_size=1, choices=None, cache=False, bad_rows="skip")
    train, evals, stats = load_data(cfg, tok)
    assert stats.skipped == 1 and len(train) + len(evals) == 3
    with pytest.raises(DataError, match=r"rows\.jsonl:2: the chat template refuses"):
        load_data(DataConfig(source=str(path), format="chat", eval_size=1, choices=None, cache=False), tok)


@pytest.mark.parametrize("name", ["mistral"])
def test_a_system_prompt_the_template_cannot_take_is_refused_at_start(family_tokenizer, name):
    with pytest.raises(ConfigError, match=r"data\.system_prompt: the chat template takes no system message"):
        Renderer(family_tokenizer(name), DataConfig(system_prompt="Be brief.", choices=None))
    Renderer(family_tokenizer("gemma3"), DataConfig(system_prompt="Be brief.", choices=None))  # folds it: fine


def test_tool_calls_are_trained_and_tool_results_are_not(family_tokenizer):
    tok = family_tokenizer("qwen2")
    ex = render(tok, TOOL_ROW)
    text = tok.decode(ex.input_ids)
    assert '"name": "get_weather"' in text and "<tools>" in text  # the template's own tool rendering
    runs = trained_runs(tok, ex)
    assert len(runs) == 2 and "<tool_call>" in runs[0] and '"city": "Oslo"' in runs[0] and runs[0].endswith("<|im_end|>")
    assert runs[1] == "Snowing, -3 C.<|im_end|>"
    assert all("snow" not in r for r in runs[:1])  # the tool's result is context


def test_a_template_without_tool_support_refuses_tool_rows(family_tokenizer):
    with pytest.raises(DataError, match=r"rows\.jsonl:1: the chat template does not render the row's tools"):
        render(family_tokenizer("phi3"), TOOL_ROW)


def test_sharegpt_rows_render_like_openai_messages(family_tokenizer):
    tok = family_tokenizer("qwen2")
    share = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Pick a colour."},
            {"from": "gpt", "value": "Teal."},
        ],
        "id": "x1",
    }
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Pick a colour."},
            {"role": "assistant", "content": "Teal."},
        ]
    }
    a, b = render(tok, share, "sharegpt"), render(tok, openai)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_content_parts_opt_outs_and_alpaca_history(tokenizer):
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Pick "}, {"type": "text", "text": "one."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Teal."}]},
        ]
    }
    assert trained_runs(tokenizer, render(tokenizer, parts)) == ["Teal.<|im_end|>"]
    opted = json.loads(json.dumps(PICK))
    opted["messages"][1]["train"] = False
    assert trained_runs(tokenizer, render(tokenizer, opted)) == ["Plum.<|im_end|>"]
    alpaca = {"system": "Be brief.", "history": [["Pick a colour.", "Teal."]], "instruction": "And a fruit?", "output": "Plum."}
    ex = render(tokenizer, alpaca, "alpaca")
    assert trained_runs(tokenizer, ex) == ["Teal.<|im_end|>", "Plum.<|im_end|>"]
    assert "Be brief." in tokenizer.decode(ex.input_ids)
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    with pytest.raises(DataError, match=r"rows\.jsonl:1: messages\[0\]: content\[0\] is a 'image_url' part"):
        render(tokenizer, image)


@pytest.mark.parametrize("content", ["", "   \n"])
def test_an_empty_assistant_turn_is_refused_or_skipped(tmp_path: Path, content):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]}
    path = write_jsonl(tmp_path / "e.jsonl", [PRIME, row])
    with pytest.raises(DataError, match=r"e\.jsonl:2: messages\[1\]: the assistant turn is empty"):
        read_jsonl(str(path), "data.source", "chat")
    bad = BadRows("skip")
    assert len(read_jsonl(str(path), "data.source", "chat", bad)) == 1 and bad.count == 1


def test_bom_crlf_and_unknown_keys(tmp_path: Path, tokenizer, caplog):
    path = tmp_path / "win.jsonl"
    lines = [json.dumps({**PRIME, "id": i, "source": "web"}) for i in range(4)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    bad = BadRows()
    rows = read_jsonl(str(path), "data.source", "chat", bad)
    assert len(rows) == 4 and rows[0].messages[1]["content"] == "7"
    assert bad.unknown.counts == {"id": 4, "source": 4}
    cfg = DataConfig(source=str(path), format="chat", eval_size=1, choices=None, cache=False)
    with caplog.at_level(logging.WARNING):
        load_data(cfg, tokenizer)
    assert "does not read were ignored: 'id' 4 times (first at " in caplog.text


def test_generate_reads_prompts_from_every_record_format(tmp_path: Path):
    from dtune.commands.generate import read_prompts

    share = {"conversations": [{"from": "human", "value": "Pick a colour."}, {"from": "gpt", "value": "Teal."}]}
    alpaca = {"instruction": "Name a fruit", "output": "Plum"}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, PRIME, share, alpaca])
    user = lambda text: {"messages": [{"role": "user", "content": text}]}  # noqa: E731 -- the reference answers left out
    assert read_prompts(path) == ["Hi", user("Name a prime below 10."), user("Pick a colour."), user("Name a fruit")]


def test_a_tokenizer_that_prepends_spaces_is_labelled_through_offsets():
    """SentencePiece-style tokenizers (Llama 2, Mistral v0.1) put a space before every separately tokenized text,
    so dtune tokenizes their whole rendering at once; the answer and end of turn are still what is trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.families import MISTRAL

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    spm.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    spm.train_from_iterator(["Pick a colour. Teal. And a fruit? Plum. Name a prime below 10. 7"] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = MISTRAL
    renderer = Renderer(tok, DataConfig(format="chat", choices=None))
    assert not renderer.encoder.piecewise
    ex = renderer(row_from_obj(PICK, "p:1", "chat"))
    assert [r.strip() for r in trained_runs(tok, ex)] == ["Teal.</s>", "Plum.</s>"]
    assert tok.decode(ex.input_ids[: ex.prompt_len], skip_special_tokens=False).endswith("fruit? [/INST]")


VARIED = [
    PICK,
    PRIME,
    GREETING,
    {"messages": [{"role": "system", "content": "Answer in one word. \u00e9\u4e2d"}, *PICK["messages"]]},
    {"messages": [{"role": "user", "content": "  {{ raw }} {% no %}\n\n"}, {"role": "assistant", "content": "\n x \t"}]},
    {"messages": [*PICK["messages"][:2], {**PICK["messages"][2]}, {"role": "assistant", "content": "Fig.", "train": False}]},
    {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "So.", "reasoning_content": "Hm."}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nb"}]},
    TOOL_ROW,
]


def outcome(renderer: Renderer, obj: dict) -> tuple:
    try:
        ex = renderer(row_from_obj(obj, "rows.jsonl:1", "chat"))
    except DataError as err:
        return ("error", str(err))
    return (ex.input_ids, ex.labels, ex.prompt_len)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_plain_messages_render_straight_through_the_template_as_apply_chat_template_does(family_tokenizer, name):
    """The renderer renders plain messages through the compiled template directly (half the time of
    ``apply_chat_template``): for every family it is taken, and each row -- system turns, non-ASCII, Jinja-looking text,
    opted-out turns, roles the template may refuse, reasoning fields and tool calls (which go through
    ``apply_chat_template``) -- gives the same ids, labels and prompt length, or the same error, as without it."""
    tok = family_tokenizer(name)
    for cfg in (DataConfig(format="chat", choices=None), DataConfig(format="chat", choices=None, system_prompt="Be kind.")):
        try:
            direct = Renderer(tok, cfg)
        except ConfigError:  # a template that takes no system message
            continue
        assert direct._direct is not None
        applied = Renderer(tok, cfg)
        applied._direct = None
        for obj in VARIED:
            assert outcome(direct, obj) == outcome(applied, obj), (name, obj)


THINKING_TEMPLATE = (  # reads the name gpt-oss templates read, which apply_chat_template fills from reasoning_content
    "{% for m in messages %}<|{{ m.role }}|>{% if m.thinking is defined %}[{{ m.thinking }}]{% endif %}"
    "{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_messages_apply_chat_template_would_change_are_rendered_by_it():
    """Reasoning is copied by ``apply_chat_template`` under the names other templates read (``thinking``): such rows
    are rendered by it, not straight through the template, which would lose the reasoning."""
    from transformers import AutoTokenizer

    from dtune.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-llama"))
    tok.chat_template = THINKING_TEMPLATE
    direct = Renderer(tok, DataConfig(format="chat", choices=None))
    assert direct._direct is not None
    applied = Renderer(tok, DataConfig(format="chat", choices=None))
    applied._direct = None
    row = VARIED[6]  # an assistant turn with reasoning_content
    assert outcome(direct, row) == outcome(applied, row)
    assert "[Hm.]" in tok.decode(outcome(direct, row)[0])


@pytest.mark.parametrize("piecewise", [True, False])
def test_a_tokenizer_that_appends_eos_gives_untemplated_rows_one_eos(tokenizer, piecewise: bool):
    """Tokenizers with add_eos_token append EOS to every text they encode with special tokens. An untemplated row is
    the prompt, the completion and the eos it is trained to write: the tokenizer's BOS goes in front, its EOS must
    not follow the prompt (where it would be a context token) nor double the trained one, and the prompt's length
    in tokens stays right (eval accuracy and choice scoring read the answer there)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos, eos = "<|im_start|>", tok.eos_token
    tok.bos_token = bos
    ids = {bos: tok.convert_tokens_to_ids(bos), eos: tok.convert_tokens_to_ids(eos)}
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=list(ids.items())
    )
    assert tok("hi")["input_ids"] == [ids[bos], *tok("hi", add_special_tokens=False)["input_ids"], ids[eos]]
    for fmt, record, prompt in [
        ("prompt_completion", {"prompt": "Review: good. Sentiment:", "completion": " positive"}, "Review: good. Sentiment:"),
        ("text", {"text": "Some text."}, ""),
    ]:
        renderer = Renderer(tok, DataConfig(format=fmt, chat_template=False, choices=None))
        renderer.encoder.piecewise = piecewise
        ex = renderer(row_from_obj(record, "r:1", fmt))
        assert ex.input_ids[0] == ids[bos] and ex.input_ids.count(ids[eos]) == 1 and ex.input_ids[-1] == ids[eos], fmt
        assert ex.labels[-1] == ids[eos]
        if prompt:
            assert ex.prompt_len == 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])


def test_openai_string_arguments_render_as_the_object_they_hold(family_tokenizer):
    """OpenAI's API gives tool-call arguments as a JSON string; a template writing them with ``tojson`` wrote that
    string escaped (``"{\\"city\\": ...}"``), and the model learned to emit escaped JSON."""
    tok = family_tokenizer("qwen2")
    as_text = copy.deepcopy(TOOL_ROW)
    as_text["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo"}'
    a, b = render(tok, as_text), render(tok, TOOL_ROW)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert '"arguments": {"city": "Oslo"}' in tok.decode(a.input_ids)


# DeepSeek-V3's template concatenates the arguments into the turn (an object fails there); a template may also print
# them as they are (an object would be written in its Python form).
CONCATENATING = (
    "{{- '<tool_call>' + tc['function']['name'] + '\n```json\n' + tc['function']['arguments'] + '\n```</tool_call>' }}"
)
PRINTING = (
    "{{- '<tool_call>' + tc['function']['name'] + '\n```json\n' }}{{ tc['function']['arguments'] }}{{- '\n```</tool_call>' }}"
)


@pytest.mark.parametrize("call", [CONCATENATING, PRINTING], ids=["concatenating", "printing"])
def test_a_template_that_takes_arguments_as_text_gets_json_text(family_tokenizer, call):
    tok = copy.deepcopy(family_tokenizer("qwen2"))
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' and m.get('tool_calls') %}{{- '<|im_start|>assistant\n' }}"
        "{%- for tc in m['tool_calls'] %}" + call + "{%- endfor %}{{- '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    )
    row = {"messages": copy.deepcopy(TOOL_ROW["messages"])}
    for arguments in ({"city": "Oslo"}, '{"city": "Oslo"}'):
        row["messages"][1]["tool_calls"][0]["function"]["arguments"] = arguments
        runs = trained_runs(tok, render(tok, row))
        assert runs[0] == '<tool_call>get_weather\n```json\n{"city": "Oslo"}\n```</tool_call><|im_end|>'
