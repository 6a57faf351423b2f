"""Fused NF4 matmul: y = x @ dequant(W).T (+ bias), and its input gradient grad_x = grad_y @ dequant(W).

What it replaces: bitsandbytes trains a 4-bit layer by dequantizing the whole weight to device memory
(N*K*2 bytes written, then read back by cuBLAS) on every forward and again in backward. Here each program
dequantizes the [BLOCK_N, BLOCK_K] tile of W it is about to multiply, in registers, and feeds it straight to
``tl.dot``: the weight crosses device memory as packed 4-bit bytes only (a quarter of bf16), and no temporary
weight is ever allocated.

Math. Forward, for a [BLOCK_M, BLOCK_N] tile of y:
    acc = sum over K-tiles of  x[m, k] @ w[n, k]^T          (fp32 accumulator)
    y = cast(acc + bias[n])
Backward (the base is frozen, so only the input gradient), for a [BLOCK_M, BLOCK_K] tile of grad_x:
    acc = sum over N-tiles of  grad_y[m, n] @ w[n, k]
The dequantized tile is rounded to the activation dtype before the dot (as bitsandbytes' dequantized weight is),
and accumulation is fp32. Under the Triton interpreter (CPU tests) both operands go to ``tl.dot`` as fp32,
because the interpreter's bf16 dot is wrong; the rounding of W to the activation dtype is kept, so the numbers
match what the GPU computes up to accumulation order.
"""

from __future__ import annotations

import torch

from dtune.kernels.nf4 import HAS_TRITON, TL_DTYPES, NF4Weight, interpreting, use_triton
from dtune.kernels.nf4_dequantize import nf4_dequantize_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from dtune.kernels.nf4 import cast_out, nf4_values, round_like

    def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
        if interpreting():  # one config (autotune cannot run here); the interpreter pays per program and K-step
            return [triton.Config({"BLOCK_M": 32, "BLOCK_A": 64, "BLOCK_B": 64, "GROUP_M": 4}, num_warps=4)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_A": ba, "BLOCK_B": bb, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, ba, bb, w, s in tiles
        ]

    # (BLOCK_M, BLOCK_A = output tile width, BLOCK_B = reduction tile, warps, stages), for Hopper-class GPUs.
    _TILES = [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4),
        (16, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
    ]

    @triton.jit
    def _grouped(pid, grid_m, grid_a, GROUP_M: tl.constexpr):
        """Program id -> (tile row, tile column), walking GROUP_M rows at a time so W tiles are reused in L2."""
        per_group = GROUP_M * grid_a
        first_m = (pid // per_group) * GROUP_M
        rows = min(grid_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % rows, (pid % per_group) // rows

    @triton.autotune(configs=_configs(_TILES), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _nf4_matmul_kernel(
        # pointers
        x_ptr,
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        bias_ptr,
        y_ptr,
        # sizes and strides
        M,
        N,
        K,
        M_BUCKET,
        stride_xm,
        stride_xk,
        stride_ym,
        stride_yn,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        X_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """y[M, N] = x[M, K] @ W[N, K]^T (+ bias). BLOCK_A tiles N, BLOCK_B tiles K."""
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_A), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_k = tl.arange(0, BLOCK_B)
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_B):
            kk = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )
            idx = offs_n[:, None] * K + kk[None, :]  # [BLOCK_A, BLOCK_B] flat indices into W
            w = nf4_values(
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                code2_ptr,
                offset_ptr,
                code_ptr,
                idx,
                (offs_n[:, None] < N) & (kk[None, :] < K),
                BLOCKSIZE,
                BLOCKSIZE2,
                DOUBLE_QUANT,
            )
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(round_like(w, X_DTYPE, RNE_BF16)), input_precision="ieee")
            elif tl.float32 == X_DTYPE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(X_DTYPE)))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            cast_out(acc, X_DTYPE, RNE_BF16),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )

    @triton.autotune(configs=_configs(_TILES), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _nf4_matmul_grad_input_kernel(
        # pointers
        g_ptr,
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        gx_ptr,
        # sizes and strides
        M,
        N,
        K,
        M_BUCKET,
        stride_gm,
        stride_gn,
        stride_xm,
        stride_xk,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        X_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """grad_x[M, K] = grad_y[M, N] @ W[N, K]. BLOCK_A tiles K (the output), BLOCK_B tiles N."""
        pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_A), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_n = tl.arange(0, BLOCK_B)
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_B):
            nn = n0 + offs_n
            g = tl.load(
                g_ptr + offs_m[:, None] * stride_gm + nn[None, :] * stride_gn,
                mask=(offs_m[:, None] < M) & (nn[None, :] < N),
                other=0.0,
            )
            idx = nn[:, None] * K + offs_k[None, :]  # [BLOCK_B, BLOCK_A]
            w = nf4_values(
                packed_ptr,
                absmax_ptr,
                absmax2_ptr,
                code2_ptr,
                offset_ptr,
                code_ptr,
                idx,
                (nn[:, None] < N) & (offs_k[None, :] < K),
                BLOCKSIZE,
                BLOCKSIZE2,
                DOUBLE_QUANT,
            )
            if DOT_FP32:
                acc += tl.dot(g.to(tl.float32), round_like(w, X_DTYPE, RNE_BF16), input_precision="ieee")
            elif tl.float32 == X_DTYPE:
                acc += tl.dot(g, w, input_precision="ieee")
            else:
                acc += tl.dot(g, w.to(X_DTYPE))
        tl.store(
            gx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            cast_out(acc, X_DTYPE, RNE_BF16),
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
        )


