"""`dtune plan`: predicted per-GPU memory against the memory a run really holds, and the plan from a config alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtune.loss import CompletionLoss
from dtune.model import build_model
from dtune.plan import VALIDATION_GRID, fit, make_plan, measure
from dtune.plan.shape import parameter_bytes, skeleton
from dtune.units import GiB, parse_bytes
from tests.families import FAMILIES
from tests.helpers import ENV, SMOKE, compose_config

# Big models on the default model group, which turns gradient checkpointing off for its 135M model: set it back on
# as a user of an 8B or 70B would (the README's and sbatch scripts' examples do). Also where the loss must dominate
# the peak (with every layer's activations kept, the chunked loss's saving is a smaller part of it).
BIG = ["logger=none", "model.gradient_checkpointing=true"]
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


@pytest.mark.integration
@pytest.mark.parametrize("overrides", [o for _, o in VALIDATION_GRID], ids=[n for n, _ in VALIDATION_GRID])
def test_predicted_peak_is_within_ten_percent_of_the_measured_one(overrides: list[str]):
    """The run's real peak of live tensor bytes (two optimizer steps, counted at the dispatcher on the CPU)."""
    cfg = compose_config(["logger=none", *overrides])
    predicted = make_plan(cfg, world_size=1).peak
    (measured,) = measure(cfg).values()
    assert measured == pytest.approx(predicted, rel=0.10), (
        f"measured {measured / GiB:.3f} GiB, predicted {predicted / GiB:.3f} GiB"
    )


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT, on Qwen3-MoE
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_is_planned_with_the_adapters_peft_makes(family_dir, name: str):
    """What ``dtune plan --gpu-mem`` runs (fit), on each family's tiny model: Gemma 3's per-layer-type rotary
    embeddings and tied head, Qwen2's qkv bias, Qwen3's q/k norms, Phi-3's fused qkv_proj and gate_up_proj (which the
    default targets do not name), Qwen3-MoE's experts fused into 3-D parameters (PEFT targets them as parameters)."""
    cfg = compose_config(["logger=none", f"model.name_or_path={family_dir(name)}", "data.max_seq_len=128"])
    plan, largest, _ = fit(cfg, 1, 8 * GiB)
    assert all(size > 0 for part, size in plan.components.items() if part != "gathered shards"), plan.components
    assert plan.needed > plan.peak > 0 and largest >= cfg.train.micro_batch_size
    probe = plan.extra["probe"]
    assert probe["backward_peak_per_token"] >= probe["saved_per_token"] > 0

    model = build_model(cfg, torch.device("cpu"))  # the adapters and the frozen base a run trains
    assert plan.extra["lora_params"] == model.get_nb_trainable_parameters()[0]
    seen: set[int] = set()
    other = packed = 0
    for param_name, p in model.named_parameters():
        if id(p) not in seen and not p.requires_grad:
            seen.add(id(p))
            four_bit = type(p).__name__ == "Params4bit" or param_name.endswith("_nf4")  # linear layers; MoE experts
            packed += p.numel() * p.element_size() if four_bit else 0
            other += 0 if four_bit else p.numel() * p.element_size()
    assert plan.components["base (other)"] == other  # embeddings (tied or not), norms, biases, routers: bf16
    planned = parameter_bytes(cfg, skeleton(cfg)[0])
    assert planned["base_4bit"] - planned["base_4bit_constants"] == packed  # the experts' packed bytes included


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_frozen_base_keeps_the_compute_dtype_and_its_bytes_are_planned(precision: str):
    """Not PEFT's fp32 upcast: embeddings, norms and head of a 4-bit base stay in the compute dtype, and the residual
    stream is still fp32 (the embeddings' output is cast), as are the logits the loss takes. The plan counts the
    frozen bytes the built model holds: the packed weights (their constants are no parameters) and the rest."""
    cfg = compose_config([*SMOKE, f"train.precision={precision}"])
    model = build_model(cfg, torch.device("cpu"))
    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    packed = other = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name  # the adapters
        elif type(p).__name__ == "Params4bit":
            packed += p.numel() * p.element_size()
        else:
            assert p.dtype == compute, name
            other += p.numel() * p.element_size()
    planned = parameter_bytes(cfg, skeleton(cfg)[0])
    assert planned["base_other"] == other > 0
    assert planned["base_4bit"] - planned["base_4bit_constants"] == packed > 0

    base = model.get_base_model()
    ids = torch.tensor([[1, 2, 3]])
    assert base.get_input_embeddings()(ids).dtype == torch.float32  # the residual stream
    hidden = torch.randn(3, base.config.hidden_size)
    assert CompletionLoss(model).logits(hidden.to(compute)).dtype == torch.float32


LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64}


