"""Where the model runs: device, precision and (in time) the distribution strategy, built through Accelerate.

The training loop talks to an :class:`Engine` only -- prepare, autocast, backward, clip, reduce -- and never asks
which strategy is on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from dtune.config import DtuneConfig
from dtune.errors import ConfigError

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class Engine:
    def __init__(self, cfg: DtuneConfig) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cuda = torch.cuda.is_available()
        if cfg.train.precision == "fp16" and not cuda:
            raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (tests, a
        # notebook) may ask for another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        # cpu=True is what makes Accelerate form a gloo process group on CPU (without it, ranks train alone).
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=MIXED_PRECISION[cfg.train.precision])
        self.strategy = cfg.engine.strategy
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != expected:  # Accelerate falls back silently; refuse to train alone
            raise RuntimeError(
                f"engine.strategy={self.strategy}: launched with WORLD_SIZE={expected} but the engine formed a group of "
                f"{self.accelerator.num_processes} ({self.accelerator.distributed_type})"
            )

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.accelerator.prepare(model, optimizer)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.accelerator.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Clip when max_norm is set; return the global gradient norm before clipping."""
        params = [p for p in model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all ranks."""
        return self.accelerator.reduce(value, reduction="sum")

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def shutdown_distributed() -> None:
    """End a multi-process run without gloo's exit race ("terminate called without an active exception"): barrier,
    destroy the process group, flush, and leave without running interpreter teardown."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
