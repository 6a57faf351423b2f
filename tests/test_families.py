"""The model matrix: tiny random models of Llama, Qwen2, Qwen3, Gemma-3, Mistral, Phi-3 and Qwen3-MoE, each with its
family's chat template (tests/families.py), through render -> training steps -> merge -> generate."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dtune.model import build_model, layer_projections, load_base
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
    cfg = compose_config(tiny_overrides(tmp_path, f"model.name_or_path={family_dir('phi3')}", f"lora.target_modules={LLAMA_NAMES}"))
    with caplog.at_level(logging.WARNING, logger="dtune.model"):
        model = build_model(cfg, torch.device("cpu"))
    assert adapted(model) == {"o_proj", "down_proj"}
    assert "q_proj, k_proj, v_proj, gate_proj, up_proj match no layer of Phi3ForCausalLM" in caplog.text
    assert "gate_up_proj, qkv_proj get none" in caplog.text
