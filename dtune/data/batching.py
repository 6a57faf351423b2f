"""Batches: collate Examples into padded tensors, and the resumable per-rank order of optimizer steps."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dtune.data.examples import IGNORE, Example
from dtune.data.packing import position_ids
from dtune.errors import DataError


def collate(examples: list[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. Returns input_ids, attention_mask, labels: [batch, seq]. Preference pairs
    (examples with ``rejected``) give 2 x pairs rows: every pair's chosen reply, then their rejected replies in the
    same order (and ``ref_logps`` [2 x pairs] when precomputed); KTO rows add their labels and KL rows
    (:func:`_kto_batch`, cut at ``max_len`` tokens: ``data.max_seq_len``).

    With packed rows, also position_ids [batch, seq] restarting per sample (and at the padding): the model is then
    given no attention mask and builds the per-sample masks from them (see dtune.data.packing); attention_mask
    still marks the real tokens, for counting.
    """
    if examples and examples[0].rejected is not None:  # preference pairs: the chosen rows, then the rejected rows
        rows = [Example(e.input_ids, e.labels, e.prompt_len) for e in examples]
        batch = collate(rows + [e.rejected for e in examples if e.rejected is not None], pad_id)
        if examples[0].ref_logps is not None:  # precomputed: [2 x pairs], in the rows' order
            ref = [e.ref_logps or (0.0, 0.0) for e in examples]
            batch["ref_logps"] = torch.tensor([c for c, _ in ref] + [r for _, r in ref], dtype=torch.float32)
        return batch
    if examples and examples[0].desirable is not None:  # KTO: the rows, their labels, and the KL rows
        return _kto_batch(examples, pad_id, max_len)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.segments for e in examples):
        segments = [e.segments or [len(e.input_ids)] for e in examples]
        batch["position_ids"] = position_ids(segments, width)
    return batch


def _kto_batch(examples: list[Example], pad_id: int, max_len: int | None) -> dict[str, torch.Tensor]:
    """KTO rows: the rows, ``desirable`` [rows] bool, and the KL rows (``kl_input_ids``, ``kl_attention_mask``,
    ``kl_labels``): row i's prompt followed by row i+1's completion (the last row's by the first's), cut at
    ``max_len`` (None: not cut; each row is at most its prompt and the other's completion) and padded to their own
    width, as TRL's KTOTrainer builds them -- mismatched pairs whose log-ratio estimates the KL divergence
    (Ethayarajh et al. 2024, section 4.1). Cutting them to the rows' width instead would keep a short-prompted
    row's long completion after a long prompt only in part, or not at all."""
    batch = collate([Example(e.input_ids, e.labels, e.prompt_len) for e in examples], pad_id)
    batch["desirable"] = torch.tensor([bool(e.desirable) for e in examples])
    mismatched = []
    for e, other in zip(examples, examples[1:] + examples[:1], strict=True):
        ids = e.input_ids[: e.prompt_len] + other.input_ids[other.prompt_len :]
        labels = [IGNORE] * e.prompt_len + other.labels[other.prompt_len :]
        mismatched.append(Example(ids[:max_len], labels[:max_len], e.prompt_len))
    kl = collate(mismatched, pad_id)
    batch |= {"kl_input_ids": kl["input_ids"], "kl_attention_mask": kl["attention_mask"], "kl_labels": kl["labels"]}
    return batch


