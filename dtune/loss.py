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
        self._softcap = getattr(base.config, "final_logit_softcapping", None)
        self._config = base.config

    def _token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden), targets, reduction="none")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, d] -> fp32 logits [n, vocab]."""
        out = self._head(hidden).float()
        if self._softcap:  # Gemma 2-style models cap logits in their own forward
            out = torch.tanh(out / self._softcap) * self._softcap
        return out

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