def test_fsdp2_offload_is_planned_and_proposed_for_a_70b_on_two_24gb_gpus(tmp_path: Path, monkeypatch):
    """QLoRA of a Llama-3-70B shape on 2 x 24 GiB, 2 x 512 tokens: fsdp2 does not fit (~half the 35 GB packed base
    per GPU, plus embeddings and head); with fsdp2_offload the GPU holds the units in flight, the quantization
    constants and the activations. The activation probe is replaced by fixed per-token figures (probing a
    70B-sized layer takes minutes on a CPU); the engine's terms are what this checks."""
    from dtune.plan import memory
    from dtune.plan.shape import skeleton

    monkeypatch.setattr(memory, "probe_activations", lambda *a: {"saved_per_token": 2e5, "backward_peak_per_token": 4e5})
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    base = [*BIG, f"model.name_or_path={tmp_path}", "data.max_seq_len=512", "train.micro_batch_size=2"]
    shape = skeleton(compose_config(base))
    fsdp2 = make_plan(compose_config([*base, "engine=fsdp2"]), world_size=2, shape=shape)
    offload = make_plan(compose_config([*base, "engine=fsdp2_offload"]), world_size=2, shape=shape)
    assert fsdp2.needed > 24 * GiB >= offload.needed
    packed = "base (packed 4-bit + constants)"
    linear = 80 * (8192 * (8192 + 1024 + 1024 + 8192) + 3 * 8192 * 28672)
    constants = offload.components[packed]  # one uint8 absmax per 64 weights, + fp32 absmax per 256 blocks, codes
    assert linear / 64 < constants < linear / 64 * 1.02
    assert fsdp2.components[packed] == pytest.approx((linear / 2) / 2 + constants, rel=1e-6)
    for part in ("base (other)", "LoRA parameters", "LoRA gradients", "optimizer states"):
        assert offload.components[part] == 0, part
    assert offload.components["gathered shards"] == fsdp2.components["gathered shards"] > 0
    assert offload.settings["engine"] == "fsdp2_offload"
    one_gpu = make_plan(compose_config([*base, "engine=fsdp2_offload"]), world_size=1, shape=shape)
    assert one_gpu.components["gathered shards"] == offload.components["gathered shards"]  # copied in on one rank too

    _, _, ideas = fit(compose_config(base), 2, 24 * GiB)  # from the default engine (ddp)
    assert "engine=fsdp2_offload" in ideas and "engine=fsdp2" not in ideas


@pytest.fixture
def llama_8b(tmp_path: Path) -> Path:
    """A Llama-3-8B-shaped model directory holding nothing but its config.json."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


@pytest.mark.integration  # probes an 8B-sized decoder layer on the CPU: about a minute
def test_an_8b_plan_from_its_config_alone(llama_8b: Path):
    base = [*BIG, f"model.name_or_path={llama_8b}", "data.max_seq_len=2048", "train.micro_batch_size=4"]
    one = make_plan(compose_config(base), world_size=1)
    packed = one.components["base (packed 4-bit + constants)"]
    linear = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)  # all decoder linears, head excluded
    assert linear * 0.5 < packed < linear * 0.53  # 4 bits + double-quant constants (~0.127 bits) per weight
    assert one.components["base (other)"] >= 2 * 128256 * 4096 * 2  # embeddings and untied head, bf16
    assert one.components["activations (kept)"] == 32 * 4 * 2048 * 4096 * 4  # fp32 layer inputs (checkpointing)

    sharded = make_plan(compose_config([*base, "engine=zero3"]), world_size=8)
    assert sharded.components["base (packed 4-bit + constants)"] == packed // 8
    n_lora = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    assert one.components["optimizer states"] == 8 * n_lora  # Adam's two fp32 moments
    assert sharded.components["optimizer states"] == 12 * n_lora // 8  # + DeepSpeed's fp32 masters, over 8 ranks
    offload = make_plan(compose_config([*base, "engine=zero3_offload"]), world_size=8)
    assert offload.components["optimizer states"] == 0 and offload.components["base (packed 4-bit + constants)"] == 0
    no_ckpt = make_plan(compose_config([*base, "model.gradient_checkpointing=false"]), world_size=1)
    assert no_ckpt.components["activations (kept)"] > 5 * one.components["activations (kept)"]

    # Layer phase over the loss (small loss chunks): bitsandbytes' dequantized weight (the largest, 14336x4096 in
    # bf16) is in it, the fused kernels' is not.
    layer_bound = [*base, "train.loss_chunk_tokens=512"]
    bnb, fused = (make_plan(compose_config([*layer_bound, *q]), 1) for q in ([], ["quant=nf4_triton"]))
    peak = "activations (peak phase)"
    assert bnb.components[peak] - fused.components[peak] == 14336 * 4096 * 2

    plan, largest, ideas = fit(compose_config([*base, "train.micro_batch_size=16"]), 1, parse_bytes("32GiB"))
    assert plan.needed > 32 * GiB and 1 <= largest < 16
    assert make_plan(compose_config([*base, f"train.micro_batch_size={largest}"]), 1).needed <= 32 * GiB
    assert make_plan(compose_config([*base, f"train.micro_batch_size={largest + 1}"]), 1).needed > 32 * GiB
    assert any(i.startswith(f"train.micro_batch_size={largest} ") for i in ideas)


@pytest.mark.integration
def test_dtune_plan_command(llama_8b: Path, tmp_path: Path):
    cmd = [sys.executable, "-m", "dtune", "plan", "--gpu-mem", "80GiB", f"model.name_or_path={llama_8b}", "logger=none"]
    fits = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert "verdict: fits in 80.0 GiB" in fits.stdout and "largest micro-batch that fits" in fits.stdout
    small = subprocess.run([*cmd[:5], "8GiB", *cmd[6:]], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert small.returncode == 1 and "does NOT fit in 8.0 GiB" in small.stdout


@pytest.mark.integration
def test_training_refuses_a_config_predicted_not_to_fit(tmp_path: Path):
    cmd = [sys.executable, "-m", "dtune.train", *SMOKE, "train.gpu_mem=700MiB", f"hydra.run.dir={tmp_path / 'run'}"]
    refused = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "dtune: error: train.gpu_mem: predicted to need" in refused.stderr and "train.force=true" in refused.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    forced = subprocess.run([*cmd, "train.force=true"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "memory plan (per GPU)" in (tmp_path / "run" / "dtune.log").read_text()


@pytest.mark.integration
def test_a_llama3_shaped_random_model_is_planned_within_ten_percent(tmp_path: Path, monkeypatch):
    """The builder of builtin:shape-llama-* (GPU benchmarks) on a small shape with Llama 3's 128k vocabulary."""
    from dtune import assets

    monkeypatch.setitem(
        assets.LLAMA_SHAPES,
        "test",
        {
            "hidden_size": 128,
            "intermediate_size": 448,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "tie_word_embeddings": False,
        },
    )
    assets._build_shaped_llama("test")(tmp_path)
    cfg = compose_config(["logger=none", f"model.name_or_path={tmp_path}", "train.micro_batch_size=2", "data.max_seq_len=128"])
    predicted = make_plan(cfg, world_size=1).peak
    (measured,) = measure(cfg).values()
    assert measured == pytest.approx(predicted, rel=0.10), (
        f"measured {measured / GiB:.3f} GiB, predicted {predicted / GiB:.3f} GiB"
    )


