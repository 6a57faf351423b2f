"""The ``dtune`` command: ``dtune <subcommand> [args]``.

``dtune train [hydra overrides]`` is ``python -m dtune.train``: every Hydra flag works (``--multirun``,
``--config-dir``, ``--cfg job``, ``-h``).
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: dtune <command> [args]

commands:
  train     fine-tune: dtune train [key=value ...] [--multirun] [--config-dir DIR] [--cfg job]
  plan      predict per-GPU peak memory: dtune plan [--gpu-mem 80GiB] [--world-size N] [--measure] [key=value ...]
  merge     base + adapter -> a standalone model: dtune merge RUN [--out DIR] [--dtype bf16] [--into dequantized|original]
  generate  answer prompts with base + adapter, streamed: dtune generate RUN --prompt TEXT [--prompts FILE.jsonl]
  eval      base vs base + adapter on held-out data and general text: dtune eval RUN [data.key=value ...]
  doctor    check every node and rank (versions, GPUs, barrier, all-reduce and link bandwidth); run it under
            torchrun or srun like training: torchrun --nproc_per_node 8 $(which dtune) doctor
  version   print dtune's version

Run 'dtune train --help' for the config groups and their options."""


def offline_defaults() -> None:
    """dtune never downloads at run time: models are local directories or built-ins (a user may still opt in)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "train":
        offline_defaults()
        from dtune import train

        sys.argv = ["dtune train", *rest]  # Hydra reads its overrides from sys.argv
        train.main()
    elif command == "plan":
        offline_defaults()
        from dtune import plan

        sys.exit(plan.main(rest))
    elif command in ("merge", "generate", "eval"):
        offline_defaults()
        from importlib import import_module

        module = import_module({"merge": "dtune.merge", "generate": "dtune.generate", "eval": "dtune.evaluate"}[command])
        sys.exit(module.main(rest))
    elif command == "doctor":
        from dtune import doctor

        sys.exit(doctor.main(rest))
    elif command in ("version", "--version"):
        from importlib.metadata import version

        print(f"dtune {version('dtune')}")
    else:
        print(f"dtune: error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
