"""dtune's NF4 Triton kernels against bitsandbytes and fp32 references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); with
one they run compiled on CUDA and the same checks apply (the device is picked once, below).
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch

from dtune.kernels import (
    NF4Weight,
    nf4_dequantize,
    nf4_dequantize_ref,
    nf4_gemv,
    nf4_linear,
    nf4_matmul,
    nf4_matmul_grad_input,
    nf4_matmul_ref,
)
from dtune.kernels.nf4 import interpreting, use_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")
if DEVICE == "cuda":
    pytestmark = [pytestmark, pytest.mark.gpu]

# Shapes where bitsandbytes 0.50.2's own CPU dequantize is right. Its native CPU kernel is wrong when 64-value
# blocks straddle rows for some row lengths (e.g. K=80, K=48; see test_ragged_rows_match_bitsandbytes_algorithm);
# there the reference is bitsandbytes' generic algorithm.
BNB_SAFE = [(64, 64), (128, 192), (33, 65), (7, 3), (96, 256), (1, 4096)]
RAGGED = [(96, 80), (5, 48), (37, 150), (150, 200)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantize(shape, dtype=torch.float32, double_quant=True, storage=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype).to(DEVICE)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4", quant_storage=storage)
    return w, packed, state


@pytest.mark.parametrize("shape", BNB_SAFE)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bit_exact_with_bitsandbytes(shape, double_quant, storage, dtype):
    if storage != torch.uint8 and (shape[0] * shape[1] + 1) // 2 % 2:
        pytest.skip("an odd number of packed bytes cannot be viewed as bf16 (bitsandbytes refuses it too)")
    _, packed, state = quantize(shape, dtype, double_quant, storage)
    expected = bnbF.dequantize_4bit(packed, state)
    w = NF4Weight.from_bnb(packed, state)
    ours = nf4_dequantize(w)
    assert ours.dtype == expected.dtype == dtype
    assert torch.equal(ours, expected)
    assert torch.equal(nf4_dequantize_ref(w), expected)


@pytest.mark.parametrize("shape", RAGGED)
@pytest.mark.parametrize("double_quant", [True, False])
def test_ragged_rows_match_bitsandbytes_algorithm(shape, double_quant):
    """Where blocks straddle rows: bit-exact with bitsandbytes' generic implementation (and CUDA kernel on GPU)."""
    _, packed, state = quantize(shape, torch.bfloat16, double_quant)
    w = NF4Weight.from_bnb(packed, state)
    if DEVICE == "cuda":
        expected = bnbF.dequantize_4bit(packed, state)
    else:
        generic = pytest.importorskip("bitsandbytes.backends.default.ops")._dequantize_4bit_compute
        expected = generic(packed.reshape(-1), w.scales(), state.code, 64, state.shape, state.dtype)
    assert torch.equal(nf4_dequantize(w), expected)
    assert torch.equal(nf4_dequantize_ref(w), expected)


def _errors(x, w_fp32, bias, ours, bnb_path):
    ref = torch.nn.functional.linear(x.double(), w_fp32.double(), None if bias is None else bias.double())
    return (ours.double() - ref).abs().max().item(), (bnb_path.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(150, 200), (96, 80), (64, 64), (33, 65)])
