"""NF4 weights as plain tensors, and the Triton helpers every NF4 kernel shares.

bitsandbytes keeps a 4-bit weight as a ``Params4bit`` (packed bytes, possibly viewed as bf16/fp16 so that
sharding engines can split it) plus a ``QuantState``. Kernels and ``torch.library`` ops want tensors and ints
only, so :class:`NF4Weight` unpacks the pair once:

* ``packed``: uint8 [ceil(N*K/2)] -- the [N, K] weight flattened row-major; element i lives in byte i // 2, even
  i in the high nibble.
* ``absmax``: one scale per ``blocksize`` consecutive elements -- fp32, or with double quantization uint8 codes
  into ``code2`` scaled by ``absmax2`` (fp32, one per ``blocksize2`` blocks) plus a scalar ``offset``:
  ``absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset`` (in fp32, multiply then add).
* ``code``: the 16 NF4 (or FP4) levels; ``w[i] = code[nibble(i)] * absmax[i // blocksize]`` in fp32.

The same arithmetic, in the same order, as ``bitsandbytes.functional.dequantize_4bit``: results are bit-exact.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton use the references
    HAS_TRITON = False


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1), which runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_candidates(configs: list) -> list:
    """The autotune configs to try: all, or the first ``$DTUNE_NF4_AUTOTUNE_CONFIGS`` of them (each config is one
    compile on first launch; correctness runs on a GPU set 1-2 to stay within minutes, benchmarks keep all)."""
    limit = os.environ.get("DTUNE_NF4_AUTOTUNE_CONFIGS")
    if not limit:
        return configs
    if not limit.isdigit() or int(limit) < 1:
        raise ValueError(f"DTUNE_NF4_AUTOTUNE_CONFIGS: expected a positive integer, got {limit!r}")
    return configs[: int(limit)]


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors under the interpreter; otherwise the references run.

    Raises:
        RuntimeError: under the interpreter, a Triton/NumPy pair whose interpreter cannot run these kernels.
    """
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    if interpreting():
        _check_interpreter()
        return True
    return False


@functools.cache
def _check_interpreter() -> None:
    """Triton's interpreter before 3.9 reads a scalar kernel argument with ``int()`` of a 1-element array, which
    NumPy 2.4 made an error: every ``range(0, K, BLOCK)`` then fails with "only 0-dimensional arrays can be
    converted to Python scalars" (seen with Triton 3.6.0 + NumPy 2.4.6; compiled kernels are not affected)."""
    import numpy
    from packaging.version import Version

    if Version(triton.__version__).release[:2] < (3, 9) and Version(numpy.__version__).release[:2] >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1: Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} "
            "(scalar arguments become 1-element arrays that NumPy >= 2.4 refuses to convert); install 'numpy<2.4' or "
            "triton>=3.9. Kernels compiled for a GPU are not affected."
        )


