"""Prompt/completion data: read rows, render them with the chat template, tokenize, mask the prompt, batch.

Rows are ``{"prompt": str, "completion": str}``, from a JSONL file or a built-in source (``builtin:<name>``).
Each row is rendered to text once, and the loss mask comes from character spans of that rendering (the
completion starts where the rendered prompt ends), mapped to tokens through the tokenizer's offsets -- never by
searching the token stream for a response template.

Every error names the file and line at fault.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtune.assets import BUILTIN_PREFIX, cache_dir
from dtune.config import DataConfig
from dtune.errors import DataError
from dtune.formats import CHATML, Row
from dtune.sources import BadRows, split_rows

log = logging.getLogger(__name__)
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
    """Packed rows: the lengths of the samples packed into this row (see dtune.packing)."""


@dataclass
class DataStats:
    train_rows: int = 0
    eval_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    packed_rows: int = 0
    skipped: int = 0


# ------------------------------------------------------------------------------------------- tokenizing


class Renderer:
    """Turns a Row into an Example: template, tokenization, loss mask from character spans, truncation.

    Messages are rendered with the tokenizer's chat template (ChatML when it has none); each assistant turn's span
    is where the rendering of the conversation up to that turn extends the rendering up to its generation prompt.
    With ``data.chat_template=false`` a single-turn row is plain ``prompt + completion + eos``. Tokens overlapping a
    trained span are labelled; ``data.train_on=all`` trains on every token.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("model.name_or_path: dtune needs a fast tokenizer (tokenizer.json) for offset mapping")
        self.tok = tokenizer
        self.cfg = cfg
        self.template = getattr(tokenizer, "chat_template", None) or CHATML
        self.stats = DataStats()

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool = False, where: str = "") -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=generation_prompt, tokenize=False
            )
        except TemplateError as err:  # templates refuse e.g. a system turn or non-alternating roles
            raise DataError(f"{where}: the chat template refuses this conversation: {err}") from None

    def _texts(self, row: Row) -> tuple[str, list[tuple[int, int]], int, bool]:
        """(full text, trained character spans, end of the last prompt, whether the text is templated)."""
        if row.text is not None:
            full = row.text + (self.tok.eos_token or "")
            return full, [(0, len(full))], 0, False
        messages = list(row.messages)
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        if not self.cfg.chat_template:
            if [m["role"] for m in messages] != ["user", "assistant"]:
                raise DataError(f"{row.where}: data.chat_template=false takes single-turn rows (one user, one assistant)")
            prompt, full = messages[0]["content"], messages[0]["content"] + messages[1]["content"] + (self.tok.eos_token or "")
            return full, [(len(prompt), len(full))], len(prompt), False
        full = self._chat(messages, where=row.where)
        spans, prompt_end = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self._chat(messages[:i], generation_prompt=True, where=row.where)
            upto = self._chat(messages[: i + 1], where=row.where)
            if not (upto.startswith(head) and full.startswith(upto)):
                raise DataError("data.chat_template: the template does not render conversations as prefixes of each other")
            # The answer and its end-of-turn token, not the template's trailing newline.
            spans.append((len(head), len(upto.rstrip())))
            prompt_end = len(head)
        return full, spans, prompt_end, True

    def _encode(self, row: Row) -> tuple[list[int], list[int], int]:
        full, spans, prompt_end, templated = self._texts(row)
        if self.cfg.train_on == "all":
            spans = [(0, len(full))]
        enc = self.tok(full, add_special_tokens=not templated, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        labels, prompt_len = [], 0
        for tok_id, (start, stop) in zip(ids, enc["offset_mapping"], strict=True):
            trained = stop > start and any(stop > a and start < b for a, b in spans)
            labels.append(tok_id if trained else IGNORE)
            if stop <= prompt_end:
                prompt_len += 1
        return ids, labels, prompt_len

    def __call__(self, row: Row) -> Example | None:
        ids, labels, prompt_len = self._encode(row)
        max_len = self.cfg.max_seq_len
        if len(ids) > max_len:
            if self.cfg.overlong == "error":
                raise DataError(f"{row.where}: {len(ids)} tokens exceeds data.max_seq_len={max_len} (data.overlong=error)")
            if self.cfg.overlong == "drop" or all(x == IGNORE for x in labels[:max_len]):
                self.stats.dropped += 1  # dropped by config, or truncation would leave no trained token
                return None
            ids, labels, prompt_len = ids[:max_len], labels[:max_len], min(prompt_len, max_len)
            self.stats.truncated += 1
        if all(x == IGNORE for x in labels[1:]):
            raise DataError(f"{row.where}: nothing to train on (the answer renders to no tokens)")
        example = Example(ids, labels, prompt_len)
        if self.cfg.choices:
            gold = row.completion.strip()
            if gold not in self.cfg.choices:
                raise DataError(f"{row.where}: completion {gold!r} is not one of data.choices {list(self.cfg.choices)}")
            example.choice_ids = [self._choice_tokens(row, c) for c in self.cfg.choices]
            example.gold = list(self.cfg.choices).index(gold)
        return example

    def _choice_tokens(self, row: Row, choice: str) -> list[int]:
        """Tokens of ``choice`` as the answer to ``row``'s last prompt."""
        alt = Row([*row.messages[:-1], {"role": "assistant", "content": choice}], row.where)
        ids, labels, prompt_len = self._encode(alt)
        return [t for t, lab in zip(ids[prompt_len:], labels[prompt_len:], strict=True) if lab != IGNORE]


def build_examples(rows: list[Row], renderer: Renderer, what: str) -> list[Example]:
    examples = [ex for ex in (renderer(r) for r in rows) if ex is not None]
    if not examples:
        raise DataError(f"data: no {what} sample is left after tokenization (all longer than data.max_seq_len?)")
    return examples


CACHE_VERSION = 1  # bump when tokenization or the cached layout changes


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """Hash of everything the tokenized data depends on: the data settings, each source file (path, size, mtime),
    the tokenizer (its full JSON and chat template) and dtune's cache version."""
    import hashlib
    from dataclasses import asdict

    h = hashlib.sha256(f"dtune-data-v{CACHE_VERSION}".encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    for src in [cfg.source, cfg.eval_source, *(m.path for m in cfg.mix)]:
        if src and not src.startswith(BUILTIN_PREFIX) and Path(src).exists():
            files = [Path(src)] if Path(src).is_file() else sorted(p for p in Path(src).rglob("*") if p.is_file())
            for f in files:
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:24]


def _tokenize(cfg: DataConfig, tokenizer: Any) -> tuple[list[Example], list[Example], DataStats]:
    bad = BadRows(cfg.bad_rows)
    train_rows, eval_rows = split_rows(cfg, bad)
    renderer = Renderer(tokenizer, cfg)
    train = build_examples(train_rows, renderer, "training")
    evals = build_examples(eval_rows, renderer, "evaluation")
    stats = renderer.stats
    stats.skipped = bad.count
    if bad.count:
        log.warning("data: skipped %d bad rows (data.bad_rows=skip); the first: %s", bad.count, bad.first)
    stats.train_rows, stats.eval_rows = len(train), len(evals)
    if cfg.packing:
        from dtune.packing import pack

        train = pack(train, cfg.max_seq_len)
        stats.packed_rows = len(train)
    return train, evals, stats


def _save(path: Path, train: list[Example], evals: list[Example], stats: DataStats) -> None:
    from dataclasses import asdict

    payload = {"train": [asdict(e) for e in train], "eval": [asdict(e) for e in evals], "stats": asdict(stats)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # atomic: readers see the whole file or none


def _load(path: Path) -> tuple[list[Example], list[Example], DataStats]:
    payload = json.loads(path.read_text())
    return ([Example(**e) for e in payload["train"]], [Example(**e) for e in payload["eval"]], DataStats(**payload["stats"]))


def load_data(cfg: DataConfig, tokenizer: Any, engine: Any = None) -> tuple[list[Example], list[Example], DataStats]:
    """Training and held-out examples. Tokenized once and cached under dtune's cache (``data.cache``): rank 0
    builds while the other ranks wait at a barrier, then every rank reads the same file."""
    if not cfg.cache:
        train, evals, stats = _tokenize(cfg, tokenizer)
    else:
        path = cache_dir() / "data" / f"{cache_key(cfg, tokenizer)}.json"
        # One builder per node: a multi-node job may not share the cache directory.
        builder = engine is None or engine.accelerator.is_local_main_process
        if builder and not path.exists():
            train, evals, stats = _tokenize(cfg, tokenizer)
            _save(path, train, evals, stats)
            log.info("data: tokenized and cached in %s", path)
        if engine is not None:
            engine.barrier()
        train, evals, stats = _load(path)
    if stats.truncated or stats.dropped:
        log.warning(
            "data: %d samples truncated and %d dropped at data.max_seq_len=%d (data.overlong=%s)",
            stats.truncated,
            stats.dropped,
            cfg.max_seq_len,
            cfg.overlong,
        )
    return train, evals, stats


# --------------------------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. Returns input_ids, attention_mask, labels: [batch, seq].

    With packed rows, also position_ids [batch, seq] restarting per sample, and attention_mask becomes the
    block-diagonal causal mask [batch, 1, seq, seq].
    """
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
        from dtune.packing import block_causal_mask, position_ids, segment_ids

        segments = [e.segments or [len(e.input_ids)] for e in examples]
        batch["position_ids"] = position_ids(segments, width)
        batch["attention_mask"] = block_causal_mask(segment_ids(segments, width))
    return batch


class StepSampler:
    """Endless optimizer steps: for each, this rank's ``grad_accum_steps`` micro-batches.

    The global order of samples is a function of (seed, epoch) alone; each step takes the next
    micro_batch_size * grad_accum_steps * world_size samples and rank r gets the r-th share. So a step sees the same
    samples on any number of ranks (2 ranks x 1 micro-batch = 1 rank x 2 micro-batches). The ragged tail of an epoch
    is dropped. The position (epoch, step in epoch) is state: :meth:`state_dict` / :meth:`load_state_dict` resume
    with the next step, without replaying earlier ones, on any world size with the same global batch.
    """

    def __init__(
        self,
        examples: list[Example],
        micro_batch_size: int,
        grad_accum_steps: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.examples, self.micro, self.seed, self.pad_id, self.rank = examples, micro_batch_size, seed, pad_id, rank
        self.per_rank = micro_batch_size * grad_accum_steps
        self.per_step = self.per_rank * world_size
        if len(examples) < self.per_step:
            raise DataError(
                f"train.micro_batch_size: {micro_batch_size} x train.grad_accum_steps {grad_accum_steps} x {world_size} "
                f"ranks needs {self.per_step} samples per step; there are {len(examples)} training samples"
            )
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self) -> StepSampler:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if (self.index + 1) * self.per_step > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.per_step + self.rank * self.per_rank
        mine = self.order(self.epoch)[start : start + self.per_rank]
        self.index += 1
        return [
            collate([self.examples[i] for i in mine[j : j + self.micro]], self.pad_id)
            for j in range(0, self.per_rank, self.micro)
        ]

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
                raise DataError(f"resume: the data sampler was saved with {key}={state[key]}, this run has {mine}")
        self.epoch, self.index = state["epoch"], state["index"]


def train_batches(examples: list[Example], batch_size: int, seed: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless single micro-batches on one rank (the order of :func:`StepSampler` with no accumulation)."""
    for (batch,) in StepSampler(examples, batch_size, 1, seed, pad_id):
        yield batch
