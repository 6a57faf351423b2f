"""Fine-tuning, in torchtitan's shape: the loop (``loop``), one optimizer step (``step``), what a run carries from
step to step (``state``), its checkpoints (``checkpointer``) and its figures (``metrics``).

``python -m dtune.train`` is ``dtune train`` (see :mod:`dtune.commands.train`).
"""

import sys

from dtune.distributed.preempt import record_early_signals, started_as_module

# ``python -m dtune.train`` (what torchrun starts) imports this package -- torch, transformers: seconds -- before its
# __main__ runs: a stop signal in those seconds is recorded, not the end of the process.
if started_as_module("dtune.train"):
    record_early_signals(sys.argv[1:])  # sys.argv[0] is "-m" while the package imports

from dtune.train.loop import run
from dtune.train.metrics import throughput
from dtune.train.step import accumulate_gradients, train_step

__all__ = ["accumulate_gradients", "run", "throughput", "train_step"]
