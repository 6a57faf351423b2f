"""``dtune eval RUN``: base and base + adapter side by side on held-out data and on general text."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from dtune.adapters import load_frozen_base, load_trained, locate_args, switched_off_is_not_base, trained_parser
from dtune.checkpoint import CHECKPOINTS, TRAINER_STATE, checkpoints
from dtune.data.examples import Example
from dtune.data.load import check_sources, load_data, source_stats
from dtune.data.stream import streamed_eval_set
from dtune.distributed.engine import Engine
from dtune.errors import ConfigError, user_errors
from dtune.evaluate import evaluate
from dtune.fsutil import atomic_write_text
from dtune.loss import CompletionLoss
from dtune.model import load_tokenizer
from dtune.preference import PreferenceLoss
from dtune.report import comparison_table
from dtune.schema import DataConfig, DtuneConfig


def compare(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    engine: Engine,
    base: nn.Module | None = None,
    cfg: DtuneConfig | None = None,
) -> dict[str, dict[str, float]]:
    """The same evaluation with the adapter (``model`` is a PeftModel) and without: with it switched off, or on
    ``base`` when given (an adapter whose init moved part of the base weights into it, PiSSA or OLoRA: switched off,
    the base left is the residual, not the base; or one that trained the base's biases, which it keeps switched off).
    Preference pairs are scored with ``cfg``'s objective (the base's rewards against itself are 0: its preference
    accuracy is one half)."""
    pairs = cfg is not None and len(examples) > 0 and (examples[0].rejected is not None or examples[0].desirable is not None)

    def loss(m: nn.Module) -> nn.Module:
        return PreferenceLoss.of(cfg, m) if pairs and cfg is not None else CompletionLoss(m)

    max_len = cfg.data.max_seq_len if cfg is not None else None
    tuned = evaluate(loss(model), examples, batch_size, pad_id, engine, max_len)
    if base is not None:
        return {"base": evaluate(loss(base), examples, batch_size, pad_id, engine, max_len), "adapter": tuned}
    with model.disable_adapter():
        untuned = evaluate(loss(model), examples, batch_size, pad_id, engine, max_len)
    return {"base": untuned, "adapter": tuned}


def held_out_source(data: DataConfig) -> str:
    """Where the held-out rows come from, in words."""
    if data.eval_source:
        return data.eval_source
    sources = [m.path for m in data.mix] if data.mix else [data.source]
    return ", ".join(sources) + " (held out of the training source)"


SPLIT_KEYS = ("source", "format", "seed", "streaming")  # data.* settings that decide which rows are held out


def split_changes(trained: DataConfig, now: DataConfig) -> list[str]:
    """The data overrides under which the held-out rows drawn now would include rows the adapter was trained on:
    another source, format, seed, streaming or mixture (paths, formats, order), more rows held out (fewer are a
    subset of the same shuffle), or a hold-out from a source that training read whole (it had ``eval_source``).
    None with ``eval_source`` set now: that file is what the user names as held out."""
    if now.eval_source is not None:
        return []
    if trained.eval_source is not None:
        return [f"data.eval_source=null (training held out {trained.eval_source} and trained on every row of its source)"]
    out = [
        f"data.{k}={getattr(now, k)} (trained: {getattr(trained, k)})"
        for k in SPLIT_KEYS
        if getattr(now, k) != getattr(trained, k)
    ]
    if [(m.path, m.format) for m in now.mix] != [(m.path, m.format) for m in trained.mix]:
        out.append("data.mix: other sources, formats or order than training's")
    if (now.eval_fraction is None) != (trained.eval_fraction is None):
        out.append(f"data.eval_fraction={now.eval_fraction} (trained: {trained.eval_fraction}, eval_size {trained.eval_size})")
    elif now.eval_fraction is not None and trained.eval_fraction is not None and now.eval_fraction > trained.eval_fraction:
        out.append(f"data.eval_fraction={now.eval_fraction}: more than training held out ({trained.eval_fraction})")
    elif now.eval_fraction is None and now.eval_size > trained.eval_size:
        out.append(f"data.eval_size={now.eval_size}: more than training held out ({trained.eval_size})")
    return out


def recorded_sources(config_file: Path) -> dict[str, list[Any]]:
    """The data files the run read, as it recorded them (:func:`~dtune.data.load.source_stats`): in the checkpoint
    whose config ``config_file`` is, the run's newest checkpoint or its ``results.json``; empty for a run of an older
    dtune."""
    folder = config_file.parent
    records = [folder / TRAINER_STATE, *(path / TRAINER_STATE for _, path in reversed(checkpoints(folder / CHECKPOINTS)))]
    for record in [*records, folder / "results.json"]:
        if record.is_file() and "data_sources" in (saved := json.loads(record.read_text())):
            return saved["data_sources"]
    return {}


def main(argv: list[str] | None = None) -> int:
    """``dtune eval RUN [data.key=value ...]``: held-out loss/perplexity (and accuracy) of base and base+adapter side
    by side on the run's data (or the data the overrides name), and a forgetting check: the same on general text."""
    parser = trained_parser("dtune eval", "Held-out loss of the base and of base + adapter, side by side.")
    parser.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.eval_source=test.jsonl")
    parser.add_argument("--general", default="builtin:hamlet", help="general text for the forgetting check ('' to skip)")
    parser.add_argument("--general-rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--allow-changed-data", action="store_true", help="evaluate even if the held-out rows' file changed since training"
    )
    args = parser.parse_args(argv)
    with user_errors():
        trained = locate_args(args)
        cfg = trained.cfg
        if args.overrides:
            if bad := [o for o in args.overrides if not o.startswith("data.") or "=" not in o]:
                raise ConfigError(f"overrides: only data.key=value settings apply to dtune eval; got {bad}")
            merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(args.overrides))
            cfg = OmegaConf.to_object(merged)
            assert isinstance(cfg, DtuneConfig)
            if changes := split_changes(trained.cfg.data, cfg.data):
                raise ConfigError(
                    "overrides: the held-out rows would be drawn again and hold rows the adapter was trained on: "
                    + "; ".join(changes)
                    + ". Name held-out data instead: data.eval_source=FILE"
                )
        if not args.allow_changed_data:  # the split is drawn from the file as it is now: rows trained on may be in it
            remedy = "put it back as it was, name held-out data (data.eval_source=FILE) or pass --allow-changed-data"
            check_sources(
                recorded_sources(Path(trained.source)), source_stats(cfg.data, held_out_only=True), "dtune eval", remedy
            )
        cfg.logger.wandb = False
        # One process, whatever engine trained it (fsdp2 would want torchrun; the adapter is whole on disk).
        cfg.engine = replace(cfg.engine, strategy="ddp", zero_stage=0, offload_optimizer=False, offload_params=False)
        engine = Engine(cfg)
        tokenizer = load_tokenizer(cfg)
        # A streamed run's held-out rows come from its first shard (or eval_source), without reading the corpus.
        task = streamed_eval_set(cfg.data, tokenizer) if cfg.data.streaming else load_data(cfg.data, tokenizer)[1]
        trained = replace(trained, cfg=cfg)
        model = load_trained(trained, engine.device, args.allow_pickle)
        off_is_base = not switched_off_is_not_base(trained.adapter_dir)
        base = None if off_is_base else load_frozen_base(trained, engine.device, args.allow_pickle)
        results = {"task": compare(model, task, args.batch_size, tokenizer.pad_token_id, engine, base, cfg)}
        if args.general:
            general = DataConfig(
                source=args.general,
                format="text",
                eval_size=args.general_rows,
                max_seq_len=cfg.data.max_seq_len,
                choices=None,
            )
            _, text, _ = load_data(general, tokenizer)
            results["general"] = compare(model, text, args.batch_size, tokenizer.pad_token_id, engine, base)
        print(
            f"{trained.adapter_dir} on {cfg.model.name_or_path}; task: {len(task)} held-out rows of {held_out_source(cfg.data)}"
            + (f"; general: {args.general_rows} rows of {args.general}" if args.general else "")
        )
        if cfg.train.objective not in ("sft", "orpo", "simpo") and cfg.train.init_adapter:
            print(
                f"note: the preference figures compare with the base (adapter off); training compared with its starting "
                f"adapter {cfg.train.init_adapter} (results.json has those)"
            )
        print(comparison_table([(name, pair["base"], pair["adapter"]) for name, pair in results.items()], ("base", "adapter")))
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        sys.stdout.flush()
    return 0
