"""Preference training (train.objective=dpo, orpo, simpo): pair rows parsed and rendered with SFT's span rules, cut
alike when too long; each loss equal to its closed form computed here from the tiny model's own log-probabilities
(not by dtune's loss functions), DPO equal to TRL's DPOTrainer on the same batch; per-pair normalisation; a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dtune.data import IGNORE, Renderer, collate
from dtune.data.examples import Example
from dtune.data.formats import UnknownKeys, row_from_obj
from dtune.errors import ConfigError, DataError
from dtune.schema import DataConfig
from tests.helpers import compose_config, tiny_overrides, write_jsonl

PAIRS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
    {"prompt": "Name a prime.", "chosen": "Seven.", "rejected": "Nine, which is three squared."},
    {
        "prompt": [
            {"role": "user", "content": "Pick a colour."},
            {"role": "assistant", "content": "Teal."},
            {"role": "user", "content": "Another?"},
        ],
        "chosen": {"role": "assistant", "content": "Plum."},
        "rejected": [{"role": "assistant", "content": "I said teal already, so no."}],
    },
]


def pair_rows(n: int) -> list[dict]:
    """``n`` pairs of varied prompts whose chosen reply is always the polite one: what a tiny random model can learn in
    a few steps (and show on held-out pairs)."""
    words = ["great", "awful", "moving", "dull", "sharp", "flat", "warm", "cold"]
    return [
        {
            "prompt": f"Review {i}: the film was {words[i % 8]} and {words[(3 * i + 1) % 8]}. Agree?",
            "chosen": "Thank you, I agree.",
            "rejected": "No.",
        }
        for i in range(n)
    ]


def render(tok, obj, **cfg):
    renderer = Renderer(tok, DataConfig(format="preference", choices=None, **cfg))
    return renderer, renderer(row_from_obj(obj, "pairs.jsonl:1", "preference"))


def trained_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


# --- rows ---------------------------------------------------------------------------------------------------------


def test_every_pair_form_gives_the_prompt_and_two_replies():
    """Strings, messages, a conversation repeated in both replies (UltraFeedback) or only there (no prompt): the prompt
    is what the replies share, a system message leads it, assistant turns in the prompt are context."""
    convo = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}, {"role": "user", "content": "R?"}]
    forms = [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}]},
        {"chosen": [*convo, {"role": "assistant", "content": "Yes."}], "rejected": [*convo, {"role": "assistant", "content": "No."}]},
        {"prompt": convo, "chosen": {"role": "assistant", "content": "Yes."}, "rejected": "No.", "system": "Be brief."},
    ]  # fmt: skip
    rows = [row_from_obj(obj, f"p.jsonl:{i}", "preference") for i, obj in enumerate(forms)]
    assert rows[0].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}]
    assert rows[0].rejected == [{"role": "assistant", "content": "No."}] and rows[0].prompt_turns == 1
    assert (rows[1].messages, rows[1].rejected) == (rows[0].messages, rows[0].rejected)
    assert rows[2].messages[:3] == convo and rows[2].prompt_turns == 3 and rows[2].untrained == {1}
    assert rows[3].messages[0] == {"role": "system", "content": "Be brief."} and rows[3].prompt_turns == 4
    assert rows[3].untrained == {2}
    system = {"role": "system", "content": "S."}  # replies that repeat the prompt after a system message of their own
    repeated = {"prompt": "Q?", "chosen": [system, *convo[:1], {"role": "assistant", "content": "Y"}],
                "rejected": [system, *convo[:1], {"role": "assistant", "content": "N"}], "tools": [{"type": "function",
                "function": {"name": "f"}}]}  # fmt: skip
    row = row_from_obj(repeated, "p.jsonl:9", "preference")
    assert row.messages[:2] == [system, convo[0]] and row.prompt_turns == 2 and row.tools[0]["function"]["name"] == "f"
    # the system message in the prompt, the replies repeating only the user turn: the user turn once (was twice)
    reply = [{"role": "assistant", "content": "Y"}], [{"role": "assistant", "content": "N"}]
    tail = {"prompt": [system, convo[0]], "chosen": [convo[0], *reply[0]], "rejected": [convo[0], *reply[1]]}
    for fmt, obj in (("preference", tail), ("kto", {"prompt": tail["prompt"], "completion": tail["chosen"], "label": True})):
        row = row_from_obj(obj, "p.jsonl:10", fmt)
        assert row.messages == [system, convo[0], *reply[0]] and row.prompt_turns == 2


def test_anthropic_hh_transcripts_are_read_as_conversations():
    """Anthropic HH-RLHF ships each reply as the whole conversation in one string and no prompt: the turns they share
    are the prompt (TRL splits them at the common characters instead, and trains on raw text). Was refused."""
    head = "\n\nHuman: Name a colour.\n\nAssistant: Teal.\n\nHuman: Another?"
    row = row_from_obj({"chosen": head + "\n\nAssistant: Plum.", "rejected": head + "\n\nAssistant: No."}, "hh:1", "preference")
    assert row.messages == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Plum."},
    ]
    assert row.rejected == [{"role": "assistant", "content": "No."}] and row.prompt_turns == 3 and row.untrained == {1}
    with pytest.raises(DataError, match=r"hh:2: rejected\[3\]: the assistant turn is empty"):  # HH has some: refused
        row_from_obj({"chosen": head + "\n\nAssistant: Plum.", "rejected": head + "\n\nAssistant:"}, "hh:2", "preference")
    kto = row_from_obj({"completion": head + "\n\nAssistant: Plum.", "label": False}, "hh:3", "kto")
    assert kto.messages == row.messages and kto.prompt_turns == 3 and kto.desirable is False
    # An empty prompt (a table's prompt column, blank for HH's rows) is no prompt: was an empty user turn, and the raw
    # transcript, markers and all, trained as the reply.
    blank = row_from_obj(
        {"prompt": " ", "chosen": head + "\n\nAssistant: Plum.", "rejected": head + "\n\nAssistant: No."}, "hh:5", "preference"
    )
    assert (blank.messages, blank.rejected) == (row.messages, row.rejected)
    assert row_from_obj({"prompt": "", "chosen": "A", "rejected": "B"}, "hh:6", "preference").messages[0]["content"] == ""
    # Stripped of the leading blank line (as many copies of HH are): the same conversation; was "missing field 'prompt'"
    stripped = {"chosen": (head + "\n\nAssistant: Plum.").lstrip(), "rejected": (head + "\n\nAssistant: No.").lstrip()}
    same = row_from_obj(stripped, "hh:7", "preference")
    assert (same.messages, same.rejected) == (row.messages, row.rejected)
    # The prompt as the transcript up to the reply, the replies plain (Dahoas' rm-static and full-hh-rlhf): its turns.
    cut = row_from_obj({"prompt": head + "\n\nAssistant:", "chosen": " Plum.", "rejected": " No."}, "hh:5", "preference")
    assert (cut.messages, cut.rejected, cut.prompt_turns) == (row.messages, row.rejected, 3)
    open_ended = row_from_obj({"prompt": head, "chosen": "Plum.", "rejected": "No."}, "hh:6", "preference")
    assert (open_ended.messages, open_ended.rejected) == (row.messages, row.rejected)
    plain = {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"}  # not a transcript
    with pytest.raises(DataError, match="missing field 'prompt'"):
        row_from_obj(plain, "hh:4", "preference")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"prompt": "Q?", "chosen": "Yes."}, "missing field 'rejected'"),
        ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, "are the same reply"),
        ({"prompt": "Q?", "chosen": "Yes.", "rejected": "  "}, "rejected: the assistant turn is empty"),
        ({"chosen": "Yes.", "rejected": "No."}, "missing field 'prompt'"),
        ({"prompt": [{"role": "assistant", "content": "Hi."}], "chosen": "Y", "rejected": "N"}, "must end with a user"),
        ({"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}], "rejected": "No."}, "field 'chosen': a reply is"),
        ({"prompt": "Q?", "chosen": 3, "rejected": "No."}, "field 'chosen' must be a string, a message or"),
        ({"prompt": "Q?", "chosen": [{"role": "bot", "content": "x"}], "rejected": "N"}, "chosen[0]: role 'bot'"),
        ({"prompt": "Q?", "chosen": {"role": "assistant", "content": "Y", "train": False}, "rejected": "N"}, "has no place"),
        (
            {
                "prompt": [{"role": "system", "content": "A"}, {"role": "user", "content": "Q"}],
                "chosen": "Y",
                "rejected": "N",
                "system": "B",
            },
            "field 'system' and the prompt's own system message differ",
        ),
    ],
)
def test_bad_pairs_name_the_line_and_field(obj, message):
    with pytest.raises(DataError) as err:
        row_from_obj(obj, "pairs.jsonl:7", "preference")
    assert "pairs.jsonl:7" in str(err.value) and message in str(err.value)


def test_unknown_keys_of_pairs_are_counted():
    unknown = UnknownKeys()
    row_from_obj({"prompt": "Q", "chosen": "Y", "rejected": "N", "score": 3}, "p.jsonl:1", "preference", unknown)
    assert unknown.counts == {"score": 1}


def test_both_replies_follow_the_same_prompt_tokens_and_train_only_the_reply(tokenizer):
    _, ex = render(tokenizer, PAIRS[2])
    rej = ex.rejected
    assert ex.prompt_len == rej.prompt_len and ex.input_ids[: ex.prompt_len] == rej.input_ids[: rej.prompt_len]
    assert trained_text(tokenizer, ex) == "Plum.<|im_end|>"  # not the prompt's assistant turn ("Teal.")
    assert trained_text(tokenizer, rej) == "I said teal already, so no.<|im_end|>"
    assert all(label == IGNORE for label in ex.labels[: ex.prompt_len])


def test_long_replies_are_cut_alike_and_a_prompt_that_fills_the_row_is_dropped(tokenizer):
    long = {"prompt": "Q?", "chosen": "yes " * 80, "rejected": "No."}
    renderer, ex = render(tokenizer, long, max_seq_len=48)
    assert len(ex.input_ids) == 48 and ex.rejected.input_ids == render(tokenizer, long)[1].rejected.input_ids
    assert renderer.stats.truncated == 1 and ex.input_ids[: ex.prompt_len] == ex.rejected.input_ids[: ex.prompt_len]
    renderer, ex = render(tokenizer, {"prompt": "word " * 80, "chosen": "Y", "rejected": "N"}, max_seq_len=48)
    assert ex is None and renderer.stats.dropped == 1
    renderer, ex = render(tokenizer, long, max_seq_len=48, overlong="drop")
    assert ex is None and renderer.stats.dropped == 1
    with pytest.raises(DataError, match=r"pairs.jsonl:1: \d+ tokens \(prompt \d+\) exceeds data.max_seq_len=48"):
        render(tokenizer, long, max_seq_len=48, overlong="error")


def test_untemplated_replies_that_end_with_eos_get_no_second_one(tokenizer):
    """data.chat_template=false: a reply that already ends with EOS (data prepared for TRL, whose trainers add it only
    where it is missing) is trained with that one EOS, not a second appended after it; others get theirs."""
    eos = tokenizer.eos_token
    pair = {"prompt": "2+2=", "chosen": "4" + eos, "rejected": "5"}
    _, ex = render(tokenizer, pair, chat_template=False)
    assert trained_text(tokenizer, ex) == "4" + eos and trained_text(tokenizer, ex.rejected) == "5" + eos
    renderer = Renderer(tokenizer, DataConfig(format="kto", choices=None, chat_template=False))
    ex = renderer(row_from_obj({"prompt": "2+2=", "completion": "4" + eos, "label": True}, "k.jsonl:1", "kto"))
    assert trained_text(tokenizer, ex) == "4" + eos and ex.input_ids.count(tokenizer.eos_token_id) == 1


def test_collate_puts_every_chosen_reply_before_the_rejected_ones(tokenizer):
    examples = [render(tokenizer, obj)[1] for obj in PAIRS]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, ex in enumerate(examples):
        for row, sample in ((i, ex), (3 + i, ex.rejected)):
            n = len(sample.input_ids)
            assert batch["input_ids"][row, :n].tolist() == sample.input_ids
            assert batch["labels"][row, :n].tolist() == sample.labels and batch["attention_mask"][row].sum() == n


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.objective=dpo"], "data.format: train.objective=dpo trains on preference pairs"),
        (["data.format=preference"], "data.format: preference rows train a preference objective"),
        (["train.objective=ppo"], "train.objective"),
        (["train.objective=simpo", "data.format=preference", "pref.loss_type=ipo"], "pref.loss_type: ipo is a DPO loss"),
        (["train.objective=dpo", "data.format=preference", "pref.label_smoothing=0.5"], "pref.label_smoothing: must be"),
        (["train.objective=dpo", "data.format=preference", "data.packing=true"], "data.packing: not with"),
        (["train.objective=orpo", "data.format=preference", "pref.beta=0"], "pref.beta"),
        # settings the objective would ignore (sft reads no pref.* at all; they were accepted there)
        (["pref.gamma=1.0"], "pref.gamma: SimPO's target margin; train.objective is sft"),
        (["pref.loss_type=ipo"], "pref.loss_type: ipo is a DPO loss; train.objective is sft"),
        (["pref.label_smoothing=0.1"], "pref.label_smoothing: applies to train.objective=dpo"),
        (["pref.beta=0.5"], "pref.beta: a preference objective's setting; train.objective is sft"),
        (["train.objective=dpo", "data.format=preference", "pref.undesirable_weight=1.5"], "pref.undesirable_weight: KTO's"),
    ],
)
def test_preference_settings_are_checked_at_start(tmp_path: Path, overrides, message):
    from dtune.config import validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(tiny_overrides(tmp_path, *overrides)))


# --- losses -------------------------------------------------------------------------------------------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def closed_form(objective: str, beta: float, pc, pr, rc, rr, nc, nr, loss_type="sigmoid", eps=0.0, gamma=0.0) -> float:
    """One pair's loss from the papers' formulas (see dtune.preference for the sources), in plain Python floats."""
    if objective == "dpo":
        z = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            return -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
        if loss_type == "hinge":
            return max(0.0, 1 - beta * z)
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2  # ipo
    mc, mr = pc / nc, pr / nr
    if objective == "simpo":
        return -_log_sigmoid(beta * (mc - mr) - gamma)
    log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))  # orpo
    return -mc - beta * _log_sigmoid(log_odds)


def _tiny_pairs(out: Path):
    """The tiny 4-bit Llama with a LoRA adapter moved away from zero (so policy and reference differ), and a batch of
    the three PAIRS."""
    from dtune.distributed.engine import Engine
    from dtune.model import build_model, load_tokenizer

    cfg = compose_config(tiny_overrides(out, "train.objective=dpo", "data.format=preference", "lora.dropout=0.0"))
    tok = load_tokenizer(cfg)
    model = build_model(cfg, Engine(cfg).device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    renderer = Renderer(tok, DataConfig(format="preference", choices=None))
    batch = collate([renderer(row_from_obj(o, f"p:{i}", "preference")) for i, o in enumerate(PAIRS)], tok.pad_token_id)
    return cfg, tok, model, batch


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    return _tiny_pairs(tmp_path_factory.mktemp("pref"))


def sequence_logps(model, batch, adapter: bool = True) -> tuple[list[float], list[int]]:
    """Summed log-probability of each row's labelled tokens, straight from the model's logits."""
    import contextlib

    with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["labels"][:, 1:] != IGNORE
    return (logp * mask).sum(dim=1).tolist(), mask.sum(dim=1).tolist()


@pytest.mark.parametrize(
    ("objective", "settings"),
    [
        ("dpo", {"beta": 0.1}),
        ("dpo", {"beta": 0.5, "label_smoothing": 0.2}),
        ("dpo", {"beta": 0.1, "loss_type": "ipo"}),
        ("dpo", {"beta": 2.0, "loss_type": "hinge"}),
        ("orpo", {"beta": 0.1}),
        ("simpo", {"beta": 2.0, "gamma": 0.7}),
    ],
)
def test_each_loss_is_its_closed_form_of_the_models_own_log_probabilities(tiny_pairs, objective, settings):
    from dtune.preference import PreferenceLoss

    _, _, model, batch = tiny_pairs
    policy, tokens = sequence_logps(model, batch)
    ref, _ = sequence_logps(model, batch, adapter=False)
    assert max(abs(a - b) for a, b in zip(policy, ref, strict=True)) > 1e-3  # the adapter matters
    model.eval()
    out = PreferenceLoss(model, 0, objective, **settings)(**batch)
    extra = {"loss_type": settings.get("loss_type", "sigmoid"), "eps": settings.get("label_smoothing", 0.0)}
    extra["gamma"] = settings.get("gamma", 0.0)
    want = [
        closed_form(objective, settings["beta"], policy[i], policy[3 + i], ref[i], ref[3 + i], tokens[i], tokens[3 + i], **extra)
        for i in range(3)
    ]
    assert out["loss_sum"].tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)
    stats = dict(zip(("rc", "rr", "acc", "margin", "lc", "lr", "lacc"), out["stats"].T.tolist(), strict=True))
    assert stats["lacc"] == [float(policy[i] > policy[3 + i]) for i in range(3)]
    assert stats["lc"] == pytest.approx(policy[:3], rel=1e-4) and stats["lr"] == pytest.approx(policy[3:], rel=1e-4)
    if objective == "dpo":
        assert stats["rc"] == pytest.approx([settings["beta"] * (policy[i] - ref[i]) for i in range(3)], rel=1e-3, abs=1e-6)
    assert stats["acc"] == [float(c > r) for c, r in zip(stats["rc"], stats["rr"], strict=True)]


def _mean_pair_loss(loss_model, batch) -> torch.Tensor:
    return loss_model(**batch)["loss_sum"].mean()


def _loss_and_gradient(model, loss, *args, **kwargs) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    value = loss(*args, **kwargs)
    value.backward()
    return float(value), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_dpo_equals_trls_dpo_trainer_on_the_same_batch(tmp_path: Path):
    """TRL's DPOTrainer (the reference implementation; a test-only dependency) computes the same sigmoid, IPO and
    hinge losses as dtune from the same tokens -- its loss is the mean over pairs of dtune's -- and the same gradient
    of the adapter (dtune's reference forward runs without gradients, with the adapter switched off)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from dtune.preference import PreferenceLoss

    _, tok, model, batch = _tiny_pairs(tmp_path)  # a model of its own: TRL's trainer changes the model it is given
    model.eval()
    data = Dataset.from_list([{"prompt": "Q?", "chosen": "Y", "rejected": "N"}] * 2)
    for loss_type, beta in (("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 2.0)):
        args = trl.DPOConfig(
            output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False, max_length=None
        )
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        # TRL takes an adapter it is given for an SFT adapter to go on from, and copies it as its reference ("ref");
        # without that copy its reference is the adapter switched off, as dtune's for a new adapter.
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        assert model.active_adapter == "default"
        for p in model.parameters():  # TRL casts a 4-bit base's adapter to bf16 (QLoRA's paper); dtune trains it in fp32
            if p.requires_grad:
                p.data = p.data.float()
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE).long(),
        }
        ours_loss = PreferenceLoss(model, 0, "dpo", beta, loss_type)
        theirs, their_grad = _loss_and_gradient(model, trainer._compute_loss, trainer.model, inputs, False)
        ours, our_grad = _loss_and_gradient(model, _mean_pair_loss, ours_loss, batch)
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), loss_type
        assert float((our_grad - their_grad).norm()) <= 1e-4 * float(their_grad.norm()), loss_type


