"""Adapter variants (DoRA, rsLoRA, inits, LoRA+, modules_to_save, layer and rank patterns): dtune builds exactly
PEFT's own model for each, trains it as PEFT's own optimizer would, saves what PEFT loads and merges it, and refuses
at start what PEFT cannot train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtune.config import validate
from dtune.errors import ConfigError
from tests.helpers import compose_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = ["debug=smoke", "train.precision=fp32", "model.gradient_checkpointing=false"]

# dtune's overrides -> the LoraConfig a PEFT user would write for the same adapter (beside r=16, alpha=32, all-linear).
VARIANTS = {
    "dora": (["lora.use_dora=true"], {"use_dora": True}),
    "rslora": (["lora.use_rslora=true"], {"use_rslora": True}),
    "gaussian": (["lora.init=gaussian"], {"init_lora_weights": "gaussian"}),
    "pissa": (["lora.init=pissa", "quant=none"], {"init_lora_weights": "pissa"}),
    "olora": (["lora.init=olora", "quant=none"], {"init_lora_weights": "olora"}),
    "layers_and_patterns": (
        ["lora.layers_to_transform=[1]", "+lora.rank_pattern={q_proj:4}", "+lora.alpha_pattern={down_proj:8}"],
        {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "layers_to_transform": [1],
            "rank_pattern": {"q_proj": 4},
            "alpha_pattern": {"down_proj": 8},
        },
    ),
    "modules_to_save": (["lora.modules_to_save=[lm_head]"], {"modules_to_save": ["lm_head"]}),
    "loraplus": (["optim.loraplus_lr_ratio=16"], {}),
}


def peft_reference(cfg, peft_kwargs: dict) -> torch.nn.Module:
    """The same base, frozen as dtune freezes it, with the adapter built by PEFT from a hand-written LoraConfig."""
    from peft import LoraConfig, get_peft_model

    from dtune.model import freeze_as_trained, load_base

    base = freeze_as_trained(cfg, load_base(cfg, torch.device("cpu")))
    kwargs = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **peft_kwargs}
    torch.manual_seed(cfg.train.seed)
    return get_peft_model(base, LoraConfig(**kwargs))


def reference_optimizer(model, cfg, loraplus: bool) -> torch.optim.Optimizer:
    if loraplus:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.optim.lr, loraplus_lr_ratio=16)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_exactly_as_peft_s_own_model(variant: str):
    """Forward, 3 steps of gradients and the updated weights of dtune's model equal those of PEFT's own model built
    from the LoraConfig a PEFT user would write (and PEFT's LoRA+ optimizer for LoRA+)."""
    from dtune.model import build_model
    from dtune.optim import build_optimizer

    overrides, peft_kwargs = VARIANTS[variant]
    cfg = compose_config([*BASE, "optim.lr=1e-2", *overrides])
    validate(cfg)
    ours = build_model(cfg, torch.device("cpu"))
    theirs = peft_reference(cfg, peft_kwargs)
    assert set(trainable(ours)) == set(trainable(theirs)) and trainable(ours)
    opt_ours, opt_theirs = build_optimizer(ours, cfg.optim), reference_optimizer(theirs, cfg, variant == "loraplus")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        losses = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            losses.append(out)
        if step == 0:
            torch.testing.assert_close(losses[0].logits, losses[1].logits)
        torch.testing.assert_close(losses[0].loss, losses[1].loss)
        grads = {n: p.grad for n, p in trainable(theirs).items()}
        for name, p in trainable(ours).items():
            torch.testing.assert_close(
                p.grad, grads[name], msg=lambda m, name=name, step=step: f"{variant} step {step} {name}: {m}"
            )
        opt_ours.step()
        opt_theirs.step()
    for name, p in trainable(ours).items():
        torch.testing.assert_close(p, trainable(theirs)[name])


def test_loraplus_gives_b_matrices_the_higher_learning_rate():
    from dtune.model import build_model
    from dtune.optim import build_optimizer

    cfg = compose_config([*BASE, "optim.loraplus_lr_ratio=16", "optim.lr=1e-3"])
    model = build_model(cfg, torch.device("cpu"))
    groups = build_optimizer(model, cfg.optim).param_groups
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in trainable(model).items():
        assert by_param[id(p)] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["lora.init=pissa"], "PEFT's PiSSA refuses a 4-bit base"),
        (["lora.init=olora"], "re-quantizes the residual"),
        (["lora.init=loftq", "quant=none"], "with quant=none there is none"),
        (["lora.init=loftq", "lora.use_dora=true"], "DoRA took its magnitudes"),
        (["lora.init=pissa", "quant=none", "engine=zero3"], "ZeRO-3 partitions them"),
        (["lora.init=svd"], "lora.init: must be one of"),
        (["+lora.rank_pattern={q_proj:0}"], "lora.rank_pattern: q_proj: must be > 0"),
        (["lora.layers_to_transform=[-1]"], "lora.layers_to_transform"),
        (["optim.loraplus_lr_ratio=0"], "optim.loraplus_lr_ratio"),
    ],
)
def test_combinations_peft_cannot_train_are_refused_at_start_with_the_reason(overrides, says):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*BASE, *overrides]))
    assert says in str(err.value)