@pytest.mark.parametrize("lead", [(37,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matmul_forward_no_worse_than_bitsandbytes(dtype, shape, lead, with_bias):
    """err(ours - exact) <= err(dequantize + matmul in the activation dtype - exact), with exact = the
    quantized weight's fp64 product."""
    n, k = shape
    _, packed, state = quantize(shape, dtype)
    w = NF4Weight.from_bnb(packed, state)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if with_bias else None
    ours = nf4_matmul(x, w, bias)
    assert ours.shape == (*lead, n) and ours.dtype == dtype
    exact_w = nf4_dequantize_ref(w, torch.float32)
    err_ours, err_bnb = _errors(x, exact_w, bias, ours, nf4_matmul_ref(x, w, bias))
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    assert err_ours <= 1.25 * err_bnb + tolerance, (err_ours, err_bnb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(150, 200), (96, 80)])
def test_fused_input_gradient_no_worse_than_bitsandbytes(dtype, shape):
    n = shape[0]
    _, packed, state = quantize(shape, dtype)
    w = NF4Weight.from_bnb(packed, state)
    grad_y = torch.randn(3, 21, n, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    ours = nf4_matmul_grad_input(grad_y, w)
    exact = grad_y.double() @ nf4_dequantize_ref(w, torch.float64)
    theirs = grad_y @ nf4_dequantize_ref(w, dtype)
    err_ours, err_bnb = (ours.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    assert err_ours <= 1.25 * err_bnb + tolerance, (err_ours, err_bnb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,shape", [(1, (150, 200)), (16, (96, 80)), (5, (64, 300)), (3, (1000, 64))])
def test_decode_gemv_no_worse_than_bitsandbytes(dtype, rows, shape):
    n, k = shape
    _, packed, state = quantize(shape, dtype)
    w = NF4Weight.from_bnb(packed, state)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    ours = nf4_gemv(x, w, bias)
    assert ours.shape == (rows, n) and ours.dtype == dtype
    err_ours, err_bnb = _errors(x, nf4_dequantize_ref(w, torch.float32), bias, ours, nf4_matmul_ref(x, w, bias))
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    assert err_ours <= 1.25 * err_bnb + tolerance, (err_ours, err_bnb)
    with pytest.raises(ValueError, match="at most 16"):
        nf4_gemv(torch.zeros(17, k, dtype=dtype, device=DEVICE), w)


def test_custom_op_autograd_matches_reference_and_passes_opcheck():
    n, k = 150, 200
    _, packed, state = quantize((n, k))
    w = NF4Weight.from_bnb(packed, state)
    x = torch.randn(2, 9, k, device=DEVICE, requires_grad=True)
    bias = torch.randn(n, device=DEVICE, requires_grad=True)
    y = nf4_linear(x, w, bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    nf4_matmul_ref(x_ref, w, b_ref).backward(grad)
    torch.testing.assert_close(y, nf4_matmul_ref(x_ref, w, b_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    args = (x.detach(), w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, bias.detach(), n, k, 64, w.blocksize2, True)
    torch.library.opcheck(torch.ops.dtune.nf4_linear.default, args)


def test_torch_compile_sees_one_op():
    n, k = 64, 64
    _, packed, state = quantize((n, k))
    w = NF4Weight.from_bnb(packed, state)
    x = torch.randn(4, k, device=DEVICE)
    compiled = torch.compile(lambda t: nf4_linear(t, w) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), nf4_linear(x, w) * 2)


def test_kernels_really_run_here():
    """Guard against silently testing the reference against itself."""
    assert use_triton(torch.zeros(1, device=DEVICE))


def test_training_through_fused_kernels_equals_bitsandbytes(tmp_path: Path):
    """Three QLoRA steps with quant.kernel=triton give the losses of quant.kernel=bnb."""
    import json

    from dtune.train import run
    from tests.conftest import compose_config, tiny_overrides

    losses = {}
    for kernel in ("bnb", "triton"):
        out = tmp_path / kernel
        cfg = compose_config(
            tiny_overrides(
                out,
                f"quant.kernel={kernel}",
                "optim.lr=1e-2",
                "data.train_size=8",
                "data.max_seq_len=96",
                "train.micro_batch_size=2",
            )
        )
        run(cfg, out)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[kernel] = [r["train/loss"] for r in records if "train/loss" in r] + [records[-1]["eval/loss"]]
    assert losses["triton"] == pytest.approx(losses["bnb"], abs=1e-4)
    assert losses["bnb"][0] - losses["bnb"][2] > 0.05  # the steps really trained


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU run the real benchmark instead")
def test_benchmark_harness_runs_end_to_end(tmp_path: Path):
    """The GPU benchmark's --smoke mode: same code path on tiny shapes, JSON with every figure it promises."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "kernels" / "bench_nf4.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"torch", "triton", "bitsandbytes", "device"} <= set(result["versions"])
    passes = {(r["in"], r["out"], r["tokens"], r["pass"]) for r in result["linear"]}
    assert len(passes) == 2 * 3 * 2  # shapes x tokens x (forward, grad_x)
    assert all(set(r["ms"]) == {"ours", "bnb", "bf16"} and r["rel_err"] < 2e-2 for r in result["linear"])
    assert result["copy_GBps"] > 0 and result["dequant"][0]["GBps"]["ours"] > 0
    assert "ours/bf16" in proc.stdout