def test_a_step_normalises_per_pair_however_pairs_fall_into_micro_batches(tiny_pairs):
    """One micro-batch of 4 pairs and two of 2 give the same gradient: each pair weighs 1 / the step's pairs."""
    from dtune.distributed.engine import Engine
    from dtune.preference import PreferenceLoss
    from dtune.train.step import accumulate_gradients

    cfg, tok, model, _ = tiny_pairs
    renderer = Renderer(tok, DataConfig(format="preference", choices=None))
    examples = [renderer(row_from_obj(o, f"p:{i}", "preference")) for i, o in enumerate([*PAIRS, PAIRS[0]])]
    loss_model = PreferenceLoss(model, 0, "dpo", 0.1)
    engine = Engine(cfg)
    model.train()
    grads = []
    for groups in ([examples], [examples[:2], examples[2:]]):
        model.zero_grad()
        loss, stats = accumulate_gradients(loss_model, [collate(g, tok.pad_token_id) for g in groups], engine, torch.tensor(4))
        grads.append((loss, stats, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)
    for a, b in zip(grads[0][2], grads[1][2], strict=True):  # fp32 sums over other paddings: 4e-7 of the norm
        assert float((a - b).norm()) <= 1e-5 * float(a.norm())


# --- runs ---------------------------------------------------------------------------------------------------------


def _short_run(out: Path, source: Path, *extra: str) -> list[str]:
    """12 steps of the tiny model on ``source``'s rows, 16 held out."""
    data = ["data=preference", f"data.source={source}", "data.eval_size=16", "data.max_seq_len=128"]
    return tiny_overrides(out, *data, "train.max_steps=12", "optim.lr=1e-2", *extra)


@pytest.mark.integration
@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_a_preference_run_learns_the_preferred_replies(tmp_path: Path, objective):
    """A short run: the held-out preference accuracy and margin rise from before training, and the run writes its
    figures, results and adapter as an SFT run does."""
    from dtune.train import run

    source = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(80))
    results = run(compose_config(_short_run(tmp_path / "out", source, f"train.objective={objective}")), tmp_path / "out")
    before, after = results["before"], results["after"]
    assert set(before) == {"eval/loss", "eval/rewards_chosen", "eval/rewards_rejected", "eval/accuracy", "eval/margin",
                           "eval/logps_chosen", "eval/logps_rejected", "eval/logps_accuracy"}  # fmt: skip
    assert after["eval/margin"] > before["eval/margin"] + 0.05 and after["eval/loss"] < before["eval/loss"], (before, after)
    assert after["eval/accuracy"] >= 0.75
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert len(steps) == 12 and all("train/accuracy" in r and "train/margin" in r for r in steps)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def _pref_overrides(tmp_path: Path, out: str, *extra: str) -> list[str]:
    source = tmp_path / "pairs.jsonl"
    if not source.exists():
        write_jsonl(source, pair_rows(40))
    return tiny_overrides(
        tmp_path / out,
        "train.objective=dpo",
        "data=preference",
        f"data.source={source}",
        "data.eval_size=8",
        "data.max_seq_len=128",
        "optim.lr=1e-2",
        *extra,
    )


