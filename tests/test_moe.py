"""MoE QLoRA: fused experts quantized to NF4 per expert as they load, LoRA on them in PEFT's format."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from dtune.kernels.nf4_grouped import NF4Experts
from dtune.model import build_model, load_base
from dtune.moe import EXPERT_PARAMS, NF4ExpertsMixin, dequantize_experts, nf4_experts
from tests.helpers import compose_config, tiny_overrides

LAYERS, EXPERTS, HIDDEN, MOE_INTERMEDIATE = 4, 8, 64, 32


def _save_moe(out: Path, family: str) -> Path:
    from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

    common = {
        "vocab_size": 128,
        "hidden_size": HIDDEN,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": False,
    }
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=MOE_INTERMEDIATE, num_experts=EXPERTS)
    elif family == "mixtral":
        config = MixtralConfig(**common, intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS)
    else:
        config = GptOssConfig(**common, intermediate_size=MOE_INTERMEDIATE, num_local_experts=EXPERTS)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_dir(request, tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE or Mixtral of 4 layers x 8 experts, saved as transformers saves it."""
    return _save_moe(tmp_path_factory.mktemp(request.param), request.param)


def moe_cfg(moe_dir: Path, tmp_path: Path, *extra: str):
    return compose_config(tiny_overrides(tmp_path, f"model.name_or_path={moe_dir}", *extra))


def test_experts_quantize_as_they_load_one_layer_at_a_time(moe_dir, tmp_path, monkeypatch):
    """Every experts module holds packed NF4 (half a byte per weight) and no 16-bit expert tensor; while loading, at
    most one layer's 16-bit expert tensors are alive when one is quantized; the logits are those of the same model
    with the experts dequantized (what bitsandbytes would compute)."""
    alive: list[int] = []
    shapes = {(EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN), (EXPERTS, HIDDEN, MOE_INTERMEDIATE)}  # gate_up, down
    quantize = NF4Experts.quantize.__func__

    def counting(cls, weight, *args, **kwargs):
        dense = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and not t.is_meta and tuple(t.shape) in shapes]
        alive.append(len({t.untyped_storage().data_ptr() for t in dense}))
        return quantize(cls, weight, *args, **kwargs)

    gc.collect()

    monkeypatch.setattr(NF4Experts, "quantize", classmethod(counting))
    model = load_base(moe_cfg(moe_dir, tmp_path), torch.device("cpu"), training=False)
    assert len(alive) == LAYERS * 2 and max(alive) <= 2, alive  # gate_up and down of one layer, at most

    modules = nf4_experts(model)
    assert len(modules) == LAYERS
    weights = LAYERS * EXPERTS * 3 * HIDDEN * MOE_INTERMEDIATE
    packed = sum(m._parameters[f"{p}_nf4"].numel() * 4 for m in modules for p in EXPERT_PARAMS)  # fp32 storage
    assert packed == weights // 2  # 4 bits a weight
    assert not any(p in m._parameters for m in modules for p in EXPERT_PARAMS)

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nf4 = model(ids).logits
        dequantize_experts(model)
        assert not nf4_experts(model)
        assert all(m.gate_up_proj.dim() == 3 for m in model.modules() if type(m).__name__.endswith("Experts"))
        dense = model(ids).logits
    torch.testing.assert_close(nf4, dense, rtol=0, atol=1e-5)


def test_an_expert_layout_not_supported_is_refused_with_the_way_out(tmp_path):
    """gpt-oss keeps its experts transposed, with biases: refused at load, naming quant.experts=false."""
    from dtune.errors import ConfigError

    model_dir = _save_moe(tmp_path / "gpt_oss", "gpt_oss")
    with pytest.raises(ConfigError, match=r"transposed weights.*quant.experts=false keeps the experts in 16 bits"):
        load_base(moe_cfg(model_dir, tmp_path, "model.attn_implementation=eager"), torch.device("cpu"))


@pytest.mark.parametrize("variant", ["lora.dropout=0.1", "lora.use_dora=true"])
def test_lora_variants_peft_cannot_put_on_experts_are_refused_with_the_way_out(moe_dir, tmp_path, variant):
    from dtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"MoE experts take plain LoRA only.*lora.target_modules=\[q_proj"):
        build_model(moe_cfg(moe_dir, tmp_path, variant), torch.device("cpu"))


def test_a_checkpoint_without_some_experts_is_refused_naming_them(tmp_path):
    """Expert tensors a checkpoint lacks are not trained as transformers' placeholders: the load names the layer."""
    from safetensors.torch import load_file, save_file

    from dtune.errors import DtuneError

    model_dir = _save_moe(tmp_path / "qwen3_moe", "qwen3_moe")
    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.1.mlp.experts.")}, str(weights))
    with pytest.raises(DtuneError, match=r"no gate_up_proj, down_proj for model.layers.1.mlp.experts"):
        load_base(moe_cfg(model_dir, tmp_path), torch.device("cpu"))