def test_a_pattern_that_is_no_regular_expression_is_named():
    cfg = compose_config(BASE)
    cfg.lora.alpha_pattern = {"q_(": 8.0}
    with pytest.raises(ConfigError, match=r"lora.alpha_pattern: 'q_\(' is not a regular expression"):
        validate(cfg)


def test_loftq_without_a_gpu_and_4bit_modules_to_save_are_named_errors():
    from dtune.model import build_model

    if torch.cuda.is_available():
        pytest.skip("LoftQ runs on a CUDA machine")
    with pytest.raises(ConfigError, match=r"lora\.init: loftq runs PEFT's LoftQ, which computes on a CUDA device"):
        build_model(compose_config([*BASE, "lora.init=loftq"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lora.modules_to_save: .*q_proj is a 4-bit quantized layer"):
        build_model(compose_config([*BASE, "lora.modules_to_save=[q_proj]", "lora.target_modules=[v_proj]"]), None)


def test_module_names_that_match_more_or_layers_beyond_the_model_are_named_errors():
    from dtune.model import build_model

    with pytest.raises(ConfigError, match=r"lora.modules_to_save: norm also matches .*input_layernorm"):
        build_model(compose_config([*BASE, "lora.modules_to_save=[norm]"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lora.layers_to_transform: \[1, 7\] names layers beyond the model's 2"):
        build_model(compose_config([*BASE, "lora.layers_to_transform=[1,7]"]), torch.device("cpu"))


def test_a_rank_or_alpha_pattern_key_that_matches_no_adapted_module_is_named():
    """PEFT ignores such a key: a misspelt one (down_prj) trained those modules at lora.r, silently."""
    from dtune.model import build_model

    with pytest.raises(ConfigError, match=r"lora.rank_pattern: down_prj matches no adapted module \(adapted: down_proj, "):
        build_model(compose_config([*BASE, "+lora.rank_pattern={down_prj:4}"]), torch.device("cpu"))
    # layer 0 carries no adapter with layers_to_transform=[1]
    with pytest.raises(ConfigError, match=r"lora.alpha_pattern: layers.0.self_attn.q_proj matches no adapted module"):
        build_model(
            compose_config([*BASE, "lora.layers_to_transform=[1]", "+lora.alpha_pattern={layers.0.self_attn.q_proj:8}"]),
            torch.device("cpu"),
        )
    model = build_model(compose_config([*BASE, "+lora.rank_pattern={layers.1.mlp.down_proj:4}"]), torch.device("cpu"))
    assert model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape[0] == 4


def test_a_checkpoint_of_an_older_dtune_resumes_but_not_under_another_loraplus_ratio():
    """A checkpoint's config lacks the fields added since it was written: their defaults held, so it resumes. LoRA+
    changes the optimizer's parameter groups: its ratio must match."""
    from omegaconf import OmegaConf

    from dtune.checkpoint import check_resumable
    from dtune.errors import DtuneError

    cfg = compose_config(BASE)
    saved = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in ("use_dora", "use_rslora", "init", "modules_to_save", "layers_to_transform", "rank_pattern"):
        saved["lora"].pop(key)
    saved["model"].pop("add_tokens")
    saved["optim"].pop("loraplus_lr_ratio")
    old = OmegaConf.to_yaml(saved)
    assert check_resumable(old, cfg, Path("ckpt")) == []
    cfg.optim.loraplus_lr_ratio = 4.0
    with pytest.raises(DtuneError, match=r"optim.loraplus_lr_ratio: None in the checkpoint, 4.0 now"):
        check_resumable(old, cfg, Path("ckpt"))


def test_a_dora_adapter_at_init_computes_the_base_exactly_in_bf16():
    """PEFT takes DoRA's magnitudes from the norm rounded to bf16 and divides by one computed in fp32: the adapter
    at init, which must be the base, was 0.4% off per row (3% of the held-out loss of SmolLM2-135M). dtune sets them
    from fp32 norms; eval and merge compute the norm as training does."""
    from dtune.model import build_model

    cfg = compose_config([*BASE, "lora.use_dora=true", "train.precision=bf16"])
    model = build_model(cfg, torch.device("cpu")).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(adapted, base)


def test_a_dora_layer_over_a_zero_row_stays_finite():
    """A zero row of W (Llama-3.1-8B's o_proj has 511) made PEFT's DoRA divide 0 by 0 at the first forward."""
    from peft import LoraConfig, get_peft_model

    from dtune.lora import dora_norms_in_fp32

    base = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        base[0].weight[1] = 0
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], use_dora=True))
    x = torch.randn(3, 8)
    assert torch.isnan(model(x)).any()  # PEFT alone
    assert dora_norms_in_fp32(model) == 1
    out = model(x)
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros(3))


def test_fused_kernels_hand_dora_to_peft_and_fuse_rslora():
    """quant.fuse_lora runs plain LoRA (rsLoRA is plain LoRA at another scale) inside the fused kernel and leaves
    DoRA layers to PEFT; both compute what PEFT's path computes."""
    from dtune.model import build_model
    from dtune.quant import FusedLoraLinear4bit

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    for variant, fused in (("lora.use_rslora=true", True), ("lora.use_dora=true", False)):
        logits = []
        for kernel in (["quant=nf4_triton", "quant.fuse_lora=true"], ["quant=nf4_triton"]):
            cfg = compose_config([*BASE, variant, *kernel, "optim.lr=1e-2"])
            model = build_model(cfg, torch.device("cpu"))
            with torch.no_grad():
                for name, p in trainable(model).items():  # B away from zero, so the adapter counts
                    if "lora_B" in name:
                        p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
            if "fuse_lora=true" in kernel[-1]:
                assert any(isinstance(m, FusedLoraLinear4bit) for m in model.modules()) is fused, variant
            logits.append(model(input_ids=ids).logits)
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        [
            "lora.use_dora=true",
            "lora.use_rslora=true",
            "lora.layers_to_transform=[1]",
            "+lora.rank_pattern={q_proj:4}",
            "+lora.alpha_pattern={down_proj:8}",
            "lora.modules_to_save=[lm_head]",
            "optim.loraplus_lr_ratio=16",
        ],
        ["lora.init=pissa", "quant=none"],
        ["lora.init=olora", "quant=none"],
    ],
    ids=["dora-rslora-patterns-lm_head-loraplus", "pissa", "olora"],
)
def test_saved_variant_adapters_load_in_peft_evaluate_as_trained_and_merge(overrides, tmp_path: Path):
    """Trained by `dtune train`, the adapter loads with PeftModel.from_pretrained (dtune eval's loader) and gives
    training's held-out loss; `dtune merge` publishes it (merge checks base + adapter logits itself)."""
    from dtune.commands import eval as eval_cmd
    from dtune.commands import merge as merge_cmd
    from dtune.train.loop import run

    out = tmp_path / "run"
    results = run(compose_config([*BASE, "optim.lr=1e-2", *overrides, f"train.output_dir={out}"]), out)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    figures = tmp_path / "eval.json"
    assert eval_cmd.main([str(out), "--general", "", "--json", str(figures)]) == 0
    task = json.loads(figures.read_text())["task"]
    assert task["adapter"]["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-5)
    assert task["base"]["eval/loss"] == pytest.approx(results["before"]["eval/loss"], rel=1e-5)
    assert merge_cmd.main([str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0


NEW_TOKENS = ["model.add_special_tokens=['<|tool|>','<|end_tool|>']", "model.add_tokens=[dtuneword]"]


def test_added_tokens_grow_the_vocabulary_and_train_only_their_rows(family_dir):
    """Qwen2 (untied head): the embedding and the head grow by the new tokens, and the new rows of both -- nothing
    else of them -- receive gradients."""
    from dtune.model import build_model, load_tokenizer, trained_token_ids

    cfg = compose_config([*BASE, f"model.name_or_path={family_dir('qwen2')}", *NEW_TOKENS])
    validate(cfg)
    tokenizer = load_tokenizer(cfg)
    ids = trained_token_ids(cfg, tokenizer)
    assert len(ids) == 3 and "<|tool|>" in tokenizer.tokenize("a <|tool|> b")
    model = build_model(cfg, torch.device("cpu"))
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.shape[0] == base.get_output_embeddings().weight.shape[0] == len(tokenizer)
    rows = {n: p for n, p in trainable(model).items() if "token_adapter" in n}
    assert sorted(n.split(".token_adapter")[0].rsplit(".", 1)[-1] for n in rows) == ["embed_tokens", "lm_head"]
    assert all(tuple(p.shape) == (3, base.config.hidden_size) for p in rows.values())
    assert all("lora_" in name or "token_adapter" in name for name in trainable(model))  # the rest stays frozen
    batch = torch.tensor([[ids[0], 5, ids[1], 7, ids[2], 9]])
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum(dim=1).gt(0).all() for p in rows.values())


def test_an_ordinary_token_the_vocabulary_has_trains_its_row_without_changing_how_text_tokenizes():
    """model.add_tokens=[hello] re-added SmolLM2's own 'hello' as an added token: matched inside any text, it split
    'shello hello' into s + hello + ' ' + hello (base: shell + o + ' hello'), so the data tokenized unlike the base's."""
    from dtune.model import load_tokenizer, trained_token_ids

    base = load_tokenizer(compose_config(BASE))
    cfg = compose_config([*BASE, "model.add_tokens=[hello]"])
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.tokenize("shello hello world") == base.tokenize("shello hello world") == ["shell", "o", "Ġhello", "Ġworld"]
    assert len(tokenizer) == len(base) and trained_token_ids(cfg, tokenizer) == [base.convert_tokens_to_ids("hello")]


def test_added_tokens_are_refused_under_zero3():
    with pytest.raises(ConfigError, match=r"model\.add_tokens: not under ZeRO-3"):
        validate(compose_config([*BASE, *NEW_TOKENS, "engine=zero3"]))


@pytest.mark.integration
def test_an_adapter_with_added_tokens_loads_in_peft_on_a_resized_base_and_merges(family_dir, tmp_path: Path):
    """Trained with new tokens in its data, the adapter holds their rows; a PEFT user's load (the tokenizer saved
    beside the adapter, the base resized to it, PeftModel.from_pretrained) computes what dtune's loader computes,
    `dtune eval` gives training's loss, and the merge publishes the grown vocabulary."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtune.adapters import load_trained, locate
    from dtune.commands import eval as eval_cmd
    from dtune.commands import merge as merge_cmd
    from dtune.train.loop import run

    out = tmp_path / "run"
    model = f"model.name_or_path={family_dir('qwen2')}"
    tokens = [*NEW_TOKENS, "data.system_prompt='Answer, then <|tool|> dtuneword <|end_tool|>.'"]
    results = run(compose_config([*BASE, model, "optim.lr=1e-2", "quant=none", *tokens, f"train.output_dir={out}"]), out)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum("token_adapter" in k for k in saved) == 2
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(family_dir("qwen2"), dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    theirs = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours = load_trained(locate(out), torch.device("cpu"))
    ids = tokenizer("Hi <|tool|> dtuneword <|end_tool|> there", return_tensors="pt").input_ids
    assert ids.shape[1] <= 8  # the new tokens are single tokens
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits.float(), rtol=1e-4, atol=1e-4)
    figures = tmp_path / "eval.json"
    assert eval_cmd.main([str(out), "--general", "", "--json", str(figures)]) == 0
    task = json.loads(figures.read_text())["task"]
    assert task["adapter"]["eval/loss"] == pytest.approx(results["after"]["eval/loss"], rel=1e-5)
    assert merge_cmd.main([str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # The adapter folder alone (no run config beside it): its tokenizer says which tokens were added.
    alone = tmp_path / "alone" / "adapter"
    shutil.copytree(out / "adapter", alone)
    assert locate(alone).cfg.model.add_special_tokens == ["<|tool|>", "<|end_tool|>"]
    assert eval_cmd.main([str(alone), "--base", str(family_dir("qwen2")), "--general", ""]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's LoftQ for 4-bit bases computes on CUDA (the GPU kit runs it)")
def test_loftq_starts_the_4bit_model_nearer_the_16bit_one():
    """LoftQ's promise: base + adapter at step 0 is closer to the 16-bit model than the 4-bit base alone."""
    from dtune.model import build_model, load_base

    # dtune's default scaling (alpha/r = 2): PEFT's LoftQ factors are rescaled for it.
    cfg = compose_config(["debug=smoke", "train.precision=bf16", "lora.init=loftq"])
    device = torch.device("cuda")
    model = build_model(cfg, device).eval()
    full = load_base(cfg, device, quantized=False, training=False)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        target = full(input_ids=ids).logits.float()
        adapted = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    assert (adapted - target).norm() < 0.8 * (plain - target).norm()
