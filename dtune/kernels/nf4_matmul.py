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
Loading W. When rows hold whole quantization blocks (K a multiple of the block size: every real model) a tile is
read as [rows, tile/2] contiguous packed bytes, each loaded once and split into its two nibbles, with one scale
per quantization block (``nf4_tile``); otherwise element by element (``nf4_values``). Compiled for sm_90 the byte
tiles need 2.3-2.5x less shared memory per pipelined config (kernels/compile_nf4.py): all 7 fit an H100, where
the element path fits 3.

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

    from dtune.kernels.nf4 import autotune_candidates, cast_out, dot_nf4, nf4_operand

    def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
        if interpreting():  # one config (autotune cannot run here); the interpreter pays per program and K-step
            return [triton.Config({"BLOCK_M": 32, "BLOCK_A": 64, "BLOCK_B": 64, "GROUP_M": 4}, num_warps=4)]
        return autotune_candidates(
            [
                triton.Config({"BLOCK_M": bm, "BLOCK_A": ba, "BLOCK_B": bb, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, ba, bb, w, s in tiles
            ]
        )

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

    @triton.autotune(configs=_configs(_TILES), key=["M_BUCKET", "N", "K", "GRAD_INPUT", "R_PAD"])
    @triton.jit
    def _nf4_matmul_kernel(
        # pointers
        in_ptr,
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        bias_ptr,
        lora_in_ptr,
        lora_w_ptr,
        out_ptr,
        # sizes and strides
        M,
        N,
        K,
        R,
        M_BUCKET,
        stride_im,
        stride_ib,
        stride_om,
        stride_oa,
        stride_lr,
        stride_la,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        GRAD_INPUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ALIGNED: tl.constexpr,
        R_PAD: tl.constexpr,
        X_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out[m, a] = sum_b in[m, b] * V[b, a], where V = W^T (forward: y = x @ W^T, a over N, b over K) or
        V = W (GRAD_INPUT: grad_x = grad_y @ W, a over K, b over N). W is [N, K], dequantized tile by tile.

        R_PAD > 0 adds a low-rank term in the epilogue: out[m, a] += sum_r lora_in[m, r] * L[r, a], with lora_in
        contiguous [M, R] and L read through (stride_lr, stride_la) -- the LoRA path fused with the base."""
        A = K if GRAD_INPUT else N
        B = N if GRAD_INPUT else K
        nf4 = (packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr)
        pid_m, pid_a = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(A, BLOCK_A), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
        acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            x = tl.load(
                in_ptr + offs_m[:, None] * stride_im + offs_b[None, :] * stride_ib,
                mask=(offs_m[:, None] < M) & (offs_b[None, :] < B),
                other=0.0,
            )
            # V[b, a] = W[n=b, k=a] for the input gradient, W[n=a, k=b] forward
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
        if R_PAD > 0:
            offs_r = tl.arange(0, R_PAD)
            u = tl.load(
                lora_in_ptr + offs_m[:, None] * R + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
                other=0.0,
            )
            low = tl.load(
                lora_w_ptr + offs_r[:, None] * stride_lr + offs_a[None, :] * stride_la,
                mask=(offs_r[:, None] < R) & (offs_a[None, :] < A),
                other=0.0,
            )
            if DOT_FP32 or tl.float32 == X_DTYPE:
                acc += tl.dot(u.to(tl.float32), low.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(u, low)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_a, mask=offs_a < A, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_a[None, :] * stride_oa,
            cast_out(acc, X_DTYPE, RNE_BF16),
            mask=(offs_m[:, None] < M) & (offs_a[None, :] < A),
        )


def _launch(
    inp: torch.Tensor,
    w: NF4Weight,
    bias: torch.Tensor | None,
    grad_input: bool,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """inp: [..., B] -> out: [..., A] (forward: B=K, A=N; grad_input: B=N, A=K).

    ``low_rank = (u, L)`` adds u @ L in the epilogue: u [rows of inp, R] and L [R, A] (any strides), in inp's dtype.
    """
    n, k = w.shape
    width, out_width = (n, k) if grad_input else (k, n)
    what = "nf4_matmul_grad_input" if grad_input else "nf4_matmul"
    if inp.shape[-1] != width:
        raise ValueError(f"{what}: last dim {inp.shape[-1]} does not match the weight's {width} (weight {w.shape})")
    if inp.dtype not in TL_DTYPES:
        raise ValueError(f"{what}: dtype {inp.dtype} not supported (bf16, fp16, fp32)")
    flat = inp.reshape(-1, width)
    m = flat.shape[0]
    out = torch.empty((m, out_width), dtype=inp.dtype, device=inp.device)
    if low_rank is not None:
        u, low = low_rank
        r = u.shape[-1]
        if u.shape[:-1] != inp.shape[:-1] or low.shape != (r, out_width) or u.dtype != inp.dtype or low.dtype != inp.dtype:
            raise ValueError(f"{what}: low-rank term {tuple(u.shape)} @ {tuple(low.shape)} does not fit [{m}, {out_width}]")
        u = u.reshape(m, r).contiguous()
        r_pad = max(16, triton.next_power_of_2(r))  # tl.dot wants every dim >= 16
        lr_strides = low.stride()
    else:
        u = low = flat
        r, r_pad, lr_strides = 0, 0, (0, 0)
    if m > 0:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_width, meta["BLOCK_A"]),)

        _nf4_matmul_kernel[grid](
            flat,
            *w.tensors(),
            bias if bias is not None else flat,
            u,
            low,
            out,
            m,
            n,
            k,
            r,
            triton.next_power_of_2(m),
            flat.stride(0),
            flat.stride(1),
            out.stride(0),
            out.stride(1),
            *lr_strides,
            **w.meta(),
            GRAD_INPUT=grad_input,
            HAS_BIAS=bias is not None,
            ALIGNED=w.whole_blocks_per_row(),
            R_PAD=r_pad,
            X_DTYPE=TL_DTYPES[inp.dtype],
            DOT_FP32=interpreting(),
            RNE_BF16=interpreting() and inp.dtype == torch.bfloat16,
            enable_fp_fusion=False,  # the scale is multiply-then-add, as in bitsandbytes
        )
    return out.reshape(*inp.shape[:-1], out_width)


LowRank = tuple[torch.Tensor, torch.Tensor]
"""(u, L): a low-rank term u @ L added to a matmul's output, u [..., R] like the input's rows, L [R, out]."""


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, low_rank: LowRank | None = None) -> torch.Tensor:
    """x: [..., K] -> y: [..., N] = x @ dequant(W).T + bias (+ u @ L), in x's dtype, fp32 accumulation.

    ``low_rank = (u, L)``, u [..., R], L [R, N]: added in the kernel's epilogue (the LoRA path y += s(xA^T)B^T
    with u = s x A^T, L = B^T), so the base output is written once instead of written, re-read and re-written.
    """
    if not use_triton(x):
        return nf4_matmul_ref(x, w, bias, low_rank)
    return _launch(x, w, bias, False, low_rank)


def nf4_matmul_grad_input(grad_y: torch.Tensor, w: NF4Weight, low_rank: LowRank | None = None) -> torch.Tensor:
    """grad_y: [..., N] -> grad_x: [..., K] = grad_y @ dequant(W) (+ u @ L), in grad_y's dtype, fp32 accumulation.

    ``low_rank = (v, L)``, v [..., R], L [R, K]: for LoRA, v = s grad_y B and L = A.
    """
    if not use_triton(grad_y):
        return nf4_matmul_grad_input_ref(grad_y, w, low_rank)
    return _launch(grad_y, w, None, True, low_rank)


def _plus_low_rank(out: torch.Tensor, low_rank: LowRank | None) -> torch.Tensor:
    if low_rank is None:
        return out
    u, low = low_rank
    return out + u @ low


def nf4_matmul_ref(
    x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, low_rank: LowRank | None = None
) -> torch.Tensor:
    """Reference: dequantize to x's dtype, then a dense matmul (what bitsandbytes does); low-rank term added after."""
    y = torch.nn.functional.linear(x, nf4_dequantize_ref(w, x.dtype), None if bias is None else bias.to(x.dtype))
    return _plus_low_rank(y, low_rank)


def nf4_matmul_grad_input_ref(grad_y: torch.Tensor, w: NF4Weight, low_rank: LowRank | None = None) -> torch.Tensor:
    """Reference input gradient: grad_y @ dequant(W) (+ u @ L)."""
    return _plus_low_rank(grad_y @ nf4_dequantize_ref(w, grad_y.dtype), low_rank)
