"""Packing: several samples in one row of up to ``data.max_seq_len`` tokens, with no attention between them.

Each packed row carries the lengths of its samples. Collated, it gets position ids that restart at 0 for every
sample, and a block-diagonal causal mask [batch, 1, seq, seq] (True = may attend): a token sees the earlier
tokens of its own sample only, so a packed row computes exactly what its samples would alone -- minus the padding.
The first token of each sample is never a label (nothing of its sample precedes it).
"""

from __future__ import annotations

import torch

from dtune.data.examples import IGNORE, Example


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Greedy, in order: append samples to the current row while they fit. Returns new Examples with ``segments``."""
    rows: list[Example] = []
    current: list[Example] = []
    used = 0

    def flush() -> None:
        ids: list[int] = []
        labels: list[int] = []
        for ex in current:
            ids += ex.input_ids
            labels += [IGNORE, *ex.labels[1:]]
        rows.append(Example(ids, labels, prompt_len=-1, segments=[len(ex.input_ids) for ex in current]))

    for ex in examples:
        if current and used + len(ex.input_ids) > max_len:
            flush()
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        flush()
    return rows


def segment_ids(segments: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width]: the index of the sample each token belongs to, -1 on padding."""
    out = torch.full((len(segments), width), -1, dtype=torch.long)
    for row, lengths in enumerate(segments):
        start = 0
        for i, n in enumerate(lengths):
            out[row, start : start + n] = i
            start += n
    return out


def position_ids(segments: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width]: 0, 1, ... restarting at every sample; padding continues the last count (it is masked)."""
    out = torch.zeros((len(segments), width), dtype=torch.long)
    for row, lengths in enumerate(segments):
        parts = [torch.arange(n) for n in lengths]
        used = sum(lengths)
        if used < width:
            parts.append(torch.arange(width - used))
        out[row] = torch.cat(parts)[:width]
    return out


def block_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] bool from segment ids: same sample and not in the future.

    A padding query attends to position 0 only (a fully masked row would turn SDPA's softmax into NaN), so the
    diagonal is True exactly at real tokens (see :func:`real_tokens`)."""
    real = seg >= 0
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
    mask = same & causal & real[:, None, :] & real[:, :, None]
    mask[:, :, 0] |= ~real
    return mask[:, None]


def real_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of non-padding tokens in a batch, from a [batch, seq] mask or a packed [batch, 1, seq, seq] one."""
    if attention_mask.dim() == 2:
        return attention_mask.sum()
    return attention_mask.diagonal(dim1=-2, dim2=-1).sum()
