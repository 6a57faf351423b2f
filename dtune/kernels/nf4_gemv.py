"""NF4 decode matmul: y = x @ dequant(W).T (+ bias) for a few tokens (M <= 16), built for memory bandwidth.

At decode time the weight is read once per generated token and there is almost nothing to compute: time is
bytes / bandwidth. A dense bf16 weight costs 2 bytes per element; packed NF4 with double quantization costs
0.5 + ~0.0078 (uint8 absmax per 64) bytes, so the ceiling is ~3.9x the speed of a bf16 GEMV. To reach it, the
grid must keep every SM streaming: programs own a [BLOCK_N] slice of outputs and a 1/SPLIT_K share of K, and
write fp32 partial sums that a final (tiny) reduction adds up, in a fixed order, so results are deterministic.

Math per program: partial[s, m, n] = sum over k in its share of x[m, k] * w[n, k] (fp32), then
y = cast(sum_s partial[s] + bias).
"""

from __future__ import annotations

import torch

from dtune.kernels.nf4 import HAS_TRITON, TL_DTYPES, NF4Weight, interpreting, use_triton
from dtune.kernels.nf4_matmul import nf4_matmul_ref

MAX_DECODE_TOKENS = 16
MAX_SPLIT_K = 8  # the largest SPLIT_K among the configs below
M_BUCKETS = (1, 2, 4, 8, 16)  # rows padded up to one of these (a constexpr: one compiled variant each)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from dtune.kernels.nf4 import autotune_candidates, nf4_tile, nf4_values, round_like

    def _configs() -> list[triton.Config]:
        if interpreting():
            return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2})]
        return autotune_candidates(
            [
                triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
                for bn, bk, sk, w, s in [
                    (64, 128, 4, 4, 3),
                    (32, 256, 4, 4, 3),
                    (64, 256, 2, 4, 3),
                    (128, 128, 2, 8, 3),
                    (32, 128, 8, 4, 4),
                    (16, 256, 8, 4, 4),
                    (64, 64, 8, 4, 4),
                ]
            ]
        )

    @triton.autotune(configs=_configs(), key=["M", "N", "K"], reset_to_zero=["partial_ptr"])
    @triton.jit
    def _nf4_gemv_kernel(
        # pointers
        x_ptr,
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        partial_ptr,
        # sizes and strides
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        # meta-parameters
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        ALIGNED: tl.constexpr,
        X_DTYPE: tl.constexpr,
        RNE_BF16: tl.constexpr,
        DOT_FP32: tl.constexpr,
        M_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        """partial[split, M, N] = x[:, share] @ W[:, share]^T over this program's share of K."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        nf4 = (packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        share = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * share, min((split + 1) * share, K), BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            if ALIGNED:  # whole quantization blocks per row: byte tiles, one scale per block
                w = nf4_tile(*nf4, offs_n, k0, N, K, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
            else:
                w = nf4_values(
                    *nf4,
                    offs_n[:, None] * K + kk[None, :],
                    (offs_n[:, None] < N) & (kk[None, :] < K),
                    BLOCKSIZE,
                    BLOCKSIZE2,
                    DOUBLE_QUANT,
                )
            # W rounded as a dequantized weight in the activation dtype holds it. The loop is bound by the weight
            # bytes: below 16 rows multiply-add in fp32 on CUDA cores, at 16 the tensor cores (fp32 accumulation).
            w = round_like(w, X_DTYPE, RNE_BF16)
            if M_PAD >= 16:  # enough rows for the tensor cores (tl.dot wants every dim >= 16)
                if DOT_FP32 or tl.float32 == X_DTYPE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x.to(X_DTYPE), tl.trans(w).to(X_DTYPE))
            else:  # a few rows: broadcast multiply and reduce on the CUDA cores
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        out = partial_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def nf4_gemv(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] with at most 16 rows in all -> y: [..., N] = x @ dequant(W).T + bias (fp32 accumulation)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"nf4_gemv: last dim {x.shape[-1]} does not match the weight's {k} (weight {w.shape})")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_DECODE_TOKENS:
        raise ValueError(f"nf4_gemv: {m} rows; the decode path takes at most {MAX_DECODE_TOKENS} (use nf4_matmul)")
    if not use_triton(x) or m == 0:
        return nf4_gemv_ref(x, w, bias)
    # fp32 partial sums, one slice per K-split; slices a config does not use stay zero.
    partial = torch.zeros((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _nf4_gemv_kernel[grid](
        x2,
        *w.tensors(),
        partial,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        **w.meta(),
        ALIGNED=w.whole_blocks_per_row(),
        X_DTYPE=TL_DTYPES[x.dtype],
        RNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        DOT_FP32=interpreting(),
        M_PAD=next(b for b in M_BUCKETS if b >= m),  # one token decodes without 15 rows of padding
        enable_fp_fusion=False,
    )
    # Only the slices the chosen config wrote: some Triton versions leave benchmark runs' partial sums in the buffer.
    best = getattr(_nf4_gemv_kernel, "best_config", None)
    used = best.kwargs["SPLIT_K"] if best is not None else MAX_SPLIT_K
    y = partial[:used].sum(dim=0)  # fixed order: deterministic
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def nf4_gemv_ref(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the same as nf4_matmul_ref (dequantize to x's dtype, then a dense matmul)."""
    return nf4_matmul_ref(x, w, bias)
