"""Packing: several samples in one row of up to ``data.max_seq_len`` tokens, with no attention between them.

Each packed row carries the lengths of its samples. Collated, it gets position ids that restart at 0 for every
sample -- and at the padding after the last one, which so becomes a sample of its own -- and no attention mask for
the model: transformers (5.x ``masking_utils``) finds the samples from the restarting position ids and builds each
layer's mask from them, block-diagonal and causal, *with the layer's sliding window* for sliding-window layers
(Gemma 2/3, Mistral v0.1, some Qwen2 and gpt-oss layers), for SDPA and eager alike; flash-attention's
variable-length kernel takes the same position ids. A packed row so computes exactly what its samples would alone.
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


def position_ids(segments: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width]: 0, 1, ... restarting at every sample and at the padding after the last (its own sample)."""
    out = torch.zeros((len(segments), width), dtype=torch.long)
    for row, lengths in enumerate(segments):
        parts = [torch.arange(n) for n in lengths]
        used = sum(lengths)
        if used < width:
            parts.append(torch.arange(width - used))
        out[row] = torch.cat(parts)[:width]
    return out