def _train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.integration
def test_a_precomputed_reference_trains_as_the_reference_forward_and_is_cached(tmp_path: Path, caplog):
    """train.precompute_ref: the same losses and adapter as the reference's forward at every step; the log-probabilities
    are written beside the tokenized data and a second run reads them instead of computing them."""
    import logging

    from safetensors.torch import load_file

    from dtune.train import run

    live = run(compose_config(_pref_overrides(tmp_path, "live")), tmp_path / "live")
    with caplog.at_level(logging.INFO, logger="dtune"):
        first = run(compose_config(_pref_overrides(tmp_path, "pre", "train.precompute_ref=true")), tmp_path / "pre")
    assert "reference log-probabilities of 32 training pairs from the base (adapter off)" in caplog.text
    assert _train_losses(tmp_path / "pre") == pytest.approx(_train_losses(tmp_path / "live"), abs=1e-5)
    assert first["after"] == pytest.approx(live["after"], abs=1e-5)
    ours, theirs = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("pre", "live"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dtune"):
        run(compose_config(_pref_overrides(tmp_path, "again", "train.precompute_ref=true")), tmp_path / "again")
    assert "reference log-probabilities of 32 training pairs read from" in caplog.text
    assert _train_losses(tmp_path / "again") == _train_losses(tmp_path / "pre")


@pytest.mark.integration
def test_dpo_from_an_sft_adapter_takes_that_adapter_as_its_reference(tmp_path: Path):
    """train.init_adapter: DPO starts from an SFT run's adapter (a run dir is enough), whose log-probabilities are
    the reference: before training the rewards are 0 and the policy's log-probabilities are the SFT adapter's; then
    the margin grows. An adapter trained with other lora.* is refused, naming the setting."""
    from dtune.train import run

    sft = tmp_path / "sft"
    run(compose_config(tiny_overrides(sft, "optim.lr=1e-2")), sft)
    results = run(
        compose_config(_pref_overrides(tmp_path, "dpo", f"train.init_adapter={sft}", "train.max_steps=6")), tmp_path / "dpo"
    )
    before, after = results["before"], results["after"]
    assert before["eval/rewards_chosen"] == 0.0 and before["eval/margin"] == 0.0 and before["eval/accuracy"] == 0.5
    base = run(compose_config(_pref_overrides(tmp_path, "base", "train.max_steps=1")), tmp_path / "base")["before"]
    assert before["eval/logps_chosen"] != pytest.approx(base["eval/logps_chosen"], abs=1e-3)  # the SFT adapter's
    assert after["eval/margin"] > 0.05
    with pytest.raises(ConfigError, match=r"train.init_adapter: .* was trained with other adapter settings.*r: 16 there, 8 here"):
        run(compose_config(_pref_overrides(tmp_path, "bad", f"train.init_adapter={sft}", "lora.r=8")), tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"train.precompute_ref: is false, but with train.init_adapter"):
        run(
            compose_config(_pref_overrides(tmp_path, "bad2", f"train.init_adapter={sft}", "train.precompute_ref=false")),
            tmp_path / "b2",
        )


# --- KTO ----------------------------------------------------------------------------------------------------------


def kto_rows(n: int) -> list[dict]:
    """``n`` completions: the polite reply desirable, the curt one not (alternating)."""
    return [
        {"prompt": pair["prompt"], "completion": pair["chosen"] if i % 2 == 0 else pair["rejected"], "label": i % 2 == 0}
        for i, pair in enumerate(pair_rows(n))
    ]


def test_kto_rows_parse_with_their_label_and_bad_labels_are_named():
    row = row_from_obj({"prompt": "Q?", "completion": "A.", "label": False}, "k.jsonl:1", "kto")
    assert row.desirable is False and row.prompt_turns == 1 and row.messages[-1]["content"] == "A."
    convo = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert row_from_obj({"completion": convo, "label": True}, "k.jsonl:2", "kto").prompt_turns == 1
    with pytest.raises(DataError, match=r"k.jsonl:3: field 'label' must be true \(desirable\) or false; got 'yes'"):
        row_from_obj({"prompt": "Q?", "completion": "A.", "label": "yes"}, "k.jsonl:3", "kto")
    with pytest.raises(DataError, match=r"k\.jsonl:4: completion: the assistant turn is empty"):
        row_from_obj({"prompt": "Q?", "completion": "", "label": False}, "k.jsonl:4", "kto")


def test_kto_loss_is_its_closed_form_with_the_batch_kl_estimate(tiny_pairs):
    """KTO on 4 rows: each row's loss from the model's own log-probabilities, z0 the mean over the KL rows (each prompt
    with the next row's completion) of the policy's minus the reference's log-probability, clipped at 0."""
    from dtune.preference import KTOLoss

    _, tok, model, _ = tiny_pairs
    renderer = Renderer(tok, DataConfig(format="kto", choices=None))
    examples = [renderer(row_from_obj(o, f"k:{i}", "kto")) for i, o in enumerate(kto_rows(4))]
    batch = collate(examples, tok.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False]
    kl_rows = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"], "labels": batch["kl_labels"]}
    for i, row in enumerate(kl_rows["input_ids"].tolist()):  # row i: its prompt, then row i+1's completion
        a, b = examples[i], examples[(i + 1) % 4]
        assert row[: len(a.input_ids[: a.prompt_len]) + len(b.input_ids) - b.prompt_len] == (
            a.input_ids[: a.prompt_len] + b.input_ids[b.prompt_len :]
        )
    policy, _ = sequence_logps(model, batch)
    ref, _ = sequence_logps(model, batch, adapter=False)
    kl_policy, _ = sequence_logps(model, kl_rows)
    kl_ref, _ = sequence_logps(model, kl_rows, adapter=False)
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_ref, strict=True)) / 4)
    beta, wd, wu = 0.5, 1.0, 1.5
    want = []
    for i, good in enumerate(batch["desirable"].tolist()):
        r = policy[i] - ref[i]
        want.append(wd * (1 - 1 / (1 + math.exp(-beta * (r - z0)))) if good else wu * (1 - 1 / (1 + math.exp(-beta * (z0 - r)))))
    model.eval()
    out = KTOLoss(model, 0, beta, wd, wu)(**batch)
    assert out["loss_sum"].tolist() == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert out["stats"][:, 4].tolist() == pytest.approx([z0] * 4, abs=1e-5)