@pytest.mark.integration
def test_chunked_loss_lowers_the_peak_as_planned():
    """512 labelled tokens at once vs in chunks of 64: the measured peak falls, and each plan stays within 10%."""
    base = [*BIG, "model=smollm2_135m", "train.micro_batch_size=2", "data.max_seq_len=256", "data.train_on=all"]
    peaks = {}
    for chunk in (0, 64):
        cfg = compose_config([*base, f"train.loss_chunk_tokens={chunk}"])
        predicted = make_plan(cfg, world_size=1).peak
        (peaks[chunk],) = measure(cfg).values()
        assert peaks[chunk] == pytest.approx(predicted, rel=0.10), f"chunk {chunk}: measured {peaks[chunk]} predicted {predicted}"
    assert peaks[64] < 0.6 * peaks[0]


@pytest.mark.parametrize("world", ["0", "-2"])
def test_a_world_size_below_one_is_refused(world: str, capsys):
    from dtune.commands.plan import main

    with pytest.raises(SystemExit) as stop:
        main(["--world-size", world])
    assert stop.value.code == 2 and f"--world-size: must be at least 1, got {world}" in capsys.readouterr().err


def test_an_engine_proposed_to_fit_is_planned_as_its_config_group_sets_it(tmp_path: Path, monkeypatch):
    """From fsdp2_offload, 'would fit: engine=zero3' was proposed from a plan that kept the current engine's offload
    flags (zero3_offload's plan): engine=zero3 itself does not fit. Every engine proposed must fit as composed."""
    from dtune.plan import memory

    monkeypatch.setattr(memory, "probe_activations", lambda *a: {"saved_per_token": 2e5, "backward_peak_per_token": 4e5})
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    base = [*BIG, f"model.name_or_path={tmp_path}", "data.max_seq_len=512", "train.micro_batch_size=1"]
    shape = skeleton(compose_config(base))
    needed = {
        e: make_plan(compose_config([*base, f"engine={e}"]), 2, shape=shape).needed
        for e in ("fsdp2", "fsdp2_offload", "zero3", "zero3_offload")
    }
    assert needed["zero3_offload"] < min(needed["zero3"], needed["fsdp2_offload"])
    gpu = (needed["zero3_offload"] + min(needed["zero3"], needed["fsdp2_offload"])) // 2
    _, _, ideas = fit(compose_config([*base, "engine=fsdp2_offload"]), 2, gpu)
    assert "engine=zero3_offload" in ideas and "engine=zero3" not in ideas
    for idea in (i for i in ideas if i.startswith("engine=")):
        assert needed[idea.removeprefix("engine=")] <= gpu, idea


def test_dtune_plan_judges_by_train_gpu_mem_as_training_does(capsys):
    """The same overrides made dtune train refuse the run (train.gpu_mem) and dtune plan print no verdict, exit 0."""
    from dtune.commands.plan import main

    assert main(["model=tiny_llama", "logger=none", "train.gpu_mem=100MiB"]) == 1
    assert "verdict: does NOT fit in 0.1 GiB per GPU" in capsys.readouterr().out
