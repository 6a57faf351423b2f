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
