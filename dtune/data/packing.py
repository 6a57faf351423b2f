"""Packing: several samples in one row of up to ``data.max_seq_len`` tokens, with no attention between them.

Which samples share a row is a bin-packing problem; :func:`pack_bins` solves it with best-fit decreasing (Johnson
1973; at most 11/9 of the optimal number of rows plus a constant, and in practice within a row or two of it), which
fills rows better than appending samples in order until the next one does not fit.

Each packed row carries the lengths of its samples. Collated, it gets position ids that restart at 0 for every
sample -- and at the padding after the last one, which so becomes a sample of its own -- and no attention mask for
the model: transformers (5.x ``masking_utils``) finds the samples from the restarting position ids and builds each
layer's mask from them, block-diagonal and causal, *with the layer's sliding window* for sliding-window layers
(Gemma 2/3, Mistral v0.1, some Qwen2 and gpt-oss layers), for SDPA and eager alike; flash-attention's
variable-length kernel takes the same position ids. A packed row so computes exactly what its samples would alone.
The first token of each sample is never a label (nothing of its sample precedes it).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch


def pack_bins(lengths: Sequence[int] | np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: samples in order of decreasing length (ties by index), each into the fullest row it still
    fits in, else a new row. Returns the rows in CSR form: ``offsets`` [rows + 1] and ``members`` [samples], sample
    indices, row r holding ``members[offsets[r]:offsets[r + 1]]`` (in the order they were placed). Rows are numbered
    in the order they were opened. O(n log n) plus a list insert per sample (at most max_len distinct fills).

    Raises ValueError for a sample longer than ``max_len``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_len:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a row of {max_len}")
    order = np.argsort(-lengths, kind="stable")
    room: list[int] = []  # distinct free spaces of open rows, ascending
    rows_with: dict[int, list[int]] = {}  # free space -> rows with exactly that much, most recent last
    row_of = np.empty(len(lengths), dtype=np.int64)
    opened = 0
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(room, need)
        if k < len(room):  # the row with the least room that still fits
            free = room[k]
            bucket = rows_with[free]
            row = bucket.pop()
            if not bucket:
                del rows_with[free]
                room.pop(k)
        else:
            free, row = max_len, opened
            opened += 1
        left = free - need
        row_of[i] = row
        if left > 0:
            if left not in rows_with:
                bisect.insort(room, left)
                rows_with[left] = []
            rows_with[left].append(row)
    # CSR, members of each row in placement order (decreasing length): a stable sort of the placement order by row.
    placed_rows = row_of[order]
    by_row = np.argsort(placed_rows, kind="stable")
    members = order[by_row]
    offsets = np.zeros(opened + 1, dtype=np.int64)
    np.cumsum(np.bincount(placed_rows, minlength=opened), out=offsets[1:])
    return offsets, members


def fill_ratio(lengths: np.ndarray, rows: int, max_len: int) -> float:
    """Tokens over the room of ``rows`` rows of ``max_len``: 1.0 when every row is full."""
    return float(np.sum(lengths)) / max(rows * max_len, 1)


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