def test_kto_kl_rows_keep_the_other_rows_completion_whole_up_to_max_seq_len(tiny_pairs):
    """A KL row is a prompt with another row's completion: cut to the micro-batch's width (the review's finding: two
    32-token rows, one with a 30-token prompt, kept 2 of the other's 29 completion tokens) the KL estimate is biased
    towards 0. Its own width, capped at data.max_seq_len, as TRL builds them; a row left without a completion token
    does not count in the estimate."""
    from dtune.preference import KTOLoss

    def row(prompt: int, completion: int, good: bool) -> Example:
        ids = list(range(10, 10 + prompt + completion))
        return Example(ids, [IGNORE] * prompt + ids[prompt:], prompt, desirable=good)

    long_prompt, long_answer = row(30, 2, True), row(3, 29, False)
    batch = collate([long_prompt, long_answer], pad_id=0, max_len=64)
    labelled = (batch["kl_labels"][:, 1:] != IGNORE).sum(dim=1).tolist()
    assert labelled == [29, 2]  # each completion whole
    assert batch["kl_input_ids"].shape[1] == 30 + 29 and batch["input_ids"].shape[1] == 32
    cut = collate([long_prompt, long_answer], pad_id=0, max_len=40)
    assert cut["kl_input_ids"].shape[1] == 40 and (cut["kl_labels"][0, 1:] != IGNORE).sum() == 40 - 30

    _, _, model, _ = tiny_pairs
    model.eval()
    kl = collate([long_prompt, long_answer], pad_id=0, max_len=30)  # row 0's prompt fills it: no completion left
    assert (kl["kl_labels"][0] != IGNORE).sum() == 0
    terms = KTOLoss(model, 0, 0.1).kl_terms(kl["kl_input_ids"], kl["kl_attention_mask"], kl["kl_labels"])
    assert terms[1].item() == 1.0  # the row without a completion token is not counted


