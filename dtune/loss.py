"""Completion loss that projects to the vocabulary only where a label is.

A causal LM's forward computes logits for every position: [batch, seq, vocab] in fp32 is the largest tensor of a
QLoRA step for modern vocabularies (128k for Llama 3), and for instruction data most positions are prompt tokens
that carry no loss. :class:`CompletionLoss` runs the decoder, keeps the hidden states of the positions that
predict a labelled token, and applies the output head to those alone. Same loss, less compute and memory (on
the default job, the 49k-vocab head over all positions is about a fifth of the forward FLOPs).

It is an ``nn.Module`` around the PEFT model so that engines (DDP, ZeRO, FSDP) wrap it and their forward hooks
see the whole computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtune.data import IGNORE
from dtune.errors import ConfigError

HEAD_CHECK_TOKENS = 8  # tokens of the first row that the one-time check of the output head runs on
HEAD_CHECK_TOLERANCE = 0.02  # relative L2 difference: 16-bit rounding is ~0.5%; a missed scale is 10% and more


def logit_transform(config: object) -> tuple[float, float | None]:
    """(scale, softcap) that a model's forward applies to ``lm_head``'s output, read from its config or, for
    multimodal wrappers, its text config: ``logits * scale``, then ``tanh(logits / softcap) * softcap``.

    Scales: Granite's ``logits_scaling`` (divides), Cohere's ``logit_scale`` and Falcon-H1's ``lm_head_multiplier``
    (multiply); softcap: Gemma 2/3/3n's ``final_logit_softcapping``. None of them: (1.0, None). The first forward
    checks the result against the model's own (:meth:`CompletionLoss.check_head`)."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)

    def first(name: str) -> float | None:
        return next((v for c in configs if (v := getattr(c, name, None)) is not None), None)

    scale = 1.0
    if (divide := first("logits_scaling")) is not None:
        scale /= float(divide)
    for name in ("logit_scale", "lm_head_multiplier"):
        if (multiply := first(name)) is not None:
            scale *= float(multiply)
    softcap = first("final_logit_softcapping")
    return scale, float(softcap) if softcap else None


class CompletionLoss(nn.Module):
    """``chunk_tokens``: in training, labelled positions beyond this many are split into chunks whose logits are
    recomputed in backward (activation checkpointing of the head + cross-entropy), so at most one chunk's fp32
    logits and gradients exist at a time -- 12 bytes x vocab per labelled token otherwise (1.5 GB per 1,024 tokens at
    Llama 3's 128k vocabulary). 0: never. The extra cost is one more head forward per labelled token."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 0) -> None:
        super().__init__()
        self.model = model  # a PeftModel (or any transformers causal LM)
        self.chunk_tokens = chunk_tokens
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = base.get_decoder()
        self._head = base.get_output_embeddings()
        self._scale, self._softcap = logit_transform(base.config)
        self._config = base.config
        self._head_checked = False

    def _token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden), targets, reduction="none")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d] -> fp32 logits [n, vocab], as the model's own forward computes them (see
        :func:`logit_transform`)."""
        out = self._head(hidden).float()
        if self._scale != 1.0:
            out = out * self._scale
        if self._softcap:
            out = torch.tanh(out / self._softcap) * self._softcap
        return out

    def check_head(self, input_ids: torch.Tensor) -> None:
        """Compare :meth:`logits` with the model's own forward on the first tokens of ``input_ids`` [batch, seq], once:
        a model whose forward changes its logits in a way :func:`logit_transform` does not know (a scale under another
        name, remote code) would otherwise train, be evaluated and score preferences at the wrong temperature, with
        nothing to show for it but an adapter that behaves badly under the model's own forward (generate, merge).

        Raises :class:`~dtune.errors.ConfigError` naming the architecture and the difference."""
        self._head_checked = True
        ids = input_ids[:1, :HEAD_CHECK_TOKENS]
        training = self.training
        self.eval()  # the same forward twice: no dropout masks (a resumed run's first forward is a training step)
        try:
            with torch.no_grad():
                theirs = self.model(input_ids=ids, use_cache=False).logits[0].float()
                ours = self.logits(self._decoder(input_ids=ids, use_cache=False).last_hidden_state[0])
        finally:
            self.train(training)
        error_t = ((ours - theirs).norm() / theirs.norm().clamp_min(1e-6)).nan_to_num(nan=float("inf")).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(error_t, op=torch.distributed.ReduceOp.MAX)  # every rank decides alike
        error = error_t.item()
        if not error <= HEAD_CHECK_TOLERANCE:  # (NaN too)
            arch = ", ".join(getattr(self._config, "architectures", None) or [type(self._config).__name__])
            raise ConfigError(
                f"model {arch}: dtune's output head computes other logits than the model's own forward (relative "
                f"difference {error:.3g}): its forward scales or caps them in a way dtune does not reproduce (dtune "
                "knows final_logit_softcapping, logits_scaling, logit_scale and lm_head_multiplier); training would "
                "run at the wrong temperature"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        gather_at: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """input_ids, labels, attention_mask: [batch, seq]; gather_at: [batch] positions or None. position_ids
        [batch, seq] come with packed rows: the model then gets no attention mask and finds the samples from the
        restarting position ids, each layer with its own (sliding-window or full) causal mask -- see
        dtune.data.packing.

        Returns ``loss_sum`` and ``tokens``, both [batch] (summed cross-entropy and count of labelled tokens per
        row), and with ``gather_at`` the fp32 logits there, ``logits_at``: [batch, vocab].
        """
        if not self._head_checked:
            self.check_head(input_ids)
        if position_ids is not None:
            attention_mask = None
        hidden = self._decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE  # position t predicts token t+1
        rows = keep.nonzero()[:, 0]
        selected, wanted = hidden[:, :-1][keep], targets[keep]
        if self.chunk_tokens and torch.is_grad_enabled() and selected.shape[0] > self.chunk_tokens:
            from torch.utils.checkpoint import checkpoint

            chunks = zip(selected.split(self.chunk_tokens), wanted.split(self.chunk_tokens), strict=True)
            token_loss = torch.cat([checkpoint(self._token_loss, h, t, use_reentrant=False) for h, t in chunks])
        else:
            token_loss = self._token_loss(selected, wanted)
        loss_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_loss)
        out = {"loss_sum": loss_sum, "tokens": keep.sum(dim=1)}
        if gather_at is not None:
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), gather_at]
            out["logits_at"] = self.logits(picked)
        return out
