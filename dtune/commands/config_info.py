"""``dtune train --help`` (``--hydra-help``, ``--info``, ``--cfg job``): what Hydra prints about the composed config,
from a module that does not import the training code. The config groups and the composed config are the same as
``dtune train``'s (the same ``conf/`` and schema); the training stack (transformers, PEFT, bitsandbytes: ~5 s of
imports on 2 cores) is not loaded only to print them."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dtune.config import compose, conf_dir
from dtune.errors import ConfigError

VALUED_FLAGS = ("-c", "--cfg", "-p", "--package", "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
"""Hydra's flags that take the next argument as their value."""
CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
"""Hydra's flags that choose another config than dtune's."""


def check_resolvable(argv: list[str]) -> None:
    """With ``--cfg ... --resolve``, Hydra resolves the config while printing it: a field the config needs set
    (``data=jsonl`` without ``data.source``) raised there as a 40-line traceback. The config is composed first, and a
    problem is said in one line, exit status 2. Left to Hydra, as :func:`dtune.commands.train.check_overrides` leaves
    them: sweeps (``-m``), another config (``--config-dir``, ``--config-name``, ``--config-path``: dtune's own would
    be composed) and interpolations (``${hydra:...}`` resolves only inside Hydra's job)."""
    if "--resolve" not in argv or {"-m", "--multirun"} & set(argv):
        return
    if any(a.split("=")[0] in CONFIG_FLAGS for a in argv):
        return
    overrides = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in VALUED_FLAGS)]
    if any("${" in a for a in overrides):
        return
    try:
        compose(overrides, check=False)
    except ConfigError as err:
        print(f"dtune train: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    check_resolvable(sys.argv[1:])
    print_info()


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def print_info(dict_cfg: DictConfig) -> None:
    """Hydra prints and returns before this is called (the command line holds one of ``dtune.cli.INFO_FLAGS``)."""
    raise SystemExit("dtune: an info flag was expected (--help, --hydra-help, --info, --cfg)")
