"""What tokenized data is: an Example (token ids, labels, prompt length, answer choices, packed segments) and the
counts gathered while making them."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100  # label of a position that carries no loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """input_ids with prompt positions set to IGNORE."""
    prompt_len: int
    """Number of prompt tokens: the first completion token is predicted at position prompt_len - 1."""
    choice_ids: list[list[int]] = field(default_factory=list)
    """For closed answer sets: token ids of each choice's completion, rendered after this prompt."""
    gold: int = -1
    """Index of the row's completion in data.choices (-1 when there are no choices)."""
    segments: list[int] | None = None
    """Packed rows: the lengths of the samples packed into this row (see dtune.data.packing)."""


@dataclass
class DataStats:
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    packed_rows: int = 0
    skipped: int = 0
    ignored_keys: str = ""
    """Record keys the format does not read, with counts (warned about on every load, cached or not)."""
