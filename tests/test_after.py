"""After training: merge (logits equal base + adapter), generate (streamed, as trained), eval (base vs adapter,
forgetting), and clear errors for adapters that do not fit, missing files and pickled weights."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtune.adapters import load_trained, locate
from dtune.errors import DtuneError
from dtune.train import run
from tests.helpers import compose_config, dtune, tiny_overrides, write_jsonl

SMOKE_TIED = ["debug=smoke", "train.precision=fp32", "lora.target_modules=[q_proj,v_proj,lm_head]"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(compose_config(tiny_overrides(out, "optim.lr=1e-2", "train.max_steps=4")), out)
    return out


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.integration
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_merged_model_gives_the_logits_of_base_plus_adapter(trained_run: Path, tmp_path: Path, dtype: str, tol: float):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = dtune("merge", str(trained_run), "--out", str(out), "--dtype", dtype, "--max-shard-size", "4MB", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = load_trained(locate(trained_run), torch.device("cpu"))  # 4-bit base + adapter, as trained
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, theirs = logits_of(merged, ids), logits_of(reference, ids)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    with reference.disable_adapter():
        assert (logits_of(reference, ids) - theirs).abs().max() > 10 * tol  # the adapter changes the model


@pytest.mark.integration
def test_generate_streams_the_trained_models_greedy_answers(trained_run: Path, tmp_path: Path):
    from dtune.commands.generate import generate
    from dtune.data import Renderer
    from dtune.model import load_tokenizer

    prompts_file = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Is the following movie review positive or negative? Answer with one word.\n\nReview: A joy."},
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        ],
    )
    out = tmp_path / "answers.jsonl"
    proc = dtune(
        "generate", str(trained_run), "--prompts", str(prompts_file), "--max-new-tokens", "5", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in answers][1] == {"messages": [{"role": "user", "content": "Say hi."}]}  # no reference answer
    assert ">>> Say hi." in proc.stdout
    for a in answers:
        assert a["answer"] and a["answer"] in proc.stdout  # streamed as written

    trained = locate(trained_run)  # the same greedy answers, computed here
    model = load_trained(trained, torch.device("cpu"))
    renderer = Renderer(load_tokenizer(trained.cfg), trained.cfg.data)
    assert generate(model, renderer, [a["prompt"] for a in answers], max_new_tokens=5) == [a["answer"] for a in answers]


@pytest.mark.integration
def test_eval_compares_base_and_adapter_on_task_and_general_text(trained_run: Path, tmp_path: Path):
    report = tmp_path / "eval.json"
    proc = dtune("eval", str(trained_run), "--general-rows", "4", "--json", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task" in proc.stdout and "general" in proc.stdout
    got = json.loads(report.read_text())
    results = json.loads((trained_run / "results.json").read_text())
    # The run's own before/after evaluation, reproduced: the same held-out rows, base and base + adapter.
    assert got["task"]["base"]["eval/loss"] == pytest.approx(results["before"]["eval/loss"], rel=1e-4)
    assert got["task"]["adapter"]["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-4)
    assert set(got["general"]["base"]) == {"eval/loss", "eval/ppl"}
    assert got["general"]["adapter"]["eval/loss"] != got["general"]["base"]["eval/loss"]


def dtune_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``dtune <args>`` of an argparse command (merge, generate, eval) run in this process, as ``dtune.cli`` runs it:
    its exit status and output, without a process start (~7 s of imports on 2 cores) per call. The other tests here
    run the real command line."""
    from dtune.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