@dataclass(frozen=True)
class NF4Weight:
    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    blocksize2: int
    double_quant: bool
    dtype: torch.dtype
    """The dtype bitsandbytes would dequantize to (the model's compute dtype)."""
    stored: torch.Tensor | None = None
    """The packed bytes as the model holds them (its Parameter, in the storage dtype), when they came from one: the
    custom ops take and save this tensor, not the uint8 view ``packed``. ZeRO-3 frees a gathered parameter with
    ``param.data = torch.empty(0)``, which releases the bytes only when no other tensor views them; a view saved
    for backward would keep every layer's gathered weight alive until backward."""

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, state: object) -> NF4Weight:
        """From a Params4bit's data (uint8, or uint8 viewed as bf16/fp16/fp32) and its QuantState."""
        n, k = (int(s) for s in state.shape)
        data = packed.data if hasattr(packed, "data") else packed
        raw = data.reshape(-1).view(torch.uint8)
        if raw.numel() != (n * k + 1) // 2:
            raise ValueError(f"packed NF4 weight holds {raw.numel()} bytes, expected {(n * k + 1) // 2} for shape {(n, k)}")
        if n * k >= 2**31:
            raise ValueError(f"NF4 weight of shape {(n, k)} has more than 2**31 elements (int32 indexing)")
        dev = raw.device
        if state.nested:
            s2 = state.state2
            absmax2, code2, bs2 = s2.absmax.float(), s2.code.float(), int(s2.blocksize)
            offset = torch.as_tensor(state.offset, dtype=torch.float32, device=dev).reshape(1)
        else:
            absmax2 = code2 = offset = torch.zeros(1, dtype=torch.float32, device=dev)
            bs2 = 1
        return cls(
            packed=raw,
            absmax=state.absmax,
            absmax2=absmax2,
            code2=code2,
            offset=offset,
            code=state.code.float().to(dev),
            shape=(n, k),
            blocksize=int(state.blocksize),
            blocksize2=bs2,
            double_quant=bool(state.nested),
            dtype=state.dtype,
            stored=packed if isinstance(packed, torch.nn.Parameter) else None,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor arguments every NF4 kernel takes, in kernel order (see ``nf4_values``)."""
        return (self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code)

    def op_tensors(self) -> tuple[torch.Tensor, ...]:
        """``tensors()`` with the packed bytes as stored (see ``stored``): what the custom ops take."""
        return (self.packed if self.stored is None else self.stored, *self.tensors()[1:])

    def meta(self) -> dict[str, int | bool]:
        """The compile-time layout parameters every NF4 kernel takes."""
        return {"BLOCKSIZE": self.blocksize, "BLOCKSIZE2": self.blocksize2, "DOUBLE_QUANT": self.double_quant}

    def blocksize_is_pow2(self) -> bool:
        return self.blocksize & (self.blocksize - 1) == 0

    def whole_blocks_per_row(self) -> bool:
        """Rows hold whole quantization blocks (every real layer): kernels can load W as byte tiles (``nf4_tile``)."""
        return self.shape[1] % self.blocksize == 0 and self.blocksize_is_pow2()

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block (undoing double quantization), as bitsandbytes computes it."""
        if not self.double_quant:
            return self.absmax.float()
        blocks = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.blocksize2
        return self.code2[self.absmax.long()] * self.absmax2[blocks] + self.offset


if HAS_TRITON:

    @triton.jit
    def nf4_values(
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        idx,
        mask,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        """fp32 values of the weight elements at flat indices ``idx`` (any shape; int32)."""
        byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (idx & 1)) * 4)) & 0xF  # even index: high nibble
        level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = idx // BLOCKSIZE
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
                absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return level * scale

    @triton.jit
    def nf4_tile(
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        rows,
        k0,
        N,
        K,
        BK: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        """fp32 W[rows, k0:k0+BK] for weights whose rows hold whole quantization blocks (K % BLOCKSIZE == 0).

        Each packed byte is loaded once, as a [rows, BK/2] tile of contiguous bytes, and split into its two nibbles;
        the scale is resolved once per quantization block (BLOCKSIZE elements), not per element. ``k0`` is a
        multiple of BK, and BK of BLOCKSIZE or a divisor of it. Same arithmetic as ``nf4_values``: bit-exact.
        """
        HALF: tl.constexpr = BK // 2
        GROUPS: tl.constexpr = BK // BLOCKSIZE if BK >= BLOCKSIZE else 1
        WIDTH: tl.constexpr = BK // GROUPS  # elements under one scale
        row_ok = rows < N
        cols = k0 + tl.arange(0, HALF) * 2  # the even element of each byte
        byte = tl.load(
            packed_ptr + (rows[:, None] * K + cols[None, :]) // 2, mask=row_ok[:, None] & (cols[None, :] < K), other=0
        ).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))  # even element: high nibble
        lo = tl.load(code_ptr + (byte & 0xF))
        levels = tl.reshape(tl.join(hi, lo), (rows.shape[0], GROUPS, WIDTH))
        block = (rows[:, None] * K + k0 + tl.arange(0, GROUPS)[None, :] * WIDTH) // BLOCKSIZE  # [rows, GROUPS]
        ok = row_ok[:, None] & (k0 + tl.arange(0, GROUPS)[None, :] * WIDTH < K)
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
        return tl.reshape(levels * scale[:, :, None], (rows.shape[0], BK))

    @triton.jit
    def nf4_operand(
        packed_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        offs_a,
        offs_b,
        a0,
        b0,
        N,
        K,
        GRAD_INPUT: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        """fp32 [BLOCK_B, BLOCK_A] tile V[b, a] of the weight W [N, K] a matmul multiplies by: V = W^T forward
        (a over N, b over K), V = W for the input gradient (a over K, b over N). ``a0``/``b0``: the tile's first a
        and b. ALIGNED (whole quantization blocks per row): byte tiles (``nf4_tile``); else element by element."""
        nf4 = (packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr)
        if ALIGNED:
            if GRAD_INPUT:
                v = nf4_tile(*nf4, offs_b, a0, N, K, BLOCK_A, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
            else:
                v = tl.trans(nf4_tile(*nf4, offs_a, b0, N, K, BLOCK_B, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT))
        else:
            A = K if GRAD_INPUT else N
            B = N if GRAD_INPUT else K
            idx = offs_b[:, None] * K + offs_a[None, :] if GRAD_INPUT else offs_a[None, :] * K + offs_b[:, None]
            v = nf4_values(*nf4, idx, (offs_b[:, None] < B) & (offs_a[None, :] < A), BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        return v

    @triton.jit
    def dot_nf4(acc, x, v, X_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr):
        """acc + x @ v, v a dequantized fp32 tile rounded to the activation dtype as bitsandbytes' weight is; in the
        interpreter (DOT_FP32) both operands in fp32, its bf16 dot being wrong."""
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), round_like(v, X_DTYPE, RNE_BF16), input_precision="ieee")
        elif tl.float32 == X_DTYPE:
            acc += tl.dot(x, v, input_precision="ieee")
        else:
            acc += tl.dot(x, v.to(X_DTYPE))
        return acc

    @triton.jit
    def round_to_bf16_bits(x):
        """fp32 -> bf16 with round-to-nearest-even, done on the bits (the interpreter's cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def round_like(w, X_DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
        """Round fp32 ``w`` to the activation dtype and back: the values a dequantized weight in that dtype holds."""
        if tl.float32 == X_DTYPE:
            return w
        if RNE_BF16:
            return round_to_bf16_bits(w).to(tl.float32)
        return w.to(X_DTYPE).to(tl.float32)

    @triton.jit
    def cast_out(x, OUT_DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
        """Cast fp32 ``x`` to the output dtype, rounding to nearest even on every backend."""
        if RNE_BF16:
            return round_to_bf16_bits(x)
        return x.to(OUT_DTYPE)


TL_DTYPES = {}
if HAS_TRITON:
    TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
