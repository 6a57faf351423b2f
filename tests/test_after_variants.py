"""After training, adapter variants whose adapter switched off is not the base: ``dtune eval``'s base column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.families import chat_rows
from tests.helpers import write_jsonl


@pytest.mark.integration
def test_eval_compares_with_the_base_when_the_adapter_trained_its_biases(family_dir, tmp_path: Path):
    """lora.bias=all (or lora_only) trains the base's own bias tensors: PEFT loads them into the base, and switching
    the adapter off keeps them. The base column of dtune eval must be the base's figures, not base + trained biases."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dtune.commands.eval import main

    base_dir = family_dir("qwen2")  # q/k/v biases
    held = write_jsonl(tmp_path / "held.jsonl", chat_rows(4, seed=1))
    data = [f"data.source={held}", f"data.eval_source={held}", "data.format=chat", "data.choices=null"]
    losses = {}
    for bias in ("none", "all"):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias))
        torch.manual_seed(0)  # unseeded unit noise once moved the tiny model's near-uniform loss by 5e-5, under the check
        with torch.no_grad():  # what training does to the trainable biases, large enough to show (the loss moves ~1%)
            for name, param in adapted.named_parameters():
                if name.endswith(".bias") and param.requires_grad:
                    param.add_(10 * torch.randn_like(param))
        adapted.save_pretrained(tmp_path / bias)
        figures = tmp_path / f"{bias}.json"
        main([str(tmp_path / bias), *data, "--base", str(base_dir), "--general", "", "--json", str(figures)])
        losses[bias] = json.loads(figures.read_text())["task"]
    assert losses["all"]["base"]["eval/loss"] == pytest.approx(losses["none"]["base"]["eval/loss"], rel=1e-6)
    assert losses["all"]["adapter"]["eval/loss"] != pytest.approx(losses["all"]["base"]["eval/loss"], rel=1e-3), losses