def _check(x: torch.Tensor, w: NF4Weight, features: int, what: str) -> None:
    if x.shape[-1] != features:
        raise ValueError(f"{what}: last dim {x.shape[-1]} does not match the weight's {features} (weight {w.shape})")
    if x.dtype not in TL_DTYPES:
        raise ValueError(f"{what}: dtype {x.dtype} not supported (bf16, fp16, fp32)")


def _common(w: NF4Weight, x_dtype: torch.dtype, m: int) -> dict:
    return dict(
        BLOCKSIZE=w.blocksize,
        BLOCKSIZE2=w.blocksize2,
        DOUBLE_QUANT=w.double_quant,
        X_DTYPE=TL_DTYPES[x_dtype],
        DOT_FP32=interpreting(),
        RNE_BF16=interpreting() and x_dtype == torch.bfloat16,
        enable_fp_fusion=False,  # the scale is multiply-then-add, as in bitsandbytes
    )


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> y: [..., N] = x @ dequant(W).T + bias, in x's dtype, fp32 accumulation."""
    n, k = w.shape
    _check(x, w, k, "nf4_matmul")
    if not use_triton(x):
        return nf4_matmul_ref(x, w, bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_A"]),)

    _nf4_matmul_kernel[grid](
        x2,
        w.packed,
        w.absmax,
        w.absmax2,
        w.code2,
        w.offset,
        w.code,
        bias if bias is not None else x2,
        y,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        **_common(w, x.dtype, m),
    )
    return y.reshape(*x.shape[:-1], n)


def nf4_matmul_grad_input(grad_y: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_y: [..., N] -> grad_x: [..., K] = grad_y @ dequant(W), in grad_y's dtype, fp32 accumulation."""
    n, k = w.shape
    _check(grad_y, w, n, "nf4_matmul_grad_input")
    if not use_triton(grad_y):
        return nf4_matmul_grad_input_ref(grad_y, w)
    g2 = grad_y.reshape(-1, n)
    m = g2.shape[0]
    gx = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)
    if m == 0:
        return gx.reshape(*grad_y.shape[:-1], k)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_A"]),)

    _nf4_matmul_grad_input_kernel[grid](
        g2,
        w.packed,
        w.absmax,
        w.absmax2,
        w.code2,
        w.offset,
        w.code,
        gx,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        g2.stride(0),
        g2.stride(1),
        gx.stride(0),
        gx.stride(1),
        **_common(w, grad_y.dtype, m),
    )
    return gx.reshape(*grad_y.shape[:-1], k)


def nf4_matmul_ref(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize to x's dtype, then a dense matmul (what bitsandbytes does)."""
    return torch.nn.functional.linear(x, nf4_dequantize_ref(w, x.dtype), None if bias is None else bias.to(x.dtype))


def nf4_matmul_grad_input_ref(grad_y: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """Reference input gradient: grad_y @ dequant(W)."""
    return grad_y @ nf4_dequantize_ref(w, grad_y.dtype)