def test_quant_experts_false_keeps_them_dense(moe_dir, tmp_path):
    model = load_base(moe_cfg(moe_dir, tmp_path, "quant.experts=false"), torch.device("cpu"))
    assert not nf4_experts(model)
    assert all(m.gate_up_proj.dtype == torch.float32 for m in model.modules() if type(m).__name__.endswith("Experts"))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {
        n.replace("default.", ""): p.grad.clone() for n, p in model.named_parameters() if "experts" in n and p.grad is not None
    }
    return loss.detach(), grads


@pytest.mark.parametrize("kernel", ["bnb", "triton"])
def test_lora_on_nf4_experts_is_pefts_lora_on_the_dequantized_experts(moe_dir, tmp_path, kernel):
    """LoRA on the NF4 experts has PEFT's tensors and names (gate_up at twice the rank, as PEFT converts the v4
    names), computes what PEFT's own ParamWrapper computes on the dequantized experts (loss and adapter gradients),
    switches off with PEFT's disable_adapter(), and saves an adapter PEFT loads on the 16-bit model."""
    from peft import PeftModel

    cfg = moe_cfg(moe_dir, tmp_path, f"quant.kernel={kernel}", "model.gradient_checkpointing=false")
    model = build_model(cfg, torch.device("cpu"))
    wrappers = [m for m in model.modules() if type(m).__name__ == "NF4ExpertsLora"]
    assert len(wrappers) == LAYERS * 2
    assert {"gate_up_proj", "down_proj"} <= set(model.peft_config["default"].target_parameters)
    with torch.no_grad():  # a trained-looking adapter: B away from its zero init
        for name, param in model.named_parameters():
            if "experts" in name and "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, ids)
    with model.disable_adapter(), torch.no_grad():
        switched_off = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    base = load_base(cfg, torch.device("cpu"))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(switched_off, base_logits, rtol=0, atol=1e-6)
    dequantize_experts(base)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    assert not any(isinstance(m, NF4ExpertsMixin) for m in peft.modules())
    peft_loss, peft_grads = _loss_and_grads(peft, ids)
    torch.testing.assert_close(loss, peft_loss, rtol=0, atol=1e-5)
    assert grads.keys() == peft_grads.keys() and len(grads) == LAYERS * 4
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    dense = load_base(cfg, torch.device("cpu"), quantized=False)  # the 16-bit model: PEFT loads it unchanged
    loaded = PeftModel.from_pretrained(dense, tmp_path / "adapter")
    wrapped = [m.parameter_name for m in loaded.modules() if type(m).__name__ == "ParamWrapper"]
    assert sorted(wrapped) == sorted(["gate_up_proj", "down_proj", "weight"] * LAYERS)  # experts and routers


