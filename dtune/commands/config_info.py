"""``dtune train --help`` (``--hydra-help``, ``--info``, ``--cfg job``): what Hydra prints about the composed config,
from a module that does not import the training code. The config groups and the composed config are the same as
``dtune train``'s (the same ``conf/`` and schema); the training stack (transformers, PEFT, bitsandbytes: ~5 s of
imports on 2 cores) is not loaded only to print them."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dtune.config import conf_dir


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(dict_cfg: DictConfig) -> None:
    """Hydra prints and returns before this is called (the command line holds one of ``dtune.cli.INFO_FLAGS``)."""
    raise SystemExit("dtune: an info flag was expected (--help, --hydra-help, --info, --cfg)")