@pytest.mark.integration
def test_kto_evaluation_leaves_no_row_alone_in_a_chunk_to_be_its_own_kl_row():
    """Held-out KTO rows are scored in chunks whose KL rows pair each prompt with another row's completion: a ragged
    last chunk of one row would pair it with its own (a matched row, its own log-ratio taken for the KL estimate)."""
    import contextlib

    from dtune.evaluate import evaluate
    from dtune.preference import KTO_STAT_KEYS

    class Scorer(torch.nn.Module):
        stat_keys, objective = KTO_STAT_KEYS, "kto"

        def __init__(self):
            super().__init__()
            self.matched = []

        def forward(self, input_ids, kl_input_ids, **_):
            self.matched.append(input_ids.shape == kl_input_ids.shape and bool((input_ids == kl_input_ids).all()))
            return {"loss_sum": torch.zeros(len(input_ids)), "stats": torch.zeros(len(input_ids), len(KTO_STAT_KEYS))}

    class OneRank:
        rank, world_size, device = 0, 1, "cpu"
        unwrap, autocast, sum = staticmethod(lambda m: m), staticmethod(contextlib.nullcontext), staticmethod(lambda t: t)

    rows = [Example([1, 2, 3 + i, 9], [IGNORE, IGNORE, 3 + i, 9], 2, desirable=i % 2 == 0) for i in range(5)]
    scorer = Scorer()
    evaluate(scorer, rows, 2, 0, OneRank(), 16)
    assert scorer.matched and not any(scorer.matched)