@pytest.fixture(scope="module")
def moe_alone(family_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny Qwen3-MoE's QLoRA run on one process (2 micro-batches a step), and the settings it ran with."""
    import sys

    from tests.helpers import COMMON, run_ok

    common = [*COMMON, f"model.name_or_path={family_dir('qwen3_moe')}"]
    alone = tmp_path_factory.mktemp("moe-one")
    run_ok([sys.executable, "-m", "dtune.train", *common, "train.grad_accum_steps=2", f"hydra.run.dir={alone}"], alone)
    assert "quant.experts: the experts of 2 MoE layers are NF4" in (alone / "dtune.log").read_text()
    return alone, common


RESUMED = {"zero3", "fsdp2"}
"""Engines whose MoE checkpoints are resumed and merged here: the two that partition the expert adapters (ZeRO-3's
gathered save, FSDP2's sharded state dict). Checkpoint code is shared by every engine and adapter shape:
tests/test_distributed.py resumes the dense model's checkpoints of every engine (zero1's through zero2, its class;
fsdp2_offload's under ddp)."""


@pytest.mark.integration
# zero1 is left out: DeepSpeed's stage-1 optimizer is its stage-2 class, and neither touches frozen parameters.
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload"])
def test_moe_qlora_on_two_ranks_matches_one_rank_resumes_and_merges(moe_alone, tmp_path: Path, engine: str):
    """The tiny Qwen3-MoE (NF4 experts, LoRA on experts and routers) on 2 ranks under each engine: the 1-rank run's
    losses and adapter, with the packed experts split over the ranks where the engine shards the frozen base. Under
    the engines in RESUMED, a 1-rank run resumed from the 2-rank checkpoint of step 2 is the rest of the 1-rank run,
    and the model merged from that checkpoint verifies (merge compares its logits with base + adapter)."""
    import json

    from dtune.adapters import locate
    from dtune.commands.merge import merge
    from tests.helpers import run_ok, torchrun
    from tests.test_distributed import assert_same_run

    alone, common = moe_alone
    out, resumed = tmp_path / engine, tmp_path / "resumed"
    run_ok([*torchrun(2), "-m", "dtune.train", *common, f"engine={engine}", f"hydra.run.dir={out}"], tmp_path)
    # The ranks' reduction order moves one element of an expert adapter (the same one under ZeRO-3 and FSDP2 offload:
    # 1 of 8,192, a gradient near 0 that Adam's normalisation amplifies) by 2e-6 to 6e-6 after 3 steps at lr 1e-2,
    # beyond assert_same_run's tol / 10 for 1e-5; losses agree to 1e-5.
    tol = 1e-4
    assert_same_run(out, alone, abs_tol=tol)
    held, whole = (json.loads((d / "results.json").read_text())["param_bytes_rank0"] for d in (out, alone))
    sharded = engine in ("zero3", "zero3_offload", "fsdp2", "fsdp2_offload")  # the packed experts split too
    assert held["frozen"] == pytest.approx(whole["frozen"] / 2 if sharded else whole["frozen"], rel=0.02)
    if engine not in RESUMED:
        return
    checkpoint = out / "checkpoints" / "step-00000002"
    cmd = [*torchrun(1), "-m", "dtune.train", *common, f"engine={engine}"]
    run_ok([*cmd, "train.grad_accum_steps=2", f"train.resume={checkpoint}", f"hydra.run.dir={resumed}"], tmp_path)
    assert json.loads((resumed / "results.json").read_text())["resumed_from_step"] == 2
    assert_same_run(resumed, alone, resumed_at=2, abs_tol=tol)
    merged = merge(locate(checkpoint), tmp_path / "merged", dtype="fp32")
    assert (merged / "model.safetensors").is_file()


QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}
"""Qwen3-30B-A3B's shape (its config.json, the fields that size it)."""


def test_a_30b_a3b_is_planned_from_its_config_with_4bit_experts(tmp_path: Path):
    """From config.json alone: the 48 x 128 x 3 expert matrices are 4-bit, each expert quantized on its own (nibbles,
    a uint8 scale per 64 weights, an fp32 second-level scale per 256 blocks and an offset per expert); FLOPs count the
    8 routed experts of a token (Qwen's "3.3B activated"), not the 128."""
    import json

    from dtune.flops import FlopCounts
    from dtune.plan.shape import parameter_bytes, skeleton

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    cfg = compose_config([f"model.name_or_path={tmp_path}", "train.precision=bf16"])
    model, _ = skeleton(cfg)
    planned = parameter_bytes(cfg, model)
    gate_up, down = 1536 * 2048, 2048 * 768  # weights of one expert's matrices
    experts = 48 * 128 * (gate_up + down) // 2 + 48 * 128 * (
        gate_up // 64 + 4 * -(-gate_up // 64 // 256) + 4 + down // 64 + 4 * -(-down // 64 // 256) + 4
    )
    attention = 48 * 2048 * (4096 + 512 + 512) + 48 * 4096 * 2048  # q, k, v, o
    attention_bytes = attention // 2 + attention // 64 + 4 * 48 * 4 * 2  # + their constants, roughly
    assert planned["base_4bit"] == pytest.approx(experts + attention_bytes, rel=1e-3)
    assert planned["base_4bit"] < 16e9  # vs 61 GB of bf16 weights
    flops = FlopCounts.of(model.requires_grad_(False))  # the frozen base, no adapters
    active = flops.base_linear + flops.head + 151936 * 2048  # + the embeddings
    assert active == pytest.approx(3.3e9, rel=0.02)
    assert flops.base_linear == attention + 48 * 8 * (gate_up + down)


def test_flops_count_the_routed_experts_and_their_adapter_slices(moe_dir, tmp_path):
    """MFU's FLOPs: a token runs top-k of the E experts (base) and the same k/E of each expert adapter's rows."""
    from dtune.flops import FlopCounts

    model = build_model(moe_cfg(moe_dir, tmp_path), torch.device("cpu"))
    expert_lora = other_lora = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            if ".experts." in name:
                expert_lora += param.numel()
            else:
                other_lora += param.numel()
    flops = FlopCounts.of(model)
    assert expert_lora > 0 and flops.lora == other_lora + expert_lora * 2 // EXPERTS
    experts_per_token = LAYERS * 2 * (2 * MOE_INTERMEDIATE * HIDDEN + HIDDEN * MOE_INTERMEDIATE)
    attention = LAYERS * (HIDDEN * 64 + 2 * HIDDEN * 32 + 64 * HIDDEN)  # q, k, v (2 kv heads x 16), o
    assert flops.base_linear == experts_per_token + attention