@pytest.mark.integration
def test_bad_inputs_are_clear_errors(trained_run: Path, tmp_path: Path, capsys, monkeypatch):
    from dtune.assets import resolve_model

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # errors as a user sees them, whatever the caller's environment

    # An adapter made for another base: the built-in SmolLM2 has other layer sizes than the tiny Llama.
    other = dtune_here(
        capsys,
        "generate",
        str(trained_run),
        "--prompt",
        "hi",
        "--base",
        str(resolve_model("builtin:smollm2-135m-instruct")),
    )
    assert other.returncode == 2 and "the adapter was made for another base" in other.stderr

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "adapter", broken)
    (broken / "adapter_model.safetensors").unlink()
    missing = dtune_here(capsys, "merge", str(broken), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and "missing adapter_model.safetensors" in missing.stderr
    assert not (tmp_path / "m").exists()

    torch.save(load_file(trained_run / "adapter" / "adapter_model.safetensors"), broken / "adapter_model.bin")
    pickled = dtune_here(capsys, "generate", str(broken), "--prompt", "hi")
    assert pickled.returncode == 2 and "pickled weights are not loaded" in pickled.stderr and "--allow-pickle" in pickled.stderr
    allowed = dtune_here(capsys, "generate", str(broken), "--prompt", "hi", "--max-new-tokens", "2", "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr[-3000:]

    with pytest.raises(DtuneError, match="no such run"):
        locate(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DtuneError, match="holds no adapter"):
        locate(tmp_path / "empty")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    refused = dtune_here(capsys, "merge", str(trained_run), "--out", str(occupied))
    assert refused.returncode == 2 and "is not empty" in refused.stderr and (occupied / "keep.txt").read_text() == "mine"

    # A hold-out drawn again (another seed) would score rows the adapter trained on as held out.
    redrawn = dtune_here(capsys, "eval", str(trained_run), "data.seed=1", "--general", "")
    assert redrawn.returncode == 2 and "data.seed=1 (trained: 0)" in redrawn.stderr and "data.eval_source" in redrawn.stderr


def test_eval_refuses_overrides_that_would_hold_out_trained_rows():
    """dtune eval draws the held-out rows again from the data settings: overrides that change the draw would put
    trained rows among them (the review found 104 of 200 with data.eval_size=200 on the default job)."""
    from dtune.commands.eval import split_changes
    from dtune.schema import DataConfig, MixSource

    trained = DataConfig(source="a.jsonl", eval_size=50)
    assert split_changes(trained, replace(trained, eval_size=20)) == []  # fewer: a subset of the same shuffle
    assert split_changes(trained, replace(trained, max_seq_len=64, choices=None, system_prompt="x")) == []
    assert split_changes(trained, replace(trained, eval_source="test.jsonl", seed=3)) == []  # named held-out data
    assert split_changes(trained, replace(trained, eval_size=200)) == ["data.eval_size=200: more than training held out (50)"]
    for changed in ({"seed": 1}, {"source": "b.jsonl"}, {"format": "chat"}, {"eval_fraction": 0.1}, {"streaming": True}):
        assert len(split_changes(trained, replace(trained, **changed))) == 1, changed
    mixed = replace(trained, mix=[MixSource("a.jsonl", 1.0), MixSource("b.jsonl", 2.0)], eval_fraction=0.1)
    assert split_changes(mixed, replace(mixed, mix=[MixSource("a.jsonl", 5.0), MixSource("b.jsonl", 1.0)])) == []  # weights
    assert split_changes(mixed, replace(mixed, mix=list(reversed(mixed.mix))))  # the order draws other rows
    assert split_changes(mixed, replace(mixed, eval_fraction=0.05)) == []
    assert split_changes(mixed, replace(mixed, eval_fraction=0.2))
    held = replace(trained, eval_source="test.jsonl")  # training read all of a.jsonl
    assert "trained on every row" in split_changes(held, replace(held, eval_source=None))[0]


def test_generation_stops_where_training_taught_the_answer_to_end(tokenizer):
    from dtune.commands.generate import end_of_turn, render
    from dtune.data import Renderer
    from dtune.schema import DataConfig

    chat = Renderer(tokenizer, DataConfig())
    assert end_of_turn(chat) == "<|im_end|>"  # ChatML's end of turn, which the training labels include
    text, templated = render(chat, "Hi", "Be brief.")
    assert templated and text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    plain = Renderer(tokenizer, DataConfig(format="text"))  # trained on raw text: no template, eos ends it
    assert end_of_turn(plain) is None and render(plain, "Once upon", None) == ("Once upon", False)


@pytest.mark.integration
def test_eval_computes_what_training_measured(family_dir, tmp_path: Path):
    """Fault 7: on Gemma-3 (sliding window, tied embeddings) in bf16, `dtune eval` must load and run the base as
    training did -- the same held-out loss before and after -- and name the rows' real source."""
    from tests.families import chat_rows

    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(40))
    held = write_jsonl(tmp_path / "held.jsonl", chat_rows(8, seed=1))
    out = tmp_path / "run"
    data = ["data=jsonl", f"data.source={train}", f"data.eval_source={held}", "data.format=chat", "data.choices=null"]
    overrides = ["debug=smoke", f"model.name_or_path={family_dir('gemma3')}", "train.precision=bf16", "optim.lr=1e-2", *data]
    results = run(compose_config([*overrides, f"train.output_dir={out}"]), out)
    proc = dtune("eval", str(out), "--general", "", "--json", str(tmp_path / "eval.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "eval.json").read_text())["task"]
    assert figures["base"]["eval/loss"] == pytest.approx(results["before"]["eval/loss"], rel=1e-6)
    assert figures["adapter"]["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-6)
    assert f"8 held-out rows of {held}" in proc.stdout


@pytest.mark.integration
def test_an_adapter_on_a_tied_head_merges_into_what_was_trained(tmp_path: Path):
    """Fault 3: LoRA on lm_head of the tied-embedding default family. The merge must not fold the head's adapter
    into the shared embedding: the merged input embedding is the base's, the head is base + adapter, and the logits
    are base + adapter's."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    trained = dtune("train", *SMOKE_TIED, "optim.lr=1e-2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    proc = dtune("merge", str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    reference = load_trained(locate(out), torch.device("cpu"))
    base = reference.get_base_model()
    assert not json.loads((tmp_path / "merged" / "config.json").read_text()).get("tie_word_embeddings", True)
    torch.testing.assert_close(merged.get_input_embeddings().weight, base.get_input_embeddings().weight.float())
    assert not torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(merged, ids), logits_of(reference, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_a_data_file_changed_since_training_is_refused_by_eval_and_resume(tmp_path: Path, capsys):
    """Rows appended to the training file move the held-out split: eval would score rows the adapter trained on as
    held out, and a resumed run would train on other rows than the checkpoint's order assumed. Both refuse, naming
    the file; a file only touched (same size) passes."""
    from dtune.errors import DataError
    from tests.families import chat_rows

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    out = tmp_path / "run"
    overrides = tiny_overrides(out, "data=jsonl", f"data.source={data}", "data.format=chat", "data.choices=null")
    run(compose_config([*overrides, "train.max_steps=2"]), out)
    original = data.read_text()
    data.write_text(original + "".join(json.dumps(row) + "\n" for row in chat_rows(10, seed=1)))

    refused = dtune_here(capsys, "eval", str(out), "--general", "")
    assert refused.returncode == 2 and f"{data.resolve()}: changed since training" in refused.stderr
    assert "--allow-changed-data" in refused.stderr
    allowed = dtune_here(capsys, "eval", str(out), "--general", "", "--allow-changed-data")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    with pytest.raises(DataError, match=r"changed since training .* resuming from"):
        run(compose_config([*overrides, "train.max_steps=3"]), out)

    data.write_text(original.replace("a", "e", 1))  # edited in place: the same size, other rows
    edited = dtune_here(capsys, "eval", str(out), "--general", "")
    assert edited.returncode == 2 and "edited since training (same size, other content)" in edited.stderr
    data.write_text(original)  # the same rows, a new modification time
    assert dtune_here(capsys, "eval", str(out), "--general", "").returncode == 0
    shutil.rmtree(out / "checkpoints")  # the record in results.json is enough
    data.write_text(original + "\n")
    assert "changed since training" in dtune_here(capsys, "eval", str(out), "--general", "").stderr


def test_generate_reads_prompts_in_every_record_format_without_their_answers(tokenizer, tmp_path: Path):
    """A prompts file holds prompts, not training rows: no answer is needed, a reference answer is left out, and the
    record's system turn and earlier turns stay in the prompt (rendered as training rendered them)."""
    from dtune.commands.generate import read_prompts, render
    from dtune.data import Renderer
    from dtune.errors import DataError
    from dtune.schema import DataConfig

    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"prompt": "plain"},
        {"messages": [system, {"role": "user", "content": "hi"}]},
        {
            "messages": [
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 2+2?"},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the reference answer"}]},
        {"conversations": [{"from": "human", "value": "hey"}]},
        {"instruction": "Translate", "input": "cat"},
        {"prompt": [system, {"role": "user", "content": "conversational"}]},
        {"text": "Once upon"},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows))
    assert prompts[0] == "plain" and prompts[-1] == "Once upon"
    assert prompts[1] == {"messages": [system, {"role": "user", "content": "hi"}]}
    assert [m["content"] for m in prompts[2]["messages"]] == ["1+1?", "2", "and 2+2?"]
    assert prompts[3] == {"messages": [{"role": "user", "content": "q"}]}
    assert prompts[4] == {"messages": [{"role": "user", "content": "hey"}]}
    assert prompts[5] == {"messages": [{"role": "user", "content": "Translate\n\ncat"}]}
    assert prompts[6] == {"messages": [system, {"role": "user", "content": "conversational"}]}
    # ShareGPT's other names of the assistant are answers too; a record's tools and tool-call ids stay
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    sharegpt = {"conversations": [{"from": "human", "value": "hey"}, {"from": "chatgpt", "value": "REFERENCE"}]}
    tool_row = {
        "messages": [
            {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"},
        ],
        "tools": tools,
    }
    named, tooled = read_prompts(write_jsonl(tmp_path / "more.jsonl", [sharegpt, tool_row]))
    assert named == {"messages": [{"role": "user", "content": "hey"}]}
    assert tooled["tools"] == tools and tooled["messages"][-1]["tool_call_id"] == "c1"

    chat = Renderer(tokenizer, DataConfig())
    text, _ = render(chat, prompts[1], "The run's system prompt.")  # the record's own system turn wins
    assert "Be brief." in text and "run's system prompt" not in text and text.endswith("<|im_start|>assistant\n")
    text, _ = render(chat, prompts[2], None)
    assert text.count("<|im_start|>user") == 2 and "the reference answer" not in render(chat, prompts[3], None)[0]
    plain = Renderer(tokenizer, DataConfig(format="text"))
    assert render(plain, prompts[2], None) == ("and 2+2?", False)
    with pytest.raises(DataError, match="prompt 3: this run trained on plain text; the prompt needs a user turn"):
        render(plain, {"messages": [system]}, None, "prompt 3")

    with pytest.raises(DataError, match=r"prompts.jsonl:2: messages\[0\]: role 'robot'"):
        read_prompts(
            write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "robot", "content": "x"}]}])
        )


