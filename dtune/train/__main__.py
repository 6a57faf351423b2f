"""``python -m dtune.train [hydra overrides]``: the same as ``dtune train`` (what torchrun and Slurm start)."""

from dtune.commands.train import main
from dtune.runtime import offline_defaults

offline_defaults()
main()
