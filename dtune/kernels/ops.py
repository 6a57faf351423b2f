"""The NF4 kernels as ``torch.library`` custom ops, with fake (meta) implementations and autograd.

``dtune::nf4_linear`` is one opaque op to torch.compile and to sharding engines (ZeRO-3, FSDP gather the packed
weight before the module's forward, as for any parameter). Its backward is another op,
``dtune::nf4_linear_grad_input``, plus the bias gradient when the bias trains. The base weight never gets a
gradient: it is frozen.

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
    return NF4Weight(packed, absmax, absmax2, code2, offset, code, (n, k), blocksize, blocksize2, double_quant, dtype)


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
) -> torch.Tensor:
    w = _weight(packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant, grad_y.dtype)
    return nf4_matmul_grad_input(grad_y, w)


@nf4_linear_grad_input_op.register_fake
def _(grad_y, packed, absmax, absmax2, code2, offset, code, n, k, blocksize, blocksize2, double_quant):
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


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] = x @ dequant(W).T + bias, differentiable in x (and bias)."""
    n, k = w.shape
    return nf4_linear_op(x, *w.tensors(), bias, n, k, w.blocksize, w.blocksize2, w.double_quant)
