"""The grouped NF4 kernel of MoE experts against bitsandbytes and the pure-torch reference.

Without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one, compiled on CUDA.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

from dtune.kernels.nf4 import interpreting
from dtune.kernels.nf4_grouped import (
    NF4Experts,
    group_by_expert,
    nf4_grouped_matmul,
    nf4_grouped_matmul_grad_input,
    nf4_grouped_matmul_grad_input_ref,
    nf4_grouped_matmul_ref,
    tile_schedule,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")
if DEVICE == "cuda":
    pytestmark = [pytestmark, pytest.mark.gpu]


def experts(shape, dtype=torch.float32, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype).to(DEVICE)
    return w, NF4Experts.quantize(w, double_quant=double_quant)


def routed(tokens, k, n_experts, empty=(), seed=1):
    """Top-k routing of ``tokens`` tokens (distinct experts per token), never to the experts in ``empty``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(n_experts) if e not in empty])
    picks = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    return picks.to(DEVICE)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_expert_dequantizes_bit_exact_with_bitsandbytes(double_quant, dtype):
    w, q = experts((3, 48, 128), dtype, double_quant)
    dense = q.dequantize()
    for e in range(3):  # each expert quantized by bitsandbytes on its own
        packed, state = bnbF.quantize_4bit(w[e], blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(dense[e], bnbF.dequantize_4bit(packed, state))
    per_expert = 48 * 128 // 2 + (48 * 128 // 64 + 4 + 4 if double_quant else 48 * 128 // 64 * 4 + 4 + 4)
    assert q.nbytes() == 3 * per_expert + (256 if double_quant else 1) * 4 + 16 * 4  # nibbles, scales, maps


def test_tile_schedule_covers_every_row_once():
    offsets = torch.tensor([0, 5, 5, 40, 41], dtype=torch.int32)  # an empty expert, a 35-row one, a single row
    expert, first = tile_schedule(offsets, 41, 16)
    rows = []
    for e, f in zip(expert.tolist(), first.tolist(), strict=True):
        if e < 4:
            rows += [r for r in range(f, f + 16) if offsets[e] <= r < offsets[e + 1]]
    assert sorted(rows) == list(range(41))
    assert (expert == 4).sum() >= 1  # slots past the last tile are marked as such


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 96, 128), (5, 64, 80)])  # whole blocks per row; ragged (K=80)
@pytest.mark.parametrize("double_quant", [True, False])
def test_grouped_matmul_and_input_gradient_no_worse_than_bitsandbytes(dtype, shape, double_quant):
    """Against fp32 math on the dequantized experts: the kernel's error is no worse than the reference's (what
    bitsandbytes computes: experts dequantized to the activation dtype, then a dense matmul)."""
    n_experts, n, k = shape
    _, q = experts(shape, dtype, double_quant)
    top = routed(37, 2, n_experts, empty=(2,))
    _, offsets = group_by_expert(top, n_experts)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(74, k, generator=g).to(dtype).to(DEVICE)
    grad_y = torch.randn(74, n, generator=g).to(dtype).to(DEVICE)
    exact = nf4_grouped_matmul_ref(x.float(), q, offsets)
    exact_grad = nf4_grouped_matmul_grad_input_ref(grad_y.float(), q, offsets)
    for ours, ref, truth in (
        (nf4_grouped_matmul(x, q, offsets), nf4_grouped_matmul_ref(x, q, offsets), exact),
        (nf4_grouped_matmul_grad_input(grad_y, q, offsets), nf4_grouped_matmul_grad_input_ref(grad_y, q, offsets), exact_grad),
    ):
        assert ours.dtype == dtype
        err, ref_err = (ours.float() - truth).abs().max().item(), (ref.float() - truth).abs().max().item()
        assert err <= max(1.5 * ref_err, 1e-5), (err, ref_err)


def test_rows_routed_to_no_expert_come_out_zero():
    """Slots routed to index E (masked by expert parallelism) belong to no group: zero rows, not stale memory."""
    _, q = experts((4, 64, 64))
    top = routed(10, 2, 4)
    top[3, 1] = 4
    order, offsets = group_by_expert(top, 4)
    assert int(offsets[-1]) == 19
    x = torch.randn(20, 64, device=DEVICE)
    y = nf4_grouped_matmul(x, q, offsets)
    assert torch.equal(y[19:], torch.zeros_like(y[19:]))
    assert int(order[-1]) == 3 * 2 + 1


def test_wrong_shapes_are_refused():
    _, q = experts((4, 64, 64))
    offsets = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="expected rows"):
        nf4_grouped_matmul(torch.randn(3, 32, device=DEVICE), q, offsets)
    with pytest.raises(ValueError, match="offsets must be"):
        nf4_grouped_matmul(torch.randn(3, 64, device=DEVICE), q, offsets[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,out", [(64, 16), (64, 3), (20, 32)])  # grouped GEMM; rows or outputs of odd bytes
def test_grouped_dense_equals_a_matmul_per_expert_with_gradients(dtype, width, out):
    """The MoE adapters' grouped matmul (torch._grouped_mm where its layout rules hold, else the loop) gives each
    expert's rows times that expert's matrix, and the gradients of both, an empty expert included; a gradient of
    stride 0 (from ``y.sum()``) is taken too."""
    from dtune.kernels.grouped_dense import ExpertRows, grouped_dense, grouped_dense_loop, grouped_mm_fits

    g = torch.Generator().manual_seed(0)
    n_experts, k = 5, 2
    _, offsets = group_by_expert(routed(23, k, n_experts, empty=(3,)), n_experts)
    x = torch.randn(23 * k, width, generator=g).to(DEVICE, dtype)
    weight = torch.randn(n_experts, out, width, generator=g).to(DEVICE, dtype)
    grad = torch.randn(23 * k, out, generator=g).to(DEVICE, dtype)
    aligned = width * x.element_size() % 16 == 0 and out * x.element_size() % 16 == 0
    if DEVICE == "cpu" and hasattr(torch, "_grouped_mm") and dtype == torch.float32:
        assert grouped_mm_fits(x, weight) == aligned  # the grouped GEMM really runs here when the layout allows

    def run(fn, reduce_by_sum=False):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = fn(xi, wi, ExpertRows(offsets))
        (y.sum() if reduce_by_sum else y).backward(None if reduce_by_sum else grad)
        return y.detach().double(), xi.grad.double(), wi.grad.double()

    bounds = offsets.tolist()
    y_ref = torch.cat([x[bounds[e] : bounds[e + 1]].double() @ weight[e].double().t() for e in range(n_experts)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    ours, loop = run(grouped_dense), run(grouped_dense_loop)
    torch.testing.assert_close(ours[0], y_ref, **tol)
    for a, b in zip(ours, loop, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert ours[2][3].abs().max() == 0  # the empty expert's matrix gets no gradient
    for a, b in zip(run(grouped_dense, reduce_by_sum=True), run(grouped_dense_loop, reduce_by_sum=True), strict=True):
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises((RuntimeError, ValueError)):  # a row no expert owns: refused, never left unwritten
        grouped_dense(torch.cat([x, x[:1]]), weight, ExpertRows(offsets))
    with pytest.raises(ValueError, match="offsets"):
        grouped_dense_loop(torch.cat([x, x[:1]]), weight, ExpertRows(offsets))
