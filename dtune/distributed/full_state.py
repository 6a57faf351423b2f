"""Training state in a form no strategy owns: full CPU tensors keyed by parameter name.

What a checkpoint holds of the optimizer (fp32 master values and Adam's moments), the random generators and the
fp16 loss scaler, gathered from however the :class:`~dtune.distributed.engine.Engine` shards them (DDP: whole;
ZeRO-1/2/3: DeepSpeed's partitions; FSDP2: DTensor shards) and put back re-sharded for the run that resumes -- on
any strategy and world size.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch
from torch import nn

from dtune.distributed.engine import Engine
from dtune.errors import ConfigError


class FullState:
    """Reads and restores the strategy-independent training state through ``engine``. Collective where noted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def strategy(self) -> str:
        return self.engine.strategy

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.engine.unwrap(model).named_parameters() if p.requires_grad}

    def _base_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """The torch optimizer under Accelerate's wrapper (and, with DeepSpeed, under ZeRO's)."""
        opt = _inner(optimizer)  # AcceleratedOptimizer -> torch / DeepSpeedZeroOptimizer
        return _inner(opt) if self.strategy == "deepspeed" else opt

    def full_param(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 master value of trainable parameter ``p`` as a full CPU tensor (DeepSpeed's fp32 partition, FSDP2's
        DTensor shards: gathered). Collective under ZeRO and FSDP2: every rank calls it for the same parameters."""
        if self.strategy == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p).detach().to("cpu", torch.float32, copy=True)
        return _full(p).to(torch.float32, copy=True)

    def params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable parameter of ``model`` by name, as :meth:`full_param` gives it. Collective."""
        return {name: self.full_param(p) for name, p in self._trainable(model).items()}

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The trainable parameters (fp32 master values) and their optimizer states as full CPU tensors keyed by
        parameter name, plus the optimizer step count: the same whatever the strategy and world size, so a run
        resumes on any of them. Collective: every rank must call it."""
        params = self._trainable(model)
        base = self._base_optimizer(optimizer)
        step = 0
        state: dict[str, dict[str, torch.Tensor]] = {}
        if self.strategy == "deepspeed":
            from deepspeed.utils import safe_get_full_optimizer_state

            flat = next((s for s in base.state.values() if s), {})
            keys = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0]
            step = int(flat["step"]) if "step" in flat else 0
            for name, p in params.items():
                entry = {"param": self.full_param(p)}
                for key in keys:
                    entry[key] = safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True)
                state[name] = entry
        else:
            for name, p in params.items():
                entry = {"param": self.full_param(p)}
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
        if self.engine.zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with torch.no_grad(), gathered:
            if self.engine.is_main or not self.engine.zero3:
                for name, p in params.items():
                    p.data.copy_(saved[name]["param"].to(p.device, p.dtype))

    def rng_state(self) -> dict[str, Any]:
        """This rank's random generators (python, torch CPU, CUDA), in a form ``torch.load(weights_only=True)`` reads."""
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's device only: a resumed job may see another number of GPUs
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def scaler_state(self, optimizer: Any) -> dict[str, Any] | None:
        """fp16 loss-scaler state (Accelerate's GradScaler, or DeepSpeed's dynamic loss scaler); None without fp16."""
        if self.engine.accelerator.scaler is not None:
            return {"torch": self.engine.accelerator.scaler.state_dict()}
        scaler = getattr(_inner(optimizer), "loss_scaler", None)
        if scaler is not None and self.strategy == "deepspeed" and self.engine.compute_dtype == torch.float16:
            return {"deepspeed": {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}}
        return None

    def load_scaler_state(self, optimizer: Any, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if "torch" in state and self.engine.accelerator.scaler is not None:
            self.engine.accelerator.scaler.load_state_dict(state["torch"])
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
        t = _on_device(t, t.device_mesh.device_type).full_tensor()
    return t.detach().to("cpu", copy=True)


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like parameter ``p``: on its device, and sharded the same way when ``p`` is a DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the full value (read from the checkpoint): each keeps its own shard, nothing is sent.
        out = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)
        return _on_device(out, p.to_local().device)
    return full.to(p.device)


def _on_device(t: Any, device: torch.device | str) -> Any:
    """DTensor ``t`` with its local shard on ``device``. Under FSDP2 CPU offload the shards live on the CPU while the
    mesh (and its process group, NCCL) is the GPU's: collectives need the shard on the mesh's device, and the
    optimizer needs its states on the CPU beside the shards."""
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    if local.device.type == torch.device(device).type:
        return t
    return DTensor.from_local(local.to(device), t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def _copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    p.copy_(_like(p, full.to(p.dtype)))
