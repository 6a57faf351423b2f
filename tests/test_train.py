"""The training path on the tiny random Llama in 4-bit NF4 + LoRA: pinned first losses, exact gradient
accumulation, the completion loss, and the PEFT round trip of the saved adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dtune.data import load_data, train_batches
from dtune.distributed.engine import Engine
from dtune.evaluate import _score_choices
from dtune.loss import CompletionLoss
from dtune.model import build_model, load_tokenizer, pin_cpu_4bit_layout
from dtune.train import accumulate_gradients, run
from tests.helpers import compose_config, tiny_overrides

# First three training losses of `debug=smoke train.precision=fp32 optim.lr=1e-2` (seed 0; a high lr so that
# every step moves the loss well beyond the tolerance). A change here means the data order, rendering, adapter
# init, loss, schedule or optimizer changed: update only when that change is intended.
PINNED_LOSSES = [10.8491, 10.6336, 10.4649]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(tiny_overrides(out, "optim.lr=1e-2"))
    return out, run(cfg, out)


@pytest.mark.integration
def test_seeded_run_pins_its_first_losses(tiny_run):
    out, _ = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-3)


@pytest.mark.integration
def test_run_writes_metrics_results_plot_and_adapter(tiny_run):
    out, results = tiny_run
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1000
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["before"]) == {"eval/loss", "eval/ppl", "eval/accuracy"}
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3]  # eval before, three training steps, eval after


def _tiny_parts(tmp_path: Path, *extra: str):
    cfg = compose_config(tiny_overrides(tmp_path, *extra))
    engine = Engine(cfg)
    tok = load_tokenizer(cfg)
    train_set, eval_set, _ = load_data(cfg.data, tok)
    model = build_model(cfg, engine.device)
    return cfg, engine, tok, train_set, eval_set, model


def test_completion_loss_equals_the_models_own_loss(tmp_path: Path):
    _, _, tok, train_set, _, model = _tiny_parts(tmp_path)
    model.eval()
    batch = next(train_batches(train_set, 4, 0, tok.pad_token_id))
    ours = CompletionLoss(model)(**batch, gather_at=torch.tensor([e - 1 for e in [3, 5, 7, 9]]))
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert float(ours["loss_sum"].sum().detach() / ours["tokens"].sum()) == pytest.approx(float(ref.loss), rel=1e-5)
    torch.testing.assert_close(ours["logits_at"], ref.logits[torch.arange(4), torch.tensor([2, 4, 6, 8])].float())


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path):
    """8 samples as one micro-batch or as 2 x 4 give the same loss and gradients (token-weighted)."""
    _cfg, engine, tok, train_set, _, model = _tiny_parts(tmp_path, "lora.dropout=0.0")
    loss_model = CompletionLoss(model)
    big = next(train_batches(train_set, 8, 0, tok.pad_token_id))
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    grads = []
    for micro in ([big], halves):
        model.zero_grad()
        loss = accumulate_gradients(loss_model, micro, engine)
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_chunked_loss_gives_the_same_loss_and_gradients(tmp_path: Path):
    """Labelled positions in chunks whose logits are recomputed in backward: same per-token losses and gradients."""
    _cfg, _engine, tok, train_set, _, model = _tiny_parts(tmp_path, "lora.dropout=0.0", "data.train_on=all")
    batch = next(train_batches(train_set, 8, 0, tok.pad_token_id))
    results = []
    for chunk in (0, 16):
        model.zero_grad()
        out = CompletionLoss(model, chunk_tokens=chunk)(**batch)
        assert out["tokens"].sum() > 3 * 16  # several chunks
        out["loss_sum"].sum().backward()
        results.append((out["loss_sum"].detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _reference_choice(model, ex) -> int:
    """Summed log-probability of each choice's tokens after the prompt, straight from the model's logits."""
    scores = []
    for ids in ex.choice_ids:
        seq = torch.tensor([ex.input_ids[: ex.prompt_len] + ids])
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
        scores.append(sum(float(logp[ex.prompt_len - 1 + j, t]) for j, t in enumerate(ids)))
    return max(range(len(scores)), key=scores.__getitem__)


@pytest.mark.parametrize("choices", [["positive", "negative"], ["very positive", "very negative"]])
def test_eval_accuracy_matches_full_likelihood_scoring(tmp_path: Path, choices):
    """Distinct first tokens take the one-forward path, a shared first token ("very") full scoring; both must
    agree with a reference computed from the model's own logits (first-token rank decides single-word answers)."""
    from dataclasses import replace

    from dtune.data import Renderer, Row
    from dtune.evaluate import evaluate

    cfg, engine, tok, _, _, model = _tiny_parts(tmp_path)
    renderer = Renderer(tok, replace(cfg.data, choices=choices))
    rows = [
        Row.single(f"Review {i}: the film was {w}.", choices[i % 2], f"x:{i}")
        for i, w in enumerate(["fine", "bad", "ok", "dull"])
    ]
    examples = [renderer(r) for r in rows]
    model.eval()
    with torch.no_grad():
        if choices[0].startswith("very"):
            expected = [_reference_choice(model, ex) for ex in examples]
            assert [_score_choices(CompletionLoss(model), ex, tok.pad_token_id, engine) for ex in examples] == expected
        else:  # first-token decision: compare the first tokens' logits at the last prompt position
            expected = []
            for ex in examples:
                logits = model(input_ids=torch.tensor([ex.input_ids[: ex.prompt_len]])).logits[0, -1]
                expected.append(int(torch.argmax(logits[[ids[0] for ids in ex.choice_ids]])))
        accuracy = sum(int(e == ex.gold) for e, ex in zip(expected, examples, strict=True)) / len(examples)
        metrics = evaluate(CompletionLoss(model), examples, 3, tok.pad_token_id, engine)
    assert metrics["eval/accuracy"] == pytest.approx(accuracy)


