"""Preference objectives: DPO (sigmoid, IPO, hinge), ORPO, SimPO and KTO, from per-sequence log-probabilities.

Every function here takes the summed log-probabilities of each reply's trained tokens (``logp``: the negative of
:class:`~dtune.loss.CompletionLoss`'s ``loss_sum``) and their token counts, and returns the loss of each pair (or
KTO row) -- not a mean: the training step sums them over micro-batches and ranks and divides by the step's pairs, so
accumulation and data parallelism give the gradient of one big batch, as the token-normalised SFT loss does.

Sources (and the reference implementation the tests compare with):

* DPO: Rafailov et al. 2023, arXiv:2305.18290, eq. 7; ``label_smoothing`` is conservative DPO (cDPO, Mitchell 2023:
  the preference label flipped with probability epsilon). Hinge: SLiC (Zhao et al. 2023, arXiv:2305.10425). IPO:
  Azar et al. 2023, arXiv:2310.12036, eq. 17, on per-token mean log-ratios as TRL's ``DPOTrainer`` computes it (its
  authors' normalisation). TRL's ``DPOTrainer`` (``loss_type`` sigmoid, ipo, hinge) is the oracle of the tests.
* ORPO: Hong et al. 2024, arXiv:2403.07691, eqs. 4-7: the chosen reply's per-token NLL plus ``beta`` times the
  negative log-sigmoid of the log odds ratio of the per-token mean probabilities (TRL's ``ORPOTrainer``; its NLL is
  the mean over the batch's chosen tokens, dtune's the mean over each pair's, so every pair weighs the same).
* SimPO: Meng et al. 2024, arXiv:2405.14734, eq. 6: ``-log sigmoid(beta * (mean logp_w - mean logp_l) - gamma)``.
* KTO: Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8, with the reference point ``z0`` the batch estimate of the KL
  divergence from mismatched prompt/completion pairs, clipped at 0 and not differentiated (TRL's ``KTOTrainer``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtune.data import IGNORE
from dtune.loss import CompletionLoss
from dtune.schema import DPO_LOSSES, OBJECTIVES, REFERENCE_FREE, DtuneConfig

__all__ = ["DPO_LOSSES", "OBJECTIVES", "REFERENCE_FREE", "PreferenceLoss", "dpo_loss", "kto_loss", "orpo_loss", "simpo_loss"]

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
"""pref.beta when null, per objective: the papers' (and TRL's) defaults."""


@dataclass
class PairLogps:
    """Per-pair figures of one micro-batch, all [pairs] fp32: summed log-probabilities of the trained tokens of the
    chosen and rejected replies under the policy (``chosen``, ``rejected``) and the reference (``ref_chosen``,
    ``ref_rejected``; None for reference-free objectives), and the replies' trained-token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def _mean(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logp / tokens.clamp(min=1)