def test_a_kto_run_learns_to_tell_desirable_from_undesirable(tmp_path: Path):
    from dtune.train import run

    source = write_jsonl(tmp_path / "kto.jsonl", kto_rows(80))
    overrides = _short_run(tmp_path / "out", source, "train.objective=kto", "data.format=kto")
    results = run(compose_config(overrides), tmp_path / "out")
    before, after = results["before"], results["after"]
    assert {"eval/kl", "eval/rewards_desirable", "eval/rewards_undesirable", "eval/accuracy"} <= set(before)
    assert before["eval/accuracy"] == 0.5 and after["eval/accuracy"] >= 0.75, (before, after)
    assert after["eval/rewards_desirable"] > after["eval/rewards_undesirable"] and after["eval/loss"] < before["eval/loss"]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/kl" in r for r in records if "train/loss" in r)


def test_orpo_stays_finite_on_a_reply_the_model_is_certain_of():
    """A mean log-probability of 0 (every token's cross-entropy exactly 0 in fp32) has infinite odds: the loss and its
    gradient stay finite."""
    from dtune.preference import PairLogps, orpo_loss

    chosen = torch.tensor([0.0, -3e-8, -2.0], requires_grad=True)
    p = PairLogps(chosen, torch.tensor([-1.0, -0.5, -1e-9]), torch.ones(3), torch.ones(3))
    loss, _ = orpo_loss(p, 0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all()
