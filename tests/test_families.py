"""The model matrix: tiny random models of Llama, Qwen2, Qwen3, Gemma-3, Mistral, Phi-3 and Qwen3-MoE, each with its
family's chat template (tests/families.py), through render -> training steps -> merge -> generate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dtune.lora import layer_projections
from dtune.model import build_model, load_base
from tests.families import FAMILIES
from tests.helpers import compose_config, tiny_overrides

LLAMA_NAMES = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def adapted(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_adapt_every_projection_of_every_family(family_dir, family, tmp_path: Path):
    cfg = compose_config(tiny_overrides(tmp_path, f"model.name_or_path={family_dir(family)}"))
    model = build_model(cfg, torch.device("cpu"))
    assert adapted(model) == layer_projections(load_base(cfg, torch.device("cpu")))
    assert adapted(model)  # e.g. Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj


def test_a_target_list_for_another_family_is_warned_about(family_dir, tmp_path: Path, caplog):
    cfg = compose_config(
        tiny_overrides(tmp_path, f"model.name_or_path={family_dir('phi3')}", f"lora.target_modules={LLAMA_NAMES}")
    )
    with caplog.at_level(logging.WARNING, logger="dtune.model"):
        model = build_model(cfg, torch.device("cpu"))
    assert adapted(model) == {"o_proj", "down_proj"}
    assert "q_proj, k_proj, v_proj, gate_proj, up_proj match no layer of Phi3ForCausalLM" in caplog.text
    assert "gate_up_proj, qkv_proj get none" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_renders_trains_merges_and_generates(family_dir, family, tmp_path: Path):
    """Each family through the whole path: its template renders the chat rows, 3 QLoRA steps train, merge writes a
    model that verifies (logits) and carries the template and the end-of-turn stop, generate answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtune.adapters import load_trained, locate
    from dtune.commands.generate import generate
    from dtune.commands.merge import merge
    from dtune.data import Renderer
    from dtune.train import run
    from tests.families import chat_rows
    from tests.helpers import write_jsonl

    fam = FAMILIES[family]
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    out = tmp_path / "run"
    overrides = [f"model.name_or_path={family_dir(family)}", "data=jsonl", f"data.source={data}", "data.format=chat"]
    cfg = compose_config(tiny_overrides(out, *overrides, "data.eval_size=4", "data.choices=null", "optim.lr=1e-2"))
    results = run(cfg, out)
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    adapter_tok = AutoTokenizer.from_pretrained(out / "adapter")
    assert adapter_tok.chat_template == fam.template  # the adapter carries the template training used
    assert json.loads((out / "adapter" / "prompt_format.json").read_text())["end_of_turn"] == fam.end_of_turn

    merged_dir = merge(locate(out), tmp_path / "merged", dtype="fp32")
    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert merged_tok.chat_template == fam.template
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    eot = merged_tok.convert_tokens_to_ids(fam.end_of_turn)
    assert eot in merged.generation_config.eos_token_id and merged_tok.eos_token_id in merged.generation_config.eos_token_id

    # A plain transformers generate on the merged model stops at the end-of-turn token (forced at the 3rd token).
    prompt = merged_tok.apply_chat_template(
        [{"role": "user", "content": "Pick a colour."}], add_generation_prompt=True, tokenize=False
    )
    ids = merged_tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]

    class EndAtThird:
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - ids.shape[1] == 2:
                scores[:] = -float("inf")
                scores[:, eot] = 0.0
            return scores

    from transformers import LogitsProcessorList

    out_ids = merged.generate(ids, max_new_tokens=10, do_sample=False, logits_processor=LogitsProcessorList([EndAtThird()]))
    assert out_ids.shape[1] - ids.shape[1] == 3 and int(out_ids[0, -1]) == eot

    trained = locate(out)
    model = load_trained(trained, torch.device("cpu"))
    renderer = Renderer(AutoTokenizer.from_pretrained(out / "adapter"), trained.cfg.data)
    answers = generate(model, renderer, ["Pick a colour."], max_new_tokens=4, precision=trained.cfg.train.precision)
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_family_trains_sharded_on_two_ranks(family_dir, family, engine, tmp_path: Path):
    """Two families (qkv bias and untied head; sliding window and tied embeddings) under 2-rank ZeRO-3 and FSDP2, then
    merged from the checkpoint the sharded run wrote after step 2 (the merge verifies its logits against base +
    adapter, and those against the adapter loaded as trained)."""
    from transformers import AutoModelForCausalLM

    from dtune.adapters import load_trained, locate
    from dtune.commands.merge import merge
    from tests.families import chat_rows
    from tests.helpers import COMMON, run_ok, torchrun, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    out = tmp_path / "run"
    overrides = [
        f"model.name_or_path={family_dir(family)}",
        "data=jsonl",
        f"data.source={data}",
        "data.format=chat",
        "data.choices=null",
    ]
    run_ok(
        [*torchrun(2), "-m", "dtune.train", *COMMON, *overrides, "data.eval_size=4", f"engine={engine}", f"hydra.run.dir={out}"],
        tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"]
    checkpoint = out / "checkpoints" / "step-00000002"
    merged = AutoModelForCausalLM.from_pretrained(
        merge(locate(checkpoint), tmp_path / "merged", dtype="fp32"), dtype=torch.float32
    )
    reference = load_trained(locate(checkpoint), torch.device("cpu"))
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits.float(), rtol=1e-4, atol=1e-4)