def dpo_loss(p: PairLogps, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """[pairs] DPO loss. ``loss_type``: sigmoid (``-(1-e) log s(b z) - e log s(-b z)``, z the chosen minus rejected
    log-ratio to the reference, e = ``label_smoothing``), hinge (``relu(1 - b z)``) or ipo (``(z' - 1/(2b))^2``, z' on
    per-token means). Raises ValueError for another ``loss_type`` or a missing reference."""
    if p.ref_chosen is None or p.ref_rejected is None:
        raise ValueError("dpo_loss: the reference log-probabilities are missing")
    chosen_ratio, rejected_ratio = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        z = _mean(chosen_ratio, p.chosen_tokens) - _mean(rejected_ratio, p.rejected_tokens)
        return (z - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo_loss: loss_type {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, without cancellation (Maechler 2012: log1p(-exp(x)) below -log 2, else
    log(-expm1(x)))."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(p: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([pairs] ORPO loss, [pairs] log odds ratio): the chosen reply's per-token NLL plus ``beta`` times
    ``-log s(log odds(y_w) - log odds(y_l))``, odds of the per-token mean probability ``P``: ``P / (1 - P)``."""
    chosen, rejected = _mean(p.chosen, p.chosen_tokens), _mean(p.rejected, p.rejected_tokens)
    # A reply the model is certain of (mean log-probability 0 in fp32) has infinite odds: capped, so that the gradient
    # stays finite (log1mexp(0) is -inf, and its gradient NaN even through torch.where's other branch).
    cap = -1e-6
    log_odds = (chosen - rejected) - (log1mexp(chosen.clamp(max=cap)) - log1mexp(rejected.clamp(max=cap)))
    return -chosen - beta * F.logsigmoid(log_odds), log_odds


def simpo_loss(p: PairLogps, beta: float, gamma: float) -> torch.Tensor:
    """[pairs] SimPO loss: ``-log s(beta * (mean logp_w - mean logp_l) - gamma)``, means per trained token."""
    margin = _mean(p.chosen, p.chosen_tokens) - _mean(p.rejected, p.rejected_tokens)
    return -F.logsigmoid(beta * margin - gamma)


def kto_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """[rows] KTO loss: ``w_d (1 - s(beta (r - z0)))`` for a desirable completion, ``w_u (1 - s(beta (z0 - r)))`` for
    an undesirable one; ``r = logp - ref_logp`` [rows], ``desirable`` [rows] bool, ``kl`` the reference point z0 (the
    caller's estimate; clipped at 0 and detached here)."""
    z0 = torch.as_tensor(kl, dtype=logp.dtype, device=logp.device).detach().clamp(min=0)
    ratio = logp - ref_logp
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad)


def rewards(p: PairLogps, beta: float, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([pairs] chosen, [pairs] rejected) implicit rewards, detached: ``beta`` times the log-ratio to the reference
    (DPO), ``beta`` times the per-token mean log-probability (SimPO, ORPO: no reference)."""
    if objective in REFERENCE_FREE:
        chosen, rejected = _mean(p.chosen, p.chosen_tokens), _mean(p.rejected, p.rejected_tokens)
    else:
        assert p.ref_chosen is not None and p.ref_rejected is not None
        chosen, rejected = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    return (beta * chosen).detach(), (beta * rejected).detach()


def precomputes_reference(cfg: DtuneConfig) -> bool:
    """Whether the run computes the reference's log-probabilities once before training (train.precompute_ref; null:
    with train.init_adapter, which needs it)."""
    if cfg.train.objective in ("sft", *REFERENCE_FREE):
        return False
    return bool(cfg.train.precompute_ref) or (cfg.train.precompute_ref is None and bool(cfg.train.init_adapter))


STAT_KEYS = ("rewards_chosen", "rewards_rejected", "accuracy", "margin", "logps_chosen", "logps_rejected", "logps_accuracy")
"""Per-pair figures :class:`PreferenceLoss` returns (``stats``: [pairs, len(STAT_KEYS)]) and the step and the
evaluation average: the implicit rewards, preference accuracy (the chosen reward above the rejected; a tie counts
half: 0.5 before DPO's first step, where the policy is its reference), their margin, the summed log-probabilities of
the replies under the policy, and how often the policy itself gives the chosen reply the higher one (informative from
the start: for one-token answers it is the policy's accuracy on the pairs' question)."""


class PreferenceLoss(CompletionLoss):
    """The loss of a micro-batch of preference pairs: ``2 x pairs`` rows, the chosen replies then the rejected ones
    (:func:`dtune.data.batching.collate`). The policy's log-probabilities come from one forward of all rows; the
    reference's from a second forward of the same rows under ``torch.no_grad`` with the adapter switched off (PEFT's
    ``disable_adapter``: the frozen base, no second model in memory), or from ``ref_logps`` when precomputed. The
    output head projects only the labelled positions and is chunked as in SFT (:class:`CompletionLoss`).

    ``objective``: dpo, orpo or simpo (see the module docstring); ``beta``, ``loss_type``, ``label_smoothing``,
    ``gamma`` as :class:`~dtune.schema.PreferenceConfig` says.
    """

    stat_keys = STAT_KEYS

    def __init__(
        self,
        model: nn.Module,
        chunk_tokens: int,
        objective: str,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
    ) -> None:
        super().__init__(model, chunk_tokens)
        if objective not in ("dpo", "orpo", "simpo"):
            raise ValueError(f"PreferenceLoss: objective {objective!r} is not dpo, orpo or simpo")
        self.objective, self.beta, self.loss_type = objective, beta, loss_type
        self.label_smoothing, self.gamma = label_smoothing, gamma

    @classmethod
    def of(cls, cfg: DtuneConfig, model: nn.Module) -> CompletionLoss:
        """The loss module of ``cfg.train.objective`` around ``model``: :class:`CompletionLoss` for sft, :class:`KTOLoss`
        for kto, else this."""
        objective, pref = cfg.train.objective, cfg.pref
        if objective == "sft":
            return CompletionLoss(model, cfg.train.loss_chunk_tokens)
        beta = pref.beta if pref.beta is not None else DEFAULT_BETA[objective]
        if objective == "kto":
            return KTOLoss(model, cfg.train.loss_chunk_tokens, beta, pref.desirable_weight, pref.undesirable_weight)
        gamma = pref.gamma if pref.gamma is not None else 1.0
        return cls(model, cfg.train.loss_chunk_tokens, objective, beta, pref.loss_type, pref.label_smoothing, gamma)

    @property
    def needs_reference(self) -> bool:
        return self.objective not in REFERENCE_FREE

    def _score(
        self, what: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """[rows] summed log-probabilities of the labelled tokens, without gradients, under the model with its adapter
        (``policy``) or under the reference (``reference``: the base, the adapter switched off)."""
        if what not in ("policy", "reference"):
            raise ValueError(f"score: {what!r} is not policy or reference")
        off = self.model.disable_adapter() if what == "reference" and hasattr(self.model, "disable_adapter") else None
        with torch.no_grad(), off or contextlib.nullcontext():  # (a model without an adapter is its own reference)
            return -CompletionLoss.forward(self, input_ids, attention_mask, labels)["loss_sum"]

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        gather_at: torch.Tensor | None = None,
        score: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels: [2 x pairs, seq]; ref_logps: [2 x pairs] or None (computed here).
        ``gather_at`` is accepted for the evaluation's call and ignored.

        Returns ``loss_sum`` [pairs] (each pair's loss), ``tokens`` [pairs] (1 each: the step normalises per pair)
        and ``stats`` [pairs, len(STAT_KEYS)] (detached). With ``score`` (policy, reference) only ``logps`` [rows]:
        the rows' summed log-probabilities under the policy or the reference -- through ``forward``, so that the
        engines' hooks (FSDP2's root, DeepSpeed's engine) run as in training.
        """
        if score is not None:
            return {"logps": self._score(score, input_ids, attention_mask, labels)}
        out = super().forward(input_ids, attention_mask, labels)
        logp, tokens = -out["loss_sum"], out["tokens"]
        pairs = logp.shape[0] // 2
        if self.needs_reference and ref_logps is None:
            ref_logps = self._score("reference", input_ids, attention_mask, labels)
        ref = (None, None) if ref_logps is None else (ref_logps[:pairs].float(), ref_logps[pairs:].float())
        p = PairLogps(logp[:pairs], logp[pairs:], tokens[:pairs], tokens[pairs:], *ref)
        if self.objective == "dpo":
            loss = dpo_loss(p, self.beta, self.loss_type, self.label_smoothing)
        elif self.objective == "orpo":
            loss = orpo_loss(p, self.beta)[0]
        else:
            loss = simpo_loss(p, self.beta, self.gamma)
        chosen, rejected = rewards(p, self.beta, self.objective)
        accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
        prefers = (p.chosen > p.rejected).float() + 0.5 * (p.chosen == p.rejected).float()
        stats = torch.stack(
            [chosen, rejected, accuracy, chosen - rejected, p.chosen.detach(), p.rejected.detach(), prefers.detach()], dim=1
        )
        return {"loss_sum": loss, "tokens": torch.ones_like(loss), "stats": stats}


KTO_STAT_KEYS = ("rewards_desirable", "desirable", "rewards_undesirable", "undesirable", "kl", "logps", "accuracy")
"""Per-row figures :class:`KTOLoss` returns (``stats``: [rows, len(KTO_STAT_KEYS)]); averaged over rows, then made
into the step's and the evaluation's figures by :func:`figures`: the implicit reward (beta x the log-ratio to the
reference) of the desirable and of the undesirable completions, the KL estimate z0, the completions'
log-probabilities, and the accuracy of the reward's sign (above 0 for a desirable completion, below for an
undesirable one; a tie counts half)."""


def figures(objective: str, means: dict[str, float]) -> dict[str, float]:
    """The step's (or evaluation's) figures from the per-item means of the loss module's stats: as they are for the
    pair objectives; for KTO the rewards averaged over the desirable and the undesirable completions alone (a kind
    the step lacks is left out)."""
    if objective != "kto":
        return means
    out = {k: means[k] for k in ("kl", "logps", "accuracy")}
    for kind in ("desirable", "undesirable"):
        if means[kind] > 0:
            out[f"rewards_{kind}"] = means[f"rewards_{kind}"] / means[kind]
    return out


class KTOLoss(PreferenceLoss):
    """The KTO loss of a micro-batch of completions, each desirable or not (``desirable`` [rows] bool), with the KL
    rows of the same micro-batch (each prompt followed by the next row's completion: ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_labels``). The reference point z0 is ``kl`` when given (the training step's estimate
    over all its micro-batches and ranks: :func:`dtune.train.step.train_step`), else this micro-batch's (evaluation).
    The reference is the base with the adapter switched off, as for DPO. ``forward(..., score="kl")`` returns the
    micro-batch's KL terms: ``kl_sum`` (sum over its KL rows of policy minus reference log-probability) and
    ``kl_rows``."""

    stat_keys = KTO_STAT_KEYS

    def __init__(
        self, model: nn.Module, chunk_tokens: int, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        CompletionLoss.__init__(self, model, chunk_tokens)
        self.objective, self.beta = "kto", beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def kl_terms(self, kl_input_ids: torch.Tensor, kl_attention_mask: torch.Tensor, kl_labels: torch.Tensor) -> torch.Tensor:
        """[2]: the sum over the KL rows of (policy - reference) summed log-probability, and their number; a KL row
        left without a completion token (its prompt fills ``data.max_seq_len``) is not counted."""
        policy = self._score("policy", kl_input_ids, kl_attention_mask, kl_labels)
        ref = self._score("reference", kl_input_ids, kl_attention_mask, kl_labels)
        counted = (kl_labels[:, 1:] != IGNORE).any(dim=1)
        return torch.stack([((policy - ref) * counted).float().sum(), counted.sum().float()])

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        desirable: torch.Tensor | None = None,
        kl_input_ids: torch.Tensor | None = None,
        kl_attention_mask: torch.Tensor | None = None,
        kl_labels: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        gather_at: torch.Tensor | None = None,
        score: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels: [rows, seq]; the KL rows likewise. Returns ``loss_sum`` [rows] (each
        row's loss), ``tokens`` [rows] (1 each: the step normalises per row) and ``stats`` [rows, len(KTO_STAT_KEYS)]."""
        assert kl_input_ids is not None and kl_attention_mask is not None and kl_labels is not None and desirable is not None
        if score == "kl":
            return {"kl": self.kl_terms(kl_input_ids, kl_attention_mask, kl_labels)}
        if score is not None:
            return {"logps": self._score(score, input_ids, attention_mask, labels)}
        if kl is None:
            terms = self.kl_terms(kl_input_ids, kl_attention_mask, kl_labels)
            kl = terms[0] / terms[1].clamp(min=1)
        logp = -CompletionLoss.forward(self, input_ids, attention_mask, labels)["loss_sum"]
        if ref_logps is None:
            ref_logps = self._score("reference", input_ids, attention_mask, labels)
        z0 = kl.detach().float().clamp(min=0)
        loss = kto_loss(logp, ref_logps.float(), desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        reward = (self.beta * (logp - ref_logps.float())).detach()
        good = desirable.float()
        right = torch.where(desirable, reward > 0, reward < 0).float() + 0.5 * (reward == 0).float()
        stats = torch.stack(
            [reward * good, good, reward * (1 - good), 1 - good, z0.expand_as(reward), logp.detach(), right], dim=1
        )
        return {"loss_sum": loss, "tokens": torch.ones_like(loss), "stats": stats}
