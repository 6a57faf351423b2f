"""Where the model runs: device, precision and distribution strategy, built through Accelerate.

Strategies (``engine.strategy``): ``ddp`` -- data parallel (one process: plain training); ``deepspeed`` -- ZeRO
stage ``engine.zero_stage`` (1: optimizer states, 2: + gradients, 3: + parameters, the packed 4-bit base included)
through Accelerate's DeepSpeed plugin; ``fsdp2`` -- PyTorch's ``fully_shard`` on each decoder layer and the root,
called directly: Accelerate's FSDP plugin is not applied on CPU, and this way one code path runs (and is tested)
on CPU and GPU alike.

The training loop talks to an :class:`Engine` only -- prepare, accumulate, backward, step, reduce, gather -- and
never asks which strategy is on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dtune.config import DtuneConfig, slurm_process_env
from dtune.errors import ConfigError
from dtune.model import DTYPES

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


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
    def __init__(self, cfg: DtuneConfig) -> None:
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        # Started by srun with one task per GPU (submitit, or srun without torchrun): rank and rendezvous from Slurm.
        os.environ.update(slurm_process_env())
        cuda = torch.cuda.is_available()
        if cfg.train.precision == "fp16" and not cuda:
            raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.strategy = cfg.engine.strategy
        self.grad_accum_steps = cfg.train.grad_accum_steps
        # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (tests, a
        # notebook) may ask for another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.train.grad_accum_steps}
        if self.strategy == "deepspeed":
            if not cuda:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))
            want = DistributedType.DEEPSPEED
        else:
            kwargs["cpu"] = not cuda  # what makes Accelerate form a gloo group on CPU (else each rank trains alone)
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
        if self.strategy == "fsdp2" and not torch.distributed.is_initialized():
            raise ConfigError("engine.strategy=fsdp2: needs a process group; launch with torchrun (even for one process)")
        self.zero3 = self.strategy == "deepspeed" and cfg.engine.zero_stage == 3
        self.compute_dtype = DTYPES[cfg.train.precision]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def load_device(self) -> torch.device | None:
        """Where from_pretrained puts the model: None under ZeRO-3 (partitioned while loading, by zero.Init)."""
        return None if self.zero3 else self.device

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

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised for the whole step. Accelerate and DeepSpeed divide by the
        accumulation steps inside backward; multiplying first keeps the gradient what the loop computed."""
        self.accelerator.backward(loss * self.grad_accum_steps)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_norm: float | None) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients. Returns the gradient norm before clipping."""
        if self.strategy == "deepspeed":
            # DeepSpeed clipped and stepped inside the last backward (Accelerate's engine wrapper).
            norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            self.accelerator.unscale_gradients()  # fp16: clip the true gradients, not the loss-scaled ones
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        blocks = set(getattr(model.model.get_base_model(), "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ConfigError("engine.strategy=fsdp2: the model names no decoder-layer class (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
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

    # ------------------------------------------------------------------ training state, independent of sharding

    def _trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def _base_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimizer under Accelerate's wrapper (and, with DeepSpeed, under ZeRO's)."""
        opt = _inner(optimizer)  # AcceleratedOptimizer -> torch / DeepSpeedZeroOptimizer
        return _inner(opt) if self.strategy == "deepspeed" else opt

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The trainable parameters (fp32 master values) and their optimizer states as full CPU tensors keyed by
        parameter name, plus the optimizer step count: the same whatever the strategy and world size, so a run
        resumes on any of them. Collective: every rank must call it."""
        params = self._trainable(model)
        base = self._base_optimizer(optimizer)
        step = 0
        state: dict[str, dict[str, torch.Tensor]] = {}
        if self.strategy == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            flat = next((s for s in base.state.values() if s), {})
            keys = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0]
            step = int(flat["step"]) if "step" in flat else 0
            for name, p in params.items():
                entry = {"param": safe_get_full_fp32_param(p).detach().to("cpu", torch.float32, copy=True)}
                for key in keys:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True)
                state[name] = entry
        else:
            for name, p in params.items():
                entry = {"param": _full(p).to(torch.float32, copy=True)}
                for key, value in base.state.get(p, {}).items():
                    if key == "step":
                        step = int(value)
                    elif torch.is_tensor(value) and value.shape == p.shape:
                        entry[key] = _full(value).clone()
                state[name] = entry
        return {"step": step, "params": state}

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
        """Put :meth:`optimizer_state`'s output back: parameters and optimizer states, re-sharded for this run."""
        params = self._trainable(model)
        missing, unexpected = sorted(set(params) - set(saved["params"])), sorted(set(saved["params"]) - set(params))
        if missing or unexpected:
            raise ConfigError(
                f"resume: the checkpoint's trainable parameters differ from this model's "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); were model or lora settings changed?"
            )
        for name, p in params.items():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape beside an empty local tensor
            if tuple(saved["params"][name]["param"].shape) != shape:
                raise ConfigError(
                    f"resume: {name} has shape {tuple(saved['params'][name]['param'].shape)} in the checkpoint, {shape} here"
                )
        base = self._base_optimizer(optimizer)
        step = saved["step"]
        if self.strategy == "deepspeed":
            self._load_deepspeed_state(params, optimizer, base, saved["params"], step)
            return
        with torch.no_grad():
            for name, p in params.items():
                entry = saved["params"][name]
                _copy_into(p, entry["param"])
                if step == 0:
                    continue
                opt_state = base.state[p]
                for key, value in entry.items():
                    if key != "param":
                        opt_state[key] = _like(p, value)
                # torch keeps Adam's step as a float tensor on the CPU unless the optimizer is fused/capturable.
                opt_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    def _load_deepspeed_state(self, params: dict[str, nn.Parameter], optimizer: Any, base: Any, saved: dict, step: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = _inner(optimizer)  # DeepSpeed's ZeRO optimizer
        if step > 0 and not any(base.state.values()):
            # ZeRO creates optimizer states lazily, in its first step; make them (a zero-gradient step of the flat fp32
            # partitions, whose values are overwritten below) so that the full states can be scattered into them.
            zero3 = hasattr(zero, "fp32_partitioned_groups_flat")
            # ZeRO-3 hands the optimizer one sub-group at a time; ZeRO-1/2's holds this rank's flat fp32 partitions.
            flats = zero.fp32_partitioned_groups_flat if zero3 else [p for g in base.param_groups for p in g["params"]]
            kept = [flat.grad for flat in flats]  # with offload, ZeRO keeps persistent gradient buffers there
            for flat in flats:
                flat.grad = torch.zeros_like(flat) if flat.grad is None else flat.grad.zero_()
            if zero3:
                for i in range(len(flats)):
                    zero._optimizer_step(i)
            else:
                base.step()
            for flat, grad in zip(flats, kept, strict=True):
                flat.grad = grad
            if not zero3:
                zero._lazy_init_hp_params_optimizer_state()
        for name, p in params.items():
            entry = saved[name]
            safe_set_full_fp32_param(p, entry["param"].to(self.device))
            if step > 0:
                for key, value in entry.items():
                    if key != "param":
                        safe_set_full_optimizer_state(p, value.to(self.device), key)
        for flat_state in base.state.values():
            if "step" in flat_state:
                flat_state["step"] = (
                    torch.tensor(float(step), dtype=torch.float32) if torch.is_tensor(flat_state["step"]) else step
                )
        # The module's (low-precision) copies, which forward reads: from the fp32 masters just set. ZeRO-3 gathers
        # them, rank 0 writes, and the exit re-partitions.
        gathered = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with torch.no_grad(), gathered:
            if self.is_main or not self.zero3:
                for name, p in params.items():
                    p.data.copy_(saved[name]["param"].to(p.device, p.dtype))

    def rng_state(self) -> dict[str, Any]:
        """This rank's random generators (python, torch CPU, CUDA), in a form ``torch.load(weights_only=True)`` reads."""
        import random

        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's device only: a resumed job may see another number of GPUs
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import random

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def scaler_state(self, optimizer: Any) -> dict[str, Any] | None:
        """fp16 loss-scaler state (Accelerate's GradScaler, or DeepSpeed's dynamic loss scaler); None without fp16."""
        if self.accelerator.scaler is not None:
            return {"torch": self.accelerator.scaler.state_dict()}
        scaler = getattr(_inner(optimizer), "loss_scaler", None)
        if scaler is not None and self.strategy == "deepspeed" and self.compute_dtype == torch.float16:
            return {"deepspeed": {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}}
        return None

    def load_scaler_state(self, optimizer: Any, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if "torch" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["torch"])
        scaler = getattr(_inner(optimizer), "loss_scaler", None)
        if "deepspeed" in state and scaler is not None:
            for key, value in state["deepspeed"].items():
                setattr(scaler, key, value)


def _inner(optimizer: Any) -> Any:
    """The optimizer a wrapper (Accelerate's, DeepSpeed's ZeRO) holds; the optimizer itself when it is none."""
    return getattr(optimizer, "optimizer", optimizer)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a tensor or of an FSDP2 DTensor (all-gathered: collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like parameter ``p``: on its device, and sharded the same way when ``p`` is a DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the full value (read from the checkpoint): each keeps its own shard, nothing is sent.
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)
    return full.to(p.device)


def _copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    p.copy_(_like(p, full.to(p.dtype)))


def shutdown_distributed(exit_code: int = 0, then: Callable[[], None] | None = None, exit_process: bool = True) -> None:
    """End the run. Multi-process: barrier, destroy the process group, run ``then``, flush and leave with
    ``exit_code`` without interpreter teardown (gloo's exit race: "terminate called without an active exception"),
    unless ``exit_process`` is false (the caller must return: submitit). One process: just run ``then``."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if then is not None:
            then()
        return
    dist.barrier()
    dist.destroy_process_group()
    if then is not None:
        then()
    if not exit_process:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
