"""The NF4 kernels as ``torch.library`` custom ops, with fake (meta) implementations and autograd.

``dtune::nf4_linear`` is one opaque op to torch.compile and to sharding engines (ZeRO-3, FSDP gather the packed
weight before the module's forward, as for any parameter). Its backward is another op,
``dtune::nf4_linear_grad_input``, plus the bias gradient when the bias trains. The base weight never gets a
gradient: it is frozen.

``dtune::nf4_lora_linear`` is the same layer with its LoRA adapter fused in: y = x W^T + b + s (x A^T) B^T, the
low-rank term added in the matmul's epilogue, and in backward grad_x = grad_y W + s (grad_y B) A likewise; the
adapter's gradients (grad_A = s (grad_y B)^T x, grad_B = s grad_y^T (x A^T)) are small dense matmuls.

Inputs of at most 16 rows (decoding) take the split-K GEMV kernel, larger ones the tiled matmul. Dispatch to
hardware happens inside the ops: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernels,
other CPU tensors the pure-torch references.
"""

from __future__ import annotations

import torch

from dtune.kernels.nf4 import NF4Weight
from dtune.kernels.nf4_gemv import MAX_DECODE_TOKENS, nf4_gemv
from dtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_grad_input


def _weight(packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant, dtype) -> NF4Weight:
    """The ops take the packed bytes as the model stores them (any dtype and shape) and view them as uint8 here. A
    weight of another size (a sharded one that was not gathered for this forward or backward) is a ValueError."""
    raw = packed.reshape(-1).view(torch.uint8)
    if raw.numel() != (n * k + 1) // 2:
        raise ValueError(
            f"NF4 weight [{n}, {k}] holds {raw.numel()} packed bytes, expected {(n * k + 1) // 2}: a sharded weight "
            "not gathered for this op?"
        )
    return NF4Weight(raw, absmax, absmax2, code2, offset, code, (n, k), blocksize, blocksize2, double_quant, dtype)


@torch.library.custom_op("dtune::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    blocksize2: int,
    double_quant: bool,
) -> torch.Tensor:
    w = _weight(packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant, x.dtype)
    if x.numel() // k <= MAX_DECODE_TOKENS:  # decode: bandwidth-bound, split-K GEMV
        return nf4_gemv(x, w, bias)
    return nf4_matmul(x, w, bias)


@nf4_linear_op.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, bias, n, k, blocksize, blocksize2, double_quant):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("dtune::nf4_linear_grad_input", mutates_args=())
def nf4_linear_grad_input_op(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    n: int,
    k: int,
    blocksize: int,
    blocksize2: int,
    double_quant: bool,
    low_rank_in: torch.Tensor | None = None,
    low_rank_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad_y @ dequant(W) (+ low_rank_in @ low_rank_w, fused in the epilogue)."""
    w = _weight(packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant, grad_y.dtype)
    low_rank = None if low_rank_in is None else (low_rank_in, low_rank_w)
    return nf4_matmul_grad_input(grad_y, w, low_rank)


@nf4_linear_grad_input_op.register_fake
def _(
    grad_y,
    packed,
    absmax,
    absmax2,
    code2,
    offset,
    code,
    n,
    k,
    blocksize,
    blocksize2,
    double_quant,
    low_rank_in=None,
    low_rank_w=None,
):
    return grad_y.new_empty((*grad_y.shape[:-1], k))


def _setup_context(ctx, inputs, output) -> None:
    packed, absmax, absmax2, code2, offset, code = inputs[1:7]
    ctx.save_for_backward(packed, absmax, absmax2, code2, offset, code)
    ctx.meta = tuple(inputs[8:])  # n, k, blocksize, blocksize2, double_quant


def _backward(ctx, grad_y):
    n = ctx.meta[0]
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_linear_grad_input_op(grad_y, *ctx.saved_tensors, *ctx.meta)
    if ctx.needs_input_grad[7]:
        grad_bias = grad_y.reshape(-1, n).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None, None


nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dtune::nf4_lora_linear", mutates_args=())
def nf4_lora_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor,
    code2: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    n: int,
    k: int,
    blocksize: int,
    blocksize2: int,
    double_quant: bool,
) -> torch.Tensor:
    w = _weight(packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant, x.dtype)
    u = (x @ lora_a.t()) * scale  # [..., r]: the adapter's input projection, scaled
    if x.numel() // k <= MAX_DECODE_TOKENS:  # decode: the GEMV, then the (tiny) low-rank term
        return nf4_gemv(x, w, bias) + u @ lora_b.t()
    return nf4_matmul(x, w, bias, low_rank=(u, lora_b.t()))


@nf4_lora_linear_op.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, bias, lora_a, lora_b, scale, n, k, blocksize, blocksize2, double_quant):
    return x.new_empty((*x.shape[:-1], n))


def _lora_setup_context(ctx, inputs, output) -> None:
    x, packed, absmax, absmax2, code2, offset, code, _bias, lora_a, lora_b, scale = inputs[:11]
    ctx.save_for_backward(x, lora_a, lora_b, packed, absmax, absmax2, code2, offset, code)
    ctx.scale = scale
    ctx.meta = tuple(inputs[11:])  # n, k, blocksize, blocksize2, double_quant


def _lora_backward(ctx, grad_y):
    x, lora_a, lora_b, *nf4 = ctx.saved_tensors
    n, k = ctx.meta[:2]
    g, x2 = grad_y.reshape(-1, n), x.reshape(-1, k)
    v = (g @ lora_b) * ctx.scale  # [rows, r]
    grad_x = grad_bias = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_linear_grad_input_op(grad_y, *nf4, *ctx.meta, v.reshape(*grad_y.shape[:-1], -1), lora_a)
    if ctx.needs_input_grad[7]:
        grad_bias = g.sum(0)
    if ctx.needs_input_grad[8]:
        grad_a = v.t() @ x2
    if ctx.needs_input_grad[9]:
        grad_b = g.t() @ ((x2 @ lora_a.t()) * ctx.scale)  # recomputed: [rows, r] is cheap
    return (grad_x, None, None, None, None, None, None, grad_bias, grad_a, grad_b) + (None,) * 6


nf4_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup_context)


def nf4_lora_linear(
    x: torch.Tensor,
    w: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., K] -> [..., N] = x @ dequant(W).T + bias + scale * (x @ lora_a.T) @ lora_b.T, differentiable in x,
    lora_a [r, K], lora_b [N, r] (and bias). All of x, lora_a, lora_b in one dtype (the compute dtype)."""
    n, k = w.shape
    r = lora_a.shape[0]
    if lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(
            f"nf4_lora_linear: adapter shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit W {w.shape}"
        )
    if not (x.dtype == lora_a.dtype == lora_b.dtype):
        raise ValueError(f"nf4_lora_linear: x, lora_a, lora_b must share a dtype (got {x.dtype}, {lora_a.dtype}, {lora_b.dtype})")
    return nf4_lora_linear_op(
        x, *w.op_tensors(), bias, lora_a, lora_b, float(scale), n, k, w.blocksize, w.blocksize2, w.double_quant
    )


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] = x @ dequant(W).T + bias, differentiable in x (and bias)."""
    n, k = w.shape
    return nf4_linear_op(x, *w.op_tensors(), bias, n, k, w.blocksize, w.blocksize2, w.double_quant)
