"""Grouped NF4 matmul for mixture-of-experts layers: the experts' weights stay packed, tokens are grouped by expert.

An MoE layer's experts are E weights [N, K] (in transformers 5: one 3-D parameter [E, N, K] per projection). Each
expert is quantized on its own, exactly as bitsandbytes quantizes a ``Linear4bit`` weight (:class:`NF4Experts`),
and the quantized experts are stacked: expert e's bytes, scales and double-quantization constants are row e of
each tensor, so one expert dequantizes bit for bit like ``bitsandbytes.functional.dequantize_4bit`` of its own
``QuantState``.

The matmul takes the routed token rows sorted by expert (``offsets[e]:offsets[e+1]`` are expert e's rows, as
:func:`group_by_expert` returns them) and computes, for each row m of expert e,

    forward:        y[m] = x[m] @ dequant(W_e)^T        x [M, K] -> y [M, N]
    input gradient: g_x[m] = g_y[m] @ dequant(W_e)      g_y [M, N] -> g_x [M, K]

One Triton program computes a [BLOCK_M, BLOCK_A] output tile of one expert's rows, dequantizing the tiles of W_e
it multiplies on chip (``nf4_tile``, as the dense kernel does): the 16-bit experts never exist in device memory.
Which expert and rows a program takes comes from a tile schedule built on the device from ``offsets`` (nothing
copied to the host): ceil(rows_e / BLOCK_M) row tiles per expert, at most ceil(M / BLOCK_M) + E in all;
programs past the last tile return at once.

The references (``*_ref``) dequantize each expert that has rows and run a dense matmul, as bitsandbytes would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtune.kernels.nf4 import HAS_TRITON, TL_DTYPES, NF4Weight, interpreting, use_triton
from dtune.kernels.nf4_dequantize import nf4_dequantize_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from dtune.kernels.nf4 import autotune_candidates, cast_out, dot_nf4, nf4_operand


@dataclass(frozen=True)
class NF4Experts:
    """E weights [N, K], each quantized to NF4 on its own (bitsandbytes' layout), stacked along a first dim.

    packed: uint8 [E, ceil(N*K/2)]; absmax: [E, blocks] (uint8 codes with double quantization, else fp32);
    absmax2: fp32 [E, blocks2] ([E, 1] zeros without double quantization); offset: fp32 [E]; code2: fp32 [256]
    (bitsandbytes' dynamic map, the same for every expert); code: fp32 [16] (the NF4 levels).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int, int]
    blocksize: int
    blocksize2: int
    double_quant: bool
    dtype: torch.dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Experts:
        """Quantize ``weight`` [E, N, K] (16- or 32-bit) expert by expert with ``bitsandbytes.functional.quantize_4bit``
        (NF4), on the weight's device. The result dequantizes (to ``weight.dtype``) like bitsandbytes."""
        import bitsandbytes.functional as bnbF

        if weight.dim() != 3:
            raise ValueError(f"NF4Experts.quantize: expected a 3-D [experts, out, in] weight, got {tuple(weight.shape)}")
        if weight.shape[1] * weight.shape[2] >= 2**31:
            raise ValueError(f"NF4Experts.quantize: experts of {tuple(weight.shape[1:])} exceed 2**31 elements (int32 indexing)")
        parts = [
            bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
            for w in weight.detach()
        ]
        states = [state for _, state in parts]
        dev = weight.device
        if double_quant:
            absmax2 = torch.stack([s.state2.absmax.float() for s in states])
            offset = torch.stack([torch.as_tensor(s.offset, dtype=torch.float32, device=dev).reshape(()) for s in states])
            code2 = states[0].state2.code.float()
            if any(not torch.equal(s.state2.code.float(), code2) for s in states[1:]):  # pragma: no cover - bnb's fixed map
                raise RuntimeError("NF4Experts.quantize: bitsandbytes gave experts different double-quantization maps")
            blocksize2 = int(states[0].state2.blocksize)
        else:
            absmax2 = torch.zeros(len(states), 1, device=dev)
            offset = torch.zeros(len(states), device=dev)
            code2, blocksize2 = torch.zeros(1, device=dev), 1
        return cls(
            packed=torch.stack([p.reshape(-1).view(torch.uint8) for p, _ in parts]),
            absmax=torch.stack([s.absmax for s in states]),
            absmax2=absmax2,
            code2=code2,
            offset=offset,
            code=states[0].code.float().to(dev),
            shape=tuple(int(s) for s in weight.shape),
            blocksize=blocksize,
            blocksize2=blocksize2,
            double_quant=double_quant,
            dtype=weight.dtype,
        )

    @property
    def experts(self) -> int:
        return self.shape[0]

    def expert(self, e: int) -> NF4Weight:
        """Expert ``e`` as the dense kernels take a weight."""
        return NF4Weight(
            self.packed[e],
            self.absmax[e],
            self.absmax2[e],
            self.code2,
            self.offset[e].reshape(1),
            self.code,
            self.shape[1:],
            self.blocksize,
            self.blocksize2,
            self.double_quant,
            self.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts dense, [E, N, K] (reference; allocates the 16-bit experts)."""
        return torch.stack([nf4_dequantize_ref(self.expert(e), dtype) for e in range(self.experts)])

    def nbytes(self) -> int:
        """Bytes of the packed weights and their quantization constants."""
        tensors = (self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code)
        return sum(t.numel() * t.element_size() for t in tensors)


def group_by_expert(top_k_index: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort routed (token, slot) pairs by expert.

    ``top_k_index``: int [T, k], the experts each token is routed to. Returns ``order`` (int64 [T*k]: flat
    (token * k + slot) positions sorted by expert, stable) and ``offsets`` (int32 [E+1]: expert e's rows of the
    sorted list are ``offsets[e]:offsets[e+1]``). Both stay on the device (CUDA's bincount synchronises once).
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)[:experts]
    offsets = torch.zeros(experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def _check(x: torch.Tensor, w: NF4Experts, offsets: torch.Tensor, width: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{what}: expected rows [M, {width}] for experts {w.shape}, got {tuple(x.shape)}")
    if offsets.shape != (w.experts + 1,):
        raise ValueError(f"{what}: offsets must be [{w.experts + 1}] (one per expert, plus the end), got {tuple(offsets.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: dtype {x.dtype} not supported (bf16, fp16, fp32)")


def nf4_grouped_matmul(x: torch.Tensor, w: NF4Experts, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows sorted by expert, ``offsets`` [E+1]) -> y [M, N], y[m] = x[m] @ dequant(W_e)^T for m in
    expert e's rows, in x's dtype with fp32 accumulation. Raises ValueError on shapes that do not fit."""
    _check(x, w, offsets, w.shape[2], "nf4_grouped_matmul")
    if not use_triton(x):
        return nf4_grouped_matmul_ref(x, w, offsets)
    return _launch(x, w, offsets, grad_input=False)


def nf4_grouped_matmul_grad_input(grad_y: torch.Tensor, w: NF4Experts, offsets: torch.Tensor) -> torch.Tensor:
    """grad_y [M, N] -> grad_x [M, K], grad_x[m] = grad_y[m] @ dequant(W_e) for m in expert e's rows."""
    _check(grad_y, w, offsets, w.shape[1], "nf4_grouped_matmul_grad_input")
    if not use_triton(grad_y):
        return nf4_grouped_matmul_grad_input_ref(grad_y, w, offsets)
    return _launch(grad_y, w, offsets, grad_input=True)


def _per_expert(x: torch.Tensor, w: NF4Experts, offsets: torch.Tensor, width: int, grad_input: bool) -> torch.Tensor:
    out = x.new_zeros((x.shape[0], width))
    bounds = offsets.tolist()
    for e in range(w.experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            dense = nf4_dequantize_ref(w.expert(e), x.dtype)
            out[lo:hi] = x[lo:hi] @ dense if grad_input else torch.nn.functional.linear(x[lo:hi], dense)
    return out


def nf4_grouped_matmul_ref(x: torch.Tensor, w: NF4Experts, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: each expert with rows dequantized to x's dtype, then a dense matmul (bitsandbytes' way)."""
    return _per_expert(x, w, offsets, w.shape[1], grad_input=False)


def nf4_grouped_matmul_grad_input_ref(grad_y: torch.Tensor, w: NF4Experts, offsets: torch.Tensor) -> torch.Tensor:
    """Reference input gradient: grad_y[rows of e] @ dequant(W_e)."""
    return _per_expert(grad_y, w, offsets, w.shape[2], grad_input=True)


def tile_schedule(offsets: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the ceil(rows / block_m) + E possible row tiles: its expert (E when there is no such tile) and
    its first row, int32 on the device. Expert e's rows ``offsets[e]:offsets[e+1]`` make ceil(n_e / block_m)
    consecutive tiles."""
    experts = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    slots = torch.arange(-(-rows // block_m) + experts, device=offsets.device)
    expert = torch.searchsorted(ends, slots, right=True)
    e = expert.clamp(max=experts - 1)
    first = offsets[:-1].long()[e] + (slots - (ends - tiles)[e]) * block_m
    return expert.to(torch.int32), first.to(torch.int32)


if HAS_TRITON:

    def _configs() -> list[triton.Config]:
        if interpreting():
            return [triton.Config({"BLOCK_A": 64, "BLOCK_B": 64}, num_warps=4)]
        tiles = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 4)]
        return autotune_candidates(
            [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=nw, num_stages=s) for a, b, nw, s in tiles]
        )

    @triton.autotune(configs=_configs(), key=["N", "K", "GRAD_INPUT", "BLOCK_M"])
    @triton.jit
    def _nf4_grouped_kernel(
        in_ptr,
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        offsets_ptr,
        tile_expert_ptr,
        tile_first_ptr,
        out_ptr,
        N,
        K,
        E,
        stride_packed,
        stride_absmax,
        stride_absmax2,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        GRAD_INPUT: tl.constexpr,
        ALIGNED: tl.constexpr,
        X_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """out[m, a] = sum_b in[m, b] V_e[b, a] for the rows m of one expert e: V_e = W_e^T (forward, a over N,
        b over K) or W_e (GRAD_INPUT, a over K, b over N). Inputs and outputs are contiguous [M, B] and [M, A]."""
        A = K if GRAD_INPUT else N
        B = N if GRAD_INPUT else K
        grid_a = tl.cdiv(A, BLOCK_A)
        pid_t = tl.program_id(0) // grid_a
        pid_a = tl.program_id(0) % grid_a
        e = tl.load(tile_expert_ptr + pid_t)
        if e >= E:
            return
        first = tl.load(tile_first_ptr + pid_t)
        end = tl.load(offsets_ptr + e + 1)
        nf4 = (
            packed_ptr + e.to(tl.int64) * stride_packed,
            absmax_ptr + e * stride_absmax,
            absmax2_ptr + e * stride_absmax2,
            code2_ptr,
            offset_ptr + e,
            code_ptr,
        )
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            x = tl.load(
                in_ptr + offs_m[:, None].to(tl.int64) * B + offs_b[None, :],
                mask=(offs_m[:, None] < end) & (offs_b[None, :] < B),
                other=0.0,
            )
            v = nf4_operand(
                *nf4,
                offs_a,
                offs_b,
                pid_a * BLOCK_A,
                b0,
                N,
                K,
                GRAD_INPUT,
                ALIGNED,
                BLOCK_A,
                BLOCK_B,
                BLOCKSIZE,
                BLOCKSIZE2,
                DOUBLE_QUANT,
            )
            acc = dot_nf4(acc, x, v, X_DTYPE, DOT_FP32, RNE_BF16)
        tl.store(
            out_ptr + offs_m[:, None].to(tl.int64) * A + offs_a[None, :],
            cast_out(acc, X_DTYPE, RNE_BF16),
            mask=(offs_m[:, None] < end) & (offs_a[None, :] < A),
        )


def block_m_for(rows: int, experts: int) -> int:
    """Row-tile height from the mean rows per expert (known without synchronising): small groups, small tiles."""
    mean = rows / max(experts, 1)
    if interpreting():
        return 16 if mean <= 16 else 32
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 96 else 128


def _launch(inp: torch.Tensor, w: NF4Experts, offsets: torch.Tensor, grad_input: bool) -> torch.Tensor:
    _, n, k = w.shape
    rows, out_width = inp.shape[0], (k if grad_input else n)
    out = torch.zeros((rows, out_width), dtype=inp.dtype, device=inp.device)  # rows routed to no expert stay 0
    if rows == 0:
        return out
    inp = inp.contiguous()
    block_m = block_m_for(rows, w.experts)
    tile_expert, tile_first = tile_schedule(offsets, rows, block_m)

    def grid(meta: dict) -> tuple[int]:
        return (tile_expert.numel() * triton.cdiv(out_width, meta["BLOCK_A"]),)

    _nf4_grouped_kernel[grid](
        inp,
        w.packed,
        w.absmax,
        w.absmax2,
        w.code2,
        w.offset,
        w.code,
        offsets,
        tile_expert,
        tile_first,
        out,
        n,
        k,
        w.experts,
        w.packed.stride(0),
        w.absmax.stride(0),
        w.absmax2.stride(0),
        BLOCKSIZE=w.blocksize,
        BLOCKSIZE2=w.blocksize2,
        DOUBLE_QUANT=w.double_quant,
        GRAD_INPUT=grad_input,
        ALIGNED=k % w.blocksize == 0 and w.blocksize & (w.blocksize - 1) == 0,
        X_DTYPE=TL_DTYPES[inp.dtype],
        DOT_FP32=interpreting(),
        RNE_BF16=interpreting() and inp.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        enable_fp_fusion=False,  # the scale is multiply-then-add, as in bitsandbytes
    )
    return out