def test_generate_reads_the_prompt_of_every_training_row_as_training_renders_it(tokenizer, tmp_path: Path):
    """Prompts read from a training file get what training rendered before the answer: a string prompt's tools (they
    were dropped: the model saw no tool list), a prompt given as one message (it was read as an alpaca record and
    refused), and the prompt of a preference or KTO row, its system field and an HH-RLHF transcript's turns too (refused
    or stripped of them)."""
    from dtune.commands.generate import read_prompts, render
    from dtune.data import Renderer
    from dtune.data.formats import row_from_obj
    from dtune.schema import DataConfig
    from tests.families import QWEN2

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    hh = "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: "
    rows = [
        {"prompt": "Weather in Oslo?", "completion": "Cold.", "tools": tools},
        {"prompt": {"role": "user", "content": "Hi"}, "completion": {"role": "assistant", "content": "Hello"}},
        {"prompt": "Capital of Peru?", "system": "Be brief.", "chosen": "Lima.", "rejected": "Cusco."},
        {"chosen": hh + "6", "rejected": hh + "7"},
        {"prompt": "Capital of Peru?", "system": "Be brief.", "completion": "Lima.", "label": True},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "train.jsonl", rows))
    assert prompts[0] == {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools}
    assert prompts[1] == {"messages": [{"role": "user", "content": "Hi"}]}
    peru = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]}
    assert prompts[2] == prompts[4] == peru
    assert [m["content"] for m in prompts[3]["messages"]] == ["2+2?", "4", "and 3+3?"]
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = QWEN2  # with tool support
    renderer = Renderer(tokenizer, DataConfig(choices=None))
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        fmt = "preference" if "chosen" in row else "kto" if "label" in row else "prompt_completion"
        ex = renderer(row_from_obj(row, f"train.jsonl:{i + 1}", fmt))
        assert render(renderer, prompt, None)[0] == tokenizer.decode(ex.input_ids[: ex.prompt_len])
