"""The ``dtune`` command: ``dtune <subcommand> [args]``.

``dtune train [hydra overrides]`` is ``python -m dtune.train``: every Hydra flag works (``--multirun``,
``--config-dir``, ``--cfg job``, ``-h``).
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.metadata import version

from dtune.distributed.preempt import record_early_signals
from dtune.runtime import offline_defaults

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

COMMANDS = {
    "train": "dtune.commands.train",
    "plan": "dtune.commands.plan",
    "merge": "dtune.commands.merge",
    "generate": "dtune.commands.generate",
    "eval": "dtune.commands.eval",
    "doctor": "dtune.commands.doctor",
}


INFO_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg")
"""Hydra's flags that print and exit without running the job."""


def wants_info(argv: list[str]) -> bool:
    """Whether ``dtune train argv`` only asks Hydra to print (help, info, the config)."""
    return any(arg in INFO_FLAGS or arg.startswith(("--cfg=", "--info=")) for arg in argv)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    try:
        dispatch(args[0], args[1:])
    except KeyboardInterrupt:  # Ctrl-C while importing, generating, merging...: no traceback (dtune train saves first)
        print("dtune: interrupted", file=sys.stderr)
        sys.exit(130)


def dispatch(command: str, rest: list[str]) -> None:
    """Run ``dtune <command> <rest>``; exits with the command's status."""
    if command in COMMANDS:
        offline_defaults()
        # Imported on demand: each command's module pulls in torch, transformers or DeepSpeed, which `dtune --help`
        # and `dtune version` should not wait for.
        # `dtune train --help` / `--cfg job` print the config without the training code's imports.
        info = command == "train" and wants_info(rest)
        if command == "train" and not info:
            record_early_signals(rest)  # a preemption while the imports and config run still ends as one (exit 75)
        module = import_module("dtune.commands.config_info" if info else COMMANDS[command])
        if command == "train":
            sys.argv = ["dtune train", *rest]  # Hydra reads its overrides from sys.argv
            module.main()
        else:
            sys.exit(module.main(rest))
    elif command in ("version", "--version"):
        print(f"dtune {version('dtune')}")
    else:
        print(f"dtune: error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
