"""Where the model runs: device, precision and distribution strategy, built through Accelerate.

Strategies (``engine.strategy``): ``ddp`` -- data parallel (one process: plain training); ``deepspeed`` -- ZeRO
stage ``engine.zero_stage`` (1: optimizer states, 2: + gradients, 3: + parameters, the packed 4-bit base included)
through Accelerate's DeepSpeed plugin; ``fsdp2`` -- PyTorch's ``fully_shard`` on each decoder layer and the root,
called directly: Accelerate's FSDP plugin is not applied on CPU, and this way one code path runs (and is tested)
on CPU and GPU alike; with ``engine.offload_params`` its shards, gradients and optimizer states stay in CPU memory
(torch's ``CPUOffloadPolicy``).

The training loop talks to an :class:`Engine` only -- prepare, accumulate, backward, step, reduce, gather -- and
never asks which strategy is on. What a checkpoint holds is read and restored through
:class:`~dtune.distributed.full_state.FullState`, the strategy-specific half of the same seam.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dtune.distributed.env import deepspeed_cpu_env, lone_process_env, slurm_process_env
from dtune.errors import ConfigError
from dtune.schema import DtuneConfig
from dtune.units import DTYPES, MIXED_PRECISION


def deepspeed_config(cfg: DtuneConfig) -> dict[str, Any]:
    """The DeepSpeed config dtune's engine settings stand for (clipping and accumulation are DeepSpeed's to do)."""
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage == 3:
        # Save the adapter from gathered parameters, not from a consolidated 16-bit copy of the whole model.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    offload = cfg.engine.offload_optimizer or cfg.engine.offload_params
    return {
        # Offloaded states are stepped by dtune's torch AdamW on the CPU: for LoRA they are a few MB, so DeepSpeed's
        # compiled CPU Adam would save nothing worth its build.
        "zero_force_ds_cpu_optimizer": not offload,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Engine:
    """Device, precision and strategy of this process, and the collectives of its job.

    Raises :class:`~dtune.errors.ConfigError` when the launch does not give the engine asked for (Accelerate falls
    back silently to one process or to DDP), or fp16 without CUDA. ZeRO and FSDP2 started without a launcher run
    as a job of one process (:func:`~dtune.distributed.env.lone_process_env`).
    """

    def __init__(self, cfg: DtuneConfig) -> None:
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

        # Started by srun with one task per GPU (submitit, or srun without torchrun): rank and rendezvous from Slurm.
        os.environ.update(slurm_process_env())
        if cfg.engine.strategy in ("deepspeed", "fsdp2"):  # one process without torchrun: a process group of one
            os.environ.update(lone_process_env())
        cuda = torch.cuda.is_available()
        if cfg.train.precision == "fp16" and not cuda:
            raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.strategy = cfg.engine.strategy
        self.grad_accum_steps = cfg.train.grad_accum_steps
        # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (tests, a
        # notebook) may ask for another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.train.grad_accum_steps}
        if not cuda:  # what DeepSpeed probes for, and warns about, when anything imports it (PEFT's save does)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.update(deepspeed_cpu_env())
        if self.strategy == "deepspeed":
            if not cuda:
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))
            want = DistributedType.DEEPSPEED
        else:
            kwargs["cpu"] = not cuda  # what makes Accelerate form a gloo group on CPU (else each rank trains alone)
            # Every rank loads the same frozen base: nothing to re-broadcast before each forward (an MoE's NF4
            # expert constants are buffers, ~450 MB on a 30B-A3B).
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
            want = None
        kwargs["mixed_precision"] = MIXED_PRECISION[cfg.train.precision]
        self.accelerator = Accelerator(**kwargs)
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        got = self.accelerator.distributed_type
        if self.accelerator.num_processes != expected or (want is not None and got != want):
            # Accelerate falls back silently (to one process, or to DDP); refuse to train on the wrong engine.
            raise ConfigError(
                f"engine.strategy={self.strategy}: launched with WORLD_SIZE={expected}, but the engine formed "
                f"{self.accelerator.num_processes} process(es) of type {got}"
            )
        self.zero3 = self.strategy == "deepspeed" and cfg.engine.zero_stage == 3
        # FSDP2 + CPUOffloadPolicy: parameter shards, gradients and optimizer states in CPU memory.
        self.cpu_offload = self.strategy == "fsdp2" and cfg.engine.offload_params
        self.compute_dtype = DTYPES[cfg.train.precision]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def load_device(self) -> torch.device | None:
        """Where from_pretrained puts the model: None under ZeRO-3 (partitioned while loading, by zero.Init); the CPU
        under FSDP2 offload, whose model may not fit one GPU whole (``fully_shard`` then moves one unit at a time to
        the GPU, and its shard back)."""
        if self.zero3:
            return None
        return torch.device("cpu") if self.cpu_offload else self.device

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
        if self.strategy == "fsdp2":  # already sharded by shard(); Accelerate would wrap it in DDP
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with self.accelerator.autocast():
            yield

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module) -> Iterator[None]:
        """Around each micro-batch: gradients are synchronised (and DeepSpeed steps) only on the step's last one."""
        with self.accelerator.accumulate(model):
            yield

    def backward(self, loss_sum: torch.Tensor, step_tokens: torch.Tensor) -> torch.Tensor:
        """Backward of one micro-batch's share of the step's mean token loss; returns that share (detached).

        ``loss_sum``: the micro-batch's summed token loss (this rank); ``step_tokens``: the labelled tokens of the
        whole optimizer step, all micro-batches of all ranks. The gradient left after the step's last micro-batch is
        exactly that of (sum of every token loss of the step) / ``step_tokens``, whatever the strategy: DDP, ZeRO and
        FSDP2 average gradients over ranks (undone by ``world_size``) and Accelerate and DeepSpeed divide each
        micro-batch's loss by ``grad_accum_steps`` (undone by ``grad_accum_steps``). The only place dtune
        compensates for either. Contract: called exactly ``grad_accum_steps`` times per optimizer step, inside
        :meth:`accumulate` (``len(micro) == train.grad_accum_steps``).
        """
        share = loss_sum * self.world_size / step_tokens
        self.accelerator.backward(share * self.grad_accum_steps)
        return share.detach() / self.world_size

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
        """Clip, step the optimizer, zero the gradients. Returns the gradient norm before clipping."""
        if self.strategy == "deepspeed":
            # DeepSpeed clipped and stepped inside the last backward (Accelerate's engine wrapper).
            norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            self.accelerator.unscale_gradients()  # fp16: clip the true gradients, not the loss-scaled ones
            if self.cpu_offload:
                norm = self._clip_offloaded(params, max_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            optimizer.step()  # under FSDP2 offload: on the CPU shards, with CPU optimizer states
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    def _clip_offloaded(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """Global gradient L2 norm (returned) and clipping for FSDP2 CPU offload, whose gradient shards are CPU
        DTensors on a mesh whose process group is the GPU's: ``clip_grad_norm_`` would all-reduce CPU tensors over
        NCCL (pytorch/pytorch#148532). The shards of a parameter are disjoint, so the squared norm is the sum over
        ranks of each rank's local squared norm: one scalar crosses to the process group's device and back."""
        grads = [p.grad for p in params if p.grad is not None]
        local = torch.nn.utils.get_total_norm([g.to_local() for g in grads], 2.0) if grads else torch.zeros(())
        total = self.sum(local.float().square().to(self.device)).sqrt().cpu()
        if max_norm is not None:
            # Scaled as DTensors, by a Python number (in-place scaling of the to_local() views did not reach the
            # gradients the optimizer reads: measured, the run followed the unclipped one). Formula of clip_grad_norm_.
            coef = min(1.0, max_norm / (float(total) + 1e-6))
            for grad in grads:
                grad.mul_(coef)
        return total

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over all ranks."""
        return self.accelerator.reduce(value, reduction="sum")

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def local_bytes(self, model: nn.Module) -> dict[str, int]:
        """Bytes of parameters this rank holds: frozen (the base, packed 4-bit included) and trainable."""
        out = {"frozen": 0, "trainable": 0}
        for p in model.parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
                local = p.ds_tensor
            elif hasattr(p, "to_local"):  # FSDP2: this rank's DTensor shard
                local = p.to_local()
            else:
                local = p
            out["trainable" if p.requires_grad else "frozen"] += local.numel() * local.element_size()
        return out

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: shard each decoder layer, then the root (the loss wrapper, whose forward runs). Others: as is."""
        if self.strategy != "fsdp2":
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        # Pinned host memory (overlapped copies) needs CUDA. fully_shard moves each unit to the device, shards it and
        # copies the shard back to the CPU; bitsandbytes' Params4bit.to moves its quantization constants (absmax,
        # code tables) along, and those stay on the device: they are no parameters, so FSDP neither shards nor
        # offloads them.
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        blocks = set(getattr(model.model.get_base_model(), "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ConfigError("engine.strategy=fsdp2: the model names no decoder-layer class (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mp_policy=policy, offload_policy=offload)
        fully_shard(model, mp_policy=policy, offload_policy=offload)
        return model

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def max(self, value: float) -> float:
        """Largest ``value`` over all ranks."""
        if self.world_size == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor(float(value), device=self.device), reduction="max"))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (a signal may reach some ranks only)."""
        return self.max(float(flag)) > 0

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 and sent to every rank; an exception it raises is raised on every rank (so
        that no rank waits for the others at the next collective)."""
        if self.world_size == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # re-raised below, on every rank
                box[0] = ("error", err)
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (picklable objects; collective)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
