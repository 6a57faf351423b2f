"""NF4 dequantize: packed 4-bit weight (bitsandbytes layout) -> dense bf16/fp16/fp32 weight.

What it replaces: ``bitsandbytes.functional.dequantize_4bit``, which with double quantization runs two kernels
(absmax codes -> fp32 absmax, written to memory; then nibbles -> weight). Here one pass reads each packed byte
once, resolves the doubly quantized scale on chip and writes the weight: the traffic is the packed bytes, the
uint8 absmax and the output -- nothing else. When the weight is whole quantization blocks (always, for real
layers) each program takes [ROWS, BLOCKSIZE] of it: contiguous packed bytes split into nibbles, one scale per
block (``nf4_tile``); otherwise element by element.

Math (per element i of the row-major [N, K] weight), in fp32 and in bitsandbytes' order so results are
bit-exact: ``scale = code2[absmax_u8[i // bs]] * absmax2[(i // bs) // bs2] + offset``; ``w = code[nibble_i] * scale``.
"""

from __future__ import annotations

import torch

from dtune.kernels.nf4 import HAS_TRITON, TL_DTYPES, NF4Weight, interpreting, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from dtune.kernels.nf4 import cast_out, nf4_tile, nf4_values

    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        out_ptr,
        numel,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        WHOLE_BLOCKS: tl.constexpr,
        OUT_DTYPE: tl.constexpr,
        RNE_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """BLOCK elements per program. WHOLE_BLOCKS (numel a multiple of BLOCKSIZE, BLOCK of it): the weight seen as
        [numel / BLOCKSIZE, BLOCKSIZE], each packed byte loaded once (contiguous bytes) and one scale per block;
        otherwise element by element."""
        nf4 = (packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr)
        if WHOLE_BLOCKS:
            ROWS: tl.constexpr = BLOCK // BLOCKSIZE
            rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
            w = nf4_tile(*nf4, rows, 0, numel // BLOCKSIZE, BLOCKSIZE, BLOCKSIZE, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
            idx = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        else:
            idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            w = nf4_values(*nf4, idx, idx < numel, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        tl.store(out_ptr + idx, cast_out(w, OUT_DTYPE, RNE_BF16), mask=idx < numel)


LAUNCH = {"BLOCK": 2048}  # elements per program
NUM_WARPS = 4


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight [N, K] in ``dtype`` (default: the dtype bitsandbytes would give, ``w.dtype``)."""
    dtype = dtype or w.dtype
    if not use_triton(w.packed):
        return nf4_dequantize_ref(w, dtype)
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.packed.device)
    numel = n * k
    whole_blocks = numel % w.blocksize == 0 and w.blocksize_is_pow2()  # every real weight: byte tiles
    block = max(LAUNCH["BLOCK"], w.blocksize) if whole_blocks else LAUNCH["BLOCK"]
    _nf4_dequantize_kernel[(triton.cdiv(numel, block),)](
        *w.tensors(),
        out,
        numel,
        **w.meta(),
        WHOLE_BLOCKS=whole_blocks,
        OUT_DTYPE=TL_DTYPES[dtype],
        RNE_BF16=interpreting() and dtype == torch.bfloat16,
        BLOCK=block,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # multiply then add, as bitsandbytes does: a fused FMA would round differently
    )
    return out


def nf4_dequantize_ref(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch reference with the same signature and the same arithmetic."""
    dtype = dtype or w.dtype
    n, k = w.shape
    packed = w.packed.to(torch.int32)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: n * k]
    scales = w.scales().repeat_interleave(w.blocksize)[: n * k]
    return (w.code[nibbles] * scales).to(dtype).reshape(n, k)
