"""dtune's NF4 kernels (Triton), each beside a pure-torch reference with the same signature.

- ``nf4_dequantize`` / ``nf4_dequantize_ref``: packed NF4 (bitsandbytes layout) -> dense weight, bit-exact.
- ``nf4_matmul`` / ``nf4_matmul_ref``: fused y = x @ dequant(W).T + bias.
- ``nf4_matmul_grad_input`` / ``nf4_matmul_grad_input_ref``: fused grad_x = grad_y @ dequant(W).
- ``nf4_gemv`` / ``nf4_gemv_ref``: the decode path (<= 16 rows), split-K for memory bandwidth.
- ``nf4_linear``: the differentiable custom op (``dtune::nf4_linear``) the 4-bit layers call.
- ``nf4_lora_linear``: the same with the layer's LoRA adapter fused in (``dtune::nf4_lora_linear``).
- ``nf4_grouped`` (module): MoE experts in NF4, one grouped matmul over token rows sorted by expert.
- ``grouped_dense`` (module): the MoE adapters' dense grouped matmul (``torch._grouped_mm``, else a loop).

``nf4_matmul`` and ``nf4_matmul_grad_input`` take an optional low-rank term added in the kernel's epilogue: that is
how the LoRA path is fused with the base (see ``nf4_lora_linear``).

The benchmark harness and recorded GPU results live in the repository's top-level ``kernels/`` folder.
"""

from dtune.kernels.nf4 import NF4Weight
from dtune.kernels.nf4_dequantize import nf4_dequantize, nf4_dequantize_ref
from dtune.kernels.nf4_gemv import nf4_gemv, nf4_gemv_ref
from dtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_grad_input, nf4_matmul_grad_input_ref, nf4_matmul_ref
from dtune.kernels.ops import nf4_linear, nf4_lora_linear

__all__ = [
    "NF4Weight",
    "nf4_dequantize",
    "nf4_dequantize_ref",
    "nf4_gemv",
    "nf4_gemv_ref",
    "nf4_linear",
    "nf4_lora_linear",
    "nf4_matmul",
    "nf4_matmul_grad_input",
    "nf4_matmul_grad_input_ref",
    "nf4_matmul_ref",
]
