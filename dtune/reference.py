"""The reference's log-probabilities of every preference pair, computed once before training (train.precompute_ref)
and cached beside the tokenized data, instead of a second forward of every micro-batch at every step.

The reference is the base with the adapter switched off, or with train.init_adapter the adapter training starts
from (frozen: its log-probabilities are taken before the first step, so no second copy of it is ever held). Each
rank scores its share of the pairs (every rank runs the same forwards: ZeRO-3 and FSDP2 gather parameters inside
them), the shares are gathered, and the local main process of each node writes
``<cache>/<data key>/ref-<key>.npy`` ([pairs of the table, 2] float32: chosen, rejected, NaN where a table row is not
a pair of this run). The key names what the figures depend on beyond the tokens: the base's files, the quantization,
the compute precision and attention, and the starting adapter's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtune.data.batching import collate
from dtune.data.examples import TokenizedSet
from dtune.distributed.engine import Engine
from dtune.schema import DtuneConfig

log = logging.getLogger("dtune")


def reference_key(cfg: DtuneConfig, model_path: Path) -> str:
    """What the reference's log-probabilities depend on beyond the tokenized pairs, hashed (16 hex digits)."""
    files = sorted(
        (f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in model_path.iterdir() if f.suffix in (".safetensors", ".bin")
    )
    adapter = ""
    if cfg.train.init_adapter:
        weights = Path(cfg.train.init_adapter) / "adapter_model.safetensors"
        adapter = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else str(cfg.train.init_adapter)
    what = {
        "model": str(model_path),
        "files": files,
        "quant": asdict(cfg.quant),
        "precision": cfg.train.precision,
        "attn": cfg.model.attn_implementation,
        "added": [cfg.model.add_tokens, cfg.model.add_special_tokens],
        "init_adapter": adapter,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def score(loss_model: Any, pairs: TokenizedSet, batch_size: int, pad_id: int, engine: Engine, adapter: bool) -> np.ndarray:
    """[pairs, 2] float32: the summed log-probabilities of each pair's chosen and rejected reply under the model with
    its adapter (``adapter``) or without it. ``loss_model``: the :class:`~dtune.preference.PreferenceLoss` (unwrapped);
    collective."""
    was_training = loss_model.training
    loss_model.eval()
    n, world = len(pairs), engine.world_size
    mine = list(range(engine.rank, n, world))
    real = len(mine)
    mine += [0] * (-(-n // world) - real)  # the same number of forwards on every rank
    scored: list[tuple[list[int], np.ndarray]] = []
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        batch = {k: v.to(engine.device) for k, v in collate([pairs[i] for i in index], pad_id).items()}
        rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        with engine.autocast():
            logps = loss_model.policy_logps(*rows) if adapter else loss_model.reference_logps(*rows)
        counted = max(0, min(len(index), real - start))  # pairs past this are padding
        values = torch.stack([logps[: len(index)], logps[len(index) :]], dim=1).float().cpu().numpy()
        scored.append((index[:counted], values[:counted]))
    loss_model.train(was_training)
    out = np.full((n, 2), np.nan, dtype=np.float32)
    for shard in engine.gather_objects(scored):
        for index, values in shard:
            out[index] = values
    return out


def attach(
    loss_model: Any, sets: dict[str, TokenizedSet], cfg: DtuneConfig, engine: Engine, pad_id: int, model_path: Path
) -> None:
    """Give each set (name -> pairs) its reference log-probabilities (``TokenizedSet.ref``): read from the data
    cache, or computed (collective) and written there by each node's local main process. Logs what it did."""
    key = reference_key(cfg, model_path)
    adapter = bool(cfg.train.init_adapter)
    what = "the starting adapter" if adapter else "the base (adapter off)"
    for name, pairs in sets.items():
        file = pairs.folder / f"ref-{name}-{key}.npy" if pairs.folder is not None else None
        cached = np.load(file) if file is not None and file.is_file() else None
        if cached is not None and cached.shape != (len(pairs), 2):
            cached = None
        if not engine.any(cached is None):
            pairs.ref = cached
            log.info("preference: reference log-probabilities of %d %s pairs read from %s", len(pairs), name, file)
            continue
        started = time.perf_counter()
        ref = score(loss_model, pairs, cfg.train.eval_batch_size, pad_id, engine, adapter)
        log.info(
            "preference: reference log-probabilities of %d %s pairs from %s in %.1f s",
            len(pairs),
            name,
            what,
            time.perf_counter() - started,
        )
        if file is not None and engine.accelerator.is_local_main_process:
            tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}.npy")
            np.save(tmp, ref)
            os.replace(tmp, file)
        pairs.ref = ref
