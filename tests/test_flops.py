"""Throughput accounting: FLOP counts of a QLoRA model, attention work of padded and packed batches, MFU reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtune.data import Example, collate
from dtune.flops import FlopCounts, attention_pairs, device_peak_flops
from dtune.model import build_model
from dtune.train import run, throughput
from tests.helpers import compose_config, tiny_overrides


def test_flop_counts_of_the_tiny_qlora_model(tmp_path: Path):
    cfg = compose_config(tiny_overrides(tmp_path))
    model = build_model(cfg, torch.device("cpu"))
    counts = FlopCounts.of(model)
    text = model.get_base_model().config
    h, layers, inter, vocab = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter  # q, k, v, o; gate, up, down
    assert counts.base_linear == layers * per_layer  # 4-bit layers counted as the matrices they stand for
    # LoRA r on each of the 7 projections: r x in (A) + out x r (B).
    r = cfg.lora.r
    lora = layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    assert counts.lora == lora == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.head == vocab * h and counts.layers == layers and counts.attn_dim == q

    step = counts.step(tokens=100, labelled=10, attention_pairs=2 * 50**2)
    attention = 12 * layers * q * 2 * 50**2
    assert step["frozen_base"] == 4 * counts.base_linear * 100 + 6 * lora * 100 + 4 * counts.head * 10 + attention
    assert step["six_n"] == 6 * (counts.base_linear + lora + counts.head) * 100 + attention


def example(n: int) -> Example:
    return Example(input_ids=list(range(1, n + 1)), labels=list(range(1, n + 1)), prompt_len=1)


def test_forwards_without_gradients_count_what_they_run(tmp_path: Path):
    """A preference step's FLOPs include its reference forwards (the base alone: adapters off) unless the reference
    was precomputed, and KTO's forwards of the KL rows (policy and reference); SFT, ORPO and SimPO have none."""
    from dtune.train.step import step_counts

    counts = FlopCounts.of(build_model(compose_config(tiny_overrides(tmp_path)), torch.device("cpu")))
    forward = counts.forward(tokens=10, labelled=4, attention_pairs=36, adapters=False)
    assert forward == 2 * counts.base_linear * 10 + 2 * counts.head * 4 + 4 * counts.layers * counts.attn_dim * 36
    assert counts.forward(10, 4, 36, adapters=True) == forward + 2 * counts.lora * 10
    plain = counts.step(100, 10, 2500)
    both = counts.step(100, 10, 2500, reference=(10, 4, 36), policy_scored=(10, 4, 36))
    assert both["frozen_base"] - plain["frozen_base"] == both["six_n"] - plain["six_n"] == 2 * forward + 2 * counts.lora * 10

    def pair(prompt: int, chosen: int, rejected: int, ref=None) -> Example:
        def row(n):
            return Example(list(range(1, prompt + n + 1)), [-100] * prompt + list(range(n)), prompt)

        return Example(**{**vars(row(chosen)), "rejected": row(rejected), "ref_logps": ref})

    dpo = collate([pair(3, 2, 4), pair(2, 5, 1)], pad_id=0)  # rows: 5, 7 chosen; 7, 3 rejected tokens
    rows = [22, 2 + 5 + 4 + 1, 5**2 + 7**2 + 7**2 + 3**2]  # labelled: the replies' tokens
    assert step_counts(dpo, "dpo") == [*rows, *rows, 0, 0, 0, 4]
    for free in ("orpo", "simpo", "sft"):
        assert step_counts(dpo, free) == [*rows, 0, 0, 0, 0, 0, 0, 4]
    precomputed = collate([pair(3, 2, 4, ref=(-1.0, -2.0)), pair(2, 5, 1, ref=(-1.0, -2.0))], pad_id=0)
    assert step_counts(precomputed, "dpo") == [*rows, 0, 0, 0, 0, 0, 0, 4]

    kto_rows = [Example(**{**vars(pair(3, n, 1)), "rejected": None, "desirable": n > 2}) for n in (2, 4)]
    kto = collate(kto_rows, pad_id=0)  # KL rows: each prompt (3) followed by the other row's reply (4, then 2)
    own, kl = [5 + 7, 2 + 4, 5**2 + 7**2], [7 + 5, 4 + 2, 7**2 + 5**2]
    assert step_counts(kto, "kto") == [*own, *(a + b for a, b in zip(own, kl, strict=True)), *kl, 2]


def test_attention_pairs_of_padded_and_packed_batches():
    assert attention_pairs(collate([example(3), example(5)], pad_id=0)) == 3**2 + 5**2
    packed = Example(input_ids=list(range(1, 9)), labels=list(range(1, 9)), prompt_len=1, segments=[3, 5])
    short = Example(input_ids=list(range(1, 5)), labels=list(range(1, 5)), prompt_len=1, segments=[4])  # padded to 8
    assert attention_pairs(collate([packed, short], pad_id=0)) == 3**2 + 5**2 + 4**2


def test_mfu_needs_a_known_peak():
    flops = {"frozen_base": 4e12, "six_n": 8e12}
    assert throughput(flops, elapsed=2.0, devices=2, peak=None) == {"train/tflops_per_device": 1.0}
    got = throughput(flops, elapsed=2.0, devices=2, peak=4e12)
    assert got["train/mfu"] == pytest.approx(0.25) and got["train/mfu_6n"] == pytest.approx(0.5)
    assert device_peak_flops("bf16", override_tflops=989.0) == 989e12
    if not torch.cuda.is_available():
        assert device_peak_flops("bf16") is None  # a CPU has no entry: MFU is not reported


@pytest.mark.integration
def test_run_reports_throughput_mfu_and_peak_memory(tmp_path: Path):
    cfg = compose_config(tiny_overrides(tmp_path, "train.peak_tflops=0.5"))
    results = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    for r in steps:
        assert r["train/tokens_per_s_per_device"] > 0 and r["train/tflops_per_device"] > 0
        assert r["train/mfu"] == pytest.approx(r["train/tflops_per_device"] / 0.5)
        assert r["train/mfu_6n"] > r["train/mfu"]  # the head at every position, weight gradients of the base
        assert r["train/peak_mem_gib"] > 0
    assert results["peak_memory"]["bytes"] > 0 and results["peak_memory"]["kind"] in ("cpu_max_rss", "cuda_max_allocated")
    assert results["tokens_per_s_per_device"] > 0