class StepSampler:
    """Endless optimizer steps: for each, this rank's ``grad_accum_steps`` micro-batches.

    The global order of samples is a function of (seed, epoch) alone; each step takes the next
    micro_batch_size * grad_accum_steps * world_size samples. Within the step they are grouped by length: sorted
    (shortest first, ties in order), cut into micro-batches, and micro-batch k goes to rank k % world_size. The
    gradient is the same (the loss is normalised by the step's tokens, not per micro-batch) but micro-batches hold
    samples of similar length, so less padding is computed (on the default job 11.5% of the tokens instead of 18.5%).
    A step sees the same micro-batches on any number of ranks (2 ranks x 1 micro-batch = 1 rank x 2 micro-batches).
    The ragged tail of an epoch is dropped. The position (epoch, step in epoch) is state: :meth:`state_dict` /
    :meth:`load_state_dict` resume with the next step, without replaying earlier ones, on any world size with the
    same global batch.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        max_len: int | None = None,
    ) -> None:
        self.examples, self.micro, self.seed, self.pad_id, self.rank = examples, micro_batch_size, seed, pad_id, rank
        self.world_size, self.max_len = world_size, max_len  # max_len: of KTO's KL rows (collate)
        self.per_rank = micro_batch_size * grad_accum_steps
        self.per_step = self.per_rank * world_size
        if len(examples) < self.per_step:
            raise DataError(
                f"train.micro_batch_size: {micro_batch_size} x train.grad_accum_steps {grad_accum_steps} x {world_size} "
                f"ranks needs {self.per_step} samples per step; there are {len(examples)} training samples"
            )
        lengths = getattr(examples, "lengths", None)  # a TokenizedSet knows them without reading the samples
        self.lengths = np.asarray([len(e.input_ids) for e in examples] if lengths is None else lengths, dtype=np.int64)
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the samples (the ragged tail left out)."""
        return len(self.examples) // self.per_step

    @property
    def epochs_done(self) -> float:
        """Passes over the samples so far, counting the current one's steps as a fraction (1.0 after the last step of
        the first epoch)."""
        return self.epoch + self.index / self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """[samples] int64: the epoch's order (Python's shuffle, seeded by (seed, epoch); kept as 8 bytes a sample)."""
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, np.array(order, dtype=np.int64))
        return self._order[1]

    def padding(self, epoch: int = 0) -> float:
        """The fraction of the positions of ``epoch``'s micro-batches (every rank's) that are padding: each is padded to
        its longest sample, after the step's samples were grouped by length."""
        steps = self.steps_per_epoch
        order = self.order(epoch)[: steps * self.per_step].reshape(steps, self.per_step)
        lengths = np.sort(self.lengths[order], axis=1).reshape(steps, -1, self.micro)
        room = int(lengths.max(axis=2).sum()) * self.micro
        return 1.0 - int(lengths.sum()) / max(room, 1)

    def __iter__(self) -> StepSampler:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if (self.index + 1) * self.per_step > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.per_step
        picked = self.order(self.epoch)[start : start + self.per_step]
        step = picked[np.argsort(self.lengths[picked], kind="stable")].tolist()  # by length, ties in order
        self.index += 1
        micro = [step[j : j + self.micro] for j in range(0, self.per_step, self.micro)]
        return [collate([self.examples[i] for i in m], self.pad_id, self.max_len) for m in micro[self.rank :: self.world_size]]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "samples_per_step": self.per_step,
            "num_samples": len(self.examples),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("samples_per_step", self.per_step), ("num_samples", len(self.examples))):
            if state[key] != mine:
                raise DataError(
                    f"resume: the data sampler was saved with {key}={state[key]}, this run has {mine}{self._hint(key, state[key])}"
                )
        self.epoch, self.index = state["epoch"], state["index"]

    def _hint(self, key: str, saved: int) -> str:
        """How to give the global batch the checkpoint was trained with, where accumulation can (another world size)."""
        if key != "samples_per_step":
            return ""
        accum, left = divmod(saved, self.micro * self.world_size)
        batch = f"micro_batch_size x grad_accum_steps x ranks = {saved} as saved"
        if accum and not left:
            return f" ({batch}: train.grad_accum_steps={accum} with micro_batch_size {self.micro} on {self.world_size} rank(s))"
        return f" ({batch})"


def train_batches(examples: list[Example], batch_size: int, seed: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless single micro-batches on one rank (the order of :func:`StepSampler` with no accumulation)."""
    for (batch,) in StepSampler(examples, batch_size, 1, seed, pad_id):
        yield batch
