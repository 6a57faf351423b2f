"""Rows to training and held-out Examples: read and split the sources, render, pack; cached on disk by a hash of
everything the result depends on, built by one process per node."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dtune.assets import BUILTIN_PREFIX, cache_dir
from dtune.data.examples import DataStats, Example
from dtune.data.packing import pack
from dtune.data.render import Renderer, build_examples
from dtune.data.sources import BadRows, split_rows
from dtune.distributed.engine import Engine
from dtune.fsutil import atomic_write_text
from dtune.schema import DataConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when tokenization or the cached layout changes


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """Hash of everything the tokenized data depends on: the data settings, each source file (path, size, mtime),
    the tokenizer (its full JSON and chat template) and dtune's cache version."""
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
    train = build_examples(train_rows, renderer, "training", bad)
    evals = build_examples(eval_rows, renderer, "evaluation", bad)
    stats = renderer.stats
    stats.skipped = bad.count
    if bad.count:
        log.warning("data: skipped %d bad rows (data.bad_rows=skip); the first: %s", bad.count, bad.first)
    stats.ignored_keys = bad.unknown.summary()
    stats.train_rows, stats.eval_rows = len(train), len(evals)
    if cfg.packing:
        train = pack(train, cfg.max_seq_len)
        stats.packed_rows = len(train)
    return train, evals, stats


def _save(path: Path, train: list[Example], evals: list[Example], stats: DataStats) -> None:
    payload = {"train": [asdict(e) for e in train], "eval": [asdict(e) for e in evals], "stats": asdict(stats)}
    atomic_write_text(path, json.dumps(payload))  # readers see the whole file or none


def _load(path: Path) -> tuple[list[Example], list[Example], DataStats]:
    payload = json.loads(path.read_text())
    return ([Example(**e) for e in payload["train"]], [Example(**e) for e in payload["eval"]], DataStats(**payload["stats"]))


def load_data(cfg: DataConfig, tokenizer: Any, engine: Engine | None = None) -> tuple[list[Example], list[Example], DataStats]:
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
    if stats.ignored_keys:
        log.warning("data: keys that data.format=%s does not read were ignored: %s", cfg.format, stats.ignored_keys)
    if stats.truncated or stats.dropped:
        log.warning(
            "data: %d samples truncated and %d dropped at data.max_seq_len=%d (data.overlong=%s)",
            stats.truncated,
            stats.dropped,
            cfg.max_seq_len,
            cfg.overlong,
        )
    return train, evals, stats
