"""Grouped dense matmul over token rows sorted by expert: the MoE LoRA adapters' matmuls.

Each expert's rows times that expert's small dense matrix (an adapter's A_e or B_e). One call of
``torch._grouped_mm`` (cuBLAS/CUTLASS grouped GEMM on Hopper and later, a CPU implementation in recent torch) where
its layout rules hold: no copy of the expert offsets to the host and one kernel for all experts, where a loop over
E experts launches E matmuls per projection. Elsewhere (other GPUs, fp16/fp32 on CUDA, rows of a byte width that is
not a multiple of 16) a loop over the experts, with one copy of the offsets to the host per grouping
(:class:`ExpertRows`).
"""

from __future__ import annotations

import functools

import torch


class ExpertRows:
    """Rows sorted by expert: ``offsets`` (int32 [E+1], on the device; expert e owns rows ``offsets[e]:offsets[e+1]``
    and ``offsets[E]`` is the row count), and the same on the host when a loop needs them, copied once."""

    def __init__(self, offsets: torch.Tensor) -> None:
        self.offsets = offsets
        self._bounds: list[int] | None = None

    def bounds(self) -> list[int]:
        if self._bounds is None:
            self._bounds = self.offsets.tolist()
        return self._bounds


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: ``torch._grouped_mm``'s backward refuses the
    expanded (stride-0) gradients that e.g. ``y.sum()`` produces."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


@functools.cache
def _grouped_mm_on_cpu() -> bool:
    """torch._grouped_mm has a CPU implementation (recent torch releases; probed once)."""
    try:
        x, w = torch.ones(2, 8), torch.ones(1, 8, 4)
        return bool(torch._grouped_mm(x, w, offs=torch.tensor([2], dtype=torch.int32)).eq(8).all())
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes x [M, in] and weight [E, out, in] (both contiguous) on this device: 16-bit
    or fp32, strides and start addresses multiples of 16 bytes (a ZeRO-3 parameter can be a view into a flat buffer
    at any offset), and on CUDA bf16 on compute capability 9.0 or later."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype or x.dim() != 2 or weight.dim() != 3:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.data_ptr() % 16 or weight.data_ptr() % 16:
        return False
    item = x.element_size()
    if (weight.shape[1] * item) % 16 or (weight.shape[2] * item) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and _grouped_mm_on_cpu()


def grouped_dense(x: torch.Tensor, weight: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """x [M, in] sorted by expert (``rows``) -> [M, out], row m of expert e times ``weight[e]``^T, weight
    [E, out, in]. Differentiable in both. Every row must belong to an expert (``offsets[E] == M``, as
    :func:`~dtune.kernels.nf4_grouped.group_by_expert` gives for routed indices below E): the grouped GEMM leaves
    other rows (and their input gradient) unwritten, so they are refused -- on the device, without a sync
    (``torch._assert_async``), by the loop with ValueError. Raises ValueError on shapes that do not fit."""
    experts, _, width = weight.shape
    if x.dim() != 2 or x.shape[1] != width or rows.offsets.shape != (experts + 1,):
        raise ValueError(
            f"grouped_dense: rows {tuple(x.shape)}, weight {tuple(weight.shape)} and offsets "
            f"{tuple(rows.offsets.shape)} do not fit ([M, in], [E, out, in], [E+1])"
        )
    weight, x = weight.contiguous(), x.contiguous()
    if grouped_mm_fits(x, weight):
        torch._assert_async(rows.offsets[-1] == x.shape[0])
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=rows.offsets[1:]))
    return grouped_dense_loop(x, weight, rows)


def grouped_dense_loop(x: torch.Tensor, weight: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """:func:`grouped_dense` as a loop over the experts, always (the reference the tests hold it to)."""
    bounds = rows.bounds()
    if bounds[-1] != x.shape[0]:
        raise ValueError(f"grouped_dense: {x.shape[0]} rows, but the experts own {bounds[-1]} (offsets[E] must be M)")
    return torch.cat([x[bounds[e] : bounds[e + 1]] @ weight[e].t() for e in range(weight.shape[0])])
