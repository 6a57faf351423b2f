"""The reference's log-probabilities of every preference pair, computed once before training (train.precompute_ref)
and cached beside the tokenized data, instead of a second forward of every micro-batch at every step.

The reference is the base with the adapter switched off, or with train.init_adapter the adapter training starts
from (frozen: its log-probabilities are taken before the first step, so no second copy of it is ever held). Each
rank scores its share of the pairs (every rank runs the same forwards: ZeRO-3 and FSDP2 gather parameters inside
them), the shares are gathered, and the local main process of each node writes
``<cache>/<data key>/ref-<set>-<key>.npy`` ([pairs of the set, 2] float32, in the set's order: chosen, rejected). The
key names what the figures depend on beyond the tokens: the base's files, the quantization, the compute precision,
the engine family (DeepSpeed's residual stream is 16-bit), attention, added tokens, and the starting adapter's bytes.
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
from dtune.lora import adapter_folder
from dtune.schema import DtuneConfig

log = logging.getLogger("dtune")


REFERENCE_VERSION = 2  # bump when dtune computes log-probabilities otherwise (2: the model's own logit scaling, DoRA)


def reference_key(cfg: DtuneConfig, model_path: Path) -> str:
    """What the reference's log-probabilities depend on beyond the tokenized pairs, hashed (16 hex digits)."""
    files = sorted(
        (f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in model_path.iterdir() if f.suffix in (".safetensors", ".bin")
    )
    adapter = ""
    if cfg.train.init_adapter:  # its bytes: a run retrained into the same folder is another reference
        adapter = hashlib.sha256((adapter_folder(cfg.train.init_adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()
    added = [cfg.model.add_tokens, cfg.model.add_special_tokens]
    what = {
        "version": REFERENCE_VERSION,
        "model": str(model_path),
        "files": files,
        "quant": asdict(cfg.quant),
        "precision": cfg.train.precision,
        # DeepSpeed runs the residual stream in 16 bits, the other engines in fp32 (dtune.model.freeze_as_trained).
        "deepspeed": cfg.engine.strategy == "deepspeed",
        "attn": cfg.model.attn_implementation,
        "added": added,
        "seed": cfg.train.seed if any(added) else None,  # it seeds the added tokens' rows
        "init_adapter": adapter,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def score(
    loss_model: Any, pairs: TokenizedSet, batch_size: int, pad_id: int, engine: Engine, adapter: bool, bar: bool = False
) -> np.ndarray:
    """[pairs, 2] float32: the summed log-probabilities of each pair's chosen and rejected reply under the model with
    its adapter (``adapter``) or without it. ``loss_model``: the :class:`~dtune.preference.PreferenceLoss` as the
    engine prepared it (its forward runs, with the engine's hooks); collective. ``bar``: a progress bar (rank 0)."""
    from tqdm.auto import tqdm

    was_training = loss_model.training
    loss_model.eval()
    n, world = len(pairs), engine.world_size
    mine = list(range(engine.rank, n, world))
    real = len(mine)
    mine += [0] * (-(-n // world) - real)  # the same number of forwards on every rank
    scored: list[tuple[list[int], np.ndarray]] = []
    starts = range(0, len(mine), batch_size)
    for start in tqdm(starts, desc="reference log-probabilities", disable=not (bar and engine.is_main), dynamic_ncols=True):
        index = mine[start : start + batch_size]
        batch = {k: v.to(engine.device) for k, v in collate([pairs[i] for i in index], pad_id).items()}
        with engine.autocast():
            logps = loss_model(**batch, score="policy" if adapter else "reference")["logps"]
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
        ref = score(loss_model, pairs, cfg.train.eval_batch_size, pad_id, engine, adapter, cfg.logger.progress)
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