def test_trained_adapter_round_trips_through_peft_with_the_same_logits(tmp_path: Path):
    """Train a few steps, save, then load the way a user would (base in 4-bit, PeftModel): same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtune.checkpoint import save_adapter
    from dtune.model import model_dir, quantization_config
    from dtune.optim import build_optimizer

    cfg, engine, tok, train_set, _, model = _tiny_parts(tmp_path, "optim.lr=1e-2")
    loss_model = CompletionLoss(model)
    optimizer = build_optimizer(model, cfg.optim)
    batches = train_batches(train_set, 4, 0, tok.pad_token_id)
    for _ in range(3):
        accumulate_gradients(loss_model, [next(batches)], engine)
        optimizer.step()
        optimizer.zero_grad()
    ids = torch.tensor([[1, 504, 3477, 314, 253, 1345, 28, 2]])

    def logits_of(m) -> torch.Tensor:
        m.eval()
        with torch.no_grad():
            return m(input_ids=ids).logits

    trained = logits_of(model)
    save_adapter(model, tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(model_dir(cfg), quantization_config=quantization_config(cfg), dtype=torch.float32)
    pin_cpu_4bit_layout(base)
    base_logits = logits_of(base)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.peft_config["default"].r == cfg.lora.r
    torch.testing.assert_close(logits_of(loaded), trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, base_logits, atol=1e-3), "training did not move the adapter"


@pytest.mark.integration
def test_run_adapter_is_complete_peft(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtune.model import model_dir

    out, _ = tiny_run
    cfg = compose_config(tiny_overrides(out))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir(cfg)), out / "adapter")
    n_lora = sum(1 for name, _ in loaded.named_parameters() if "lora_" in name)
    assert n_lora == 2 * 7 * 2  # A and B, 7 projections, 2 layers


@pytest.mark.integration
def test_a_16bit_base_stays_16bit_and_trains(tmp_path: Path):
    """quant=none: plain LoRA on a bf16 base. The frozen base keeps its dtype (no 4-bit-style fp32 upcast, which
    doubled its memory), the adapters are fp32 and trainable, and a few steps lower the loss."""
    cfg = compose_config(tiny_overrides(tmp_path, "quant=none", "train.precision=bf16", "optim.lr=1e-2"))
    model = build_model(cfg, torch.device("cpu"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    results = run(cfg, tmp_path)
    assert results["after"]["eval/loss"] < results["before"]["eval/loss"] - 0.05
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_the_run_summary_holds_the_last_and_the_best_evaluation():
    """What W&B's run summary shows: the final evaluation, the step count, the data's counts and the best step."""
    from types import SimpleNamespace

    from dtune.data.examples import DataStats
    from dtune.train.results import final_summary

    results = {
        "after": {"eval/loss": 1.25, "eval/accuracy": 0.5},
        "steps": 12,
        "stopped_early": True,
        "best": {"step": 8, "metric": "eval/loss", "value": 1.0, "adapter": "best_adapter"},
    }
    summary = final_summary(SimpleNamespace(data_stats=DataStats(train_rows=40, eval_rows=8)), results)
    assert summary["final/eval/loss"] == 1.25 and summary["final/eval/accuracy"] == 0.5
    assert summary["final/steps"] == 12 and summary["final/stopped_early"] is True
    assert summary["best/step"] == 8 and summary["best/eval/loss"] == 1.0
    assert summary["data/train_rows"] == 40 and summary["data/eval_rows"] == 8
    del results["best"]
    assert not any(k.startswith("best/") for k in final_summary(SimpleNamespace(data_stats=DataStats()), results))


def _logit_models() -> dict[str, Any]:
    from transformers import (
        CohereConfig,
        FalconH1Config,
        Gemma2Config,
        GraniteConfig,
        LlamaConfig,
    )

    size = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    return {
        "granite": GraniteConfig(**size, **heads, logits_scaling=8.0),
        "cohere": CohereConfig(**size, **heads, logit_scale=0.0625),
        "gemma2": Gemma2Config(**size, **heads, head_dim=8, final_logit_softcapping=2.0),
        "falcon_h1": FalconH1Config(**size, **heads, lm_head_multiplier=0.25, mamba_d_ssm=32, mamba_n_heads=4),
        "llama": LlamaConfig(**size, **heads),
    }


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2", "falcon_h1", "llama"])
def test_the_loss_sees_the_logits_the_models_own_forward_computes(family: str):
    """Granite divides its logits, Cohere and Falcon-H1 scale them, Gemma 2 caps them, each in its own forward: the
    loss (which projects only labelled positions itself) must apply the same, or training runs at another
    temperature than generation and the merged model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_logit_models()[family]).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # logits well away from 0: a missed scale shows in the loss
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
        ours = CompletionLoss(model)(ids, torch.ones_like(ids), labels, gather_at=torch.tensor([5, 9]))
    assert float(ours["loss_sum"].sum() / ours["tokens"].sum()) == pytest.approx(float(ref.loss), rel=1e-4)
    torch.testing.assert_close(ours["logits_at"], ref.logits[torch.arange(2), torch.tensor([5, 9])].float())


def test_a_model_whose_forward_changes_its_logits_unknowingly_is_refused():
    """A scale dtune does not know (another name, remote code) is caught by the first forward, not trained through."""
    from transformers import LlamaForCausalLM

    from dtune.errors import ConfigError

    class Scaled(LlamaForCausalLM):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 4
            return out

    torch.manual_seed(0)
    model = Scaled(_logit_models()["llama"]).eval()
    ids = torch.randint(0, 96, (1, 10))
    loss = CompletionLoss(model)
    with pytest.raises(ConfigError, match="other logits than the model's own forward"):
        loss(ids, torch.ones_like(ids), ids)
    CompletionLoss(LlamaForCausalLM(_logit_models()["llama"]).eval())(ids, torch.ones_like(ids), ids)  # the same passes
