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
    nf4_lora_linear,
    nf4_matmul,
    nf4_matmul_grad_input,
    nf4_matmul_grad_input_ref,
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
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bit_exact_with_bitsandbytes(shape, double_quant, storage, dtype):
    if storage != torch.uint8 and (shape[0] * shape[1] + 1) // 2 % 2:
        pytest.skip("an odd number of packed bytes cannot be viewed as a 16-bit dtype (bitsandbytes refuses it too)")
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


if use_triton(torch.zeros(1, device=DEVICE)):
    import triton
    import triton.language as tl

    from dtune.kernels.nf4 import nf4_tile, nf4_values

    @triton.jit
    def _tile_probe(packed, absmax, absmax2, code2, offset, code, out_tile, out_elem, N, K, ROWS: tl.constexpr,
                    BK: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):  # fmt: skip
        """W[rows, k0:k0+BK] through nf4_tile and through nf4_values, side by side."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        k0 = tl.program_id(1) * BK
        cols = k0 + tl.arange(0, BK)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        idx = rows[:, None] * K + cols[None, :]
        nf4 = (packed, absmax, absmax2, code2, offset, code)
        tile = nf4_tile(*nf4, rows, k0, N, K, BK, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        tl.store(out_tile + idx, tile, mask=mask)
        tl.store(out_elem + idx, nf4_values(*nf4, idx, mask, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT), mask=mask)


@pytest.mark.parametrize("bk", [16, 64, 256])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nf4_tile_equals_element_loads_for_every_tile_width(bk, blocksize):
    """nf4_tile for tiles narrower than, as wide as and wider than a block (1-8 blocks per tile), with K = 7 blocks
    so the last tile of a row is partial, and ragged rows: the same values as element-by-element loads."""
    n, k = 37, 7 * blocksize
    g = torch.Generator().manual_seed(6)
    dense = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE)
    packed, state = bnbF.quantize_4bit(dense, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    w = NF4Weight.from_bnb(packed, state)
    tile, elem = (torch.full((n, k), float("nan"), device=DEVICE) for _ in range(2))
    grid = (triton.cdiv(n, 16), triton.cdiv(k, bk))
    _tile_probe[grid](*w.tensors(), tile, elem, n, k, ROWS=16, BK=bk, **w.meta(), enable_fp_fusion=False)
    assert torch.equal(tile, elem)
    assert torch.equal(tile, nf4_dequantize_ref(w, torch.float32))


@pytest.mark.parametrize("blocksize", [32, 64, 128])  # tiles wider than, equal to and narrower than a block
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_tile_path_equals_element_path(blocksize, double_quant, dtype):
    """Rows of whole quantization blocks (K % blocksize == 0, every real model) take the byte-tile path: one load
    per packed byte, one scale per block. Dequantize is bit-exact; forward and input gradient equal the reference
    (same dequantized values, fp32 accumulation), with rows (N) and tokens ragged."""
    n, k = 150, 256
    g = torch.Generator().manual_seed(5)
    w_dense = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    packed, state = bnbF.quantize_4bit(w_dense, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    w = NF4Weight.from_bnb(packed, state)
    x = torch.randn(37, k, generator=g).to(dtype).to(DEVICE)
    grad_y = torch.randn(37, n, generator=g).to(dtype).to(DEVICE)
    assert torch.equal(nf4_dequantize(w, dtype), nf4_dequantize_ref(w, dtype))  # the flat kernel's block path
    exact = nf4_dequantize_ref(w, dtype).double()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(nf4_matmul(x, w).double(), x.double() @ exact.t(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(nf4_matmul_grad_input(grad_y, w).double(), grad_y.double() @ exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_input", [False, True])
@pytest.mark.parametrize("r", [8, 20])
def test_low_rank_epilogue_no_worse_than_a_separate_add(dtype, grad_input, r):
    """The LoRA term added in the kernel's epilogue: y = in @ V + u @ L, against fp64, no worse than the unfused
    path (matmul in the activation dtype, then u @ L and an add in that dtype: what PEFT does)."""
    n, k = 150, 200
    _, packed, state = quantize((n, k), dtype)
    w = NF4Weight.from_bnb(packed, state)
    g = torch.Generator().manual_seed(3)
    width, out_width = (n, k) if grad_input else (k, n)
    inp = torch.randn(2, 19, width, generator=g).to(dtype).to(DEVICE)
    u = (torch.randn(2, 19, r, generator=g) * 0.3).to(dtype).to(DEVICE)
    low = (torch.randn(out_width, r, generator=g) * 0.1).to(dtype).to(DEVICE).t()  # a transposed view, as B^T is
    fused, unfused = (nf4_matmul_grad_input, nf4_matmul_grad_input_ref) if grad_input else (nf4_matmul, nf4_matmul_ref)
    ours = fused(inp, w, low_rank=(u, low))
    assert ours.shape == (2, 19, out_width) and ours.dtype == dtype
    w64 = nf4_dequantize_ref(w, torch.float64)
    exact = (inp.double() @ (w64 if grad_input else w64.t())) + u.double() @ low.double()
    theirs = unfused(inp, w, low_rank=(u, low))
    err_ours, err_theirs = (ours.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 0.0
    assert err_ours <= 1.25 * err_theirs + tolerance, (err_ours, err_theirs)
    with pytest.raises(ValueError, match="low-rank term"):
        fused(inp, w, low_rank=(u, low[:-1]))


@pytest.mark.parametrize("lead", [(37,), (2, 3)])  # tiled matmul, and the decode GEMV (<= 16 rows)
def test_lora_op_autograd_matches_reference_and_passes_opcheck(lead):
    """dtune::nf4_lora_linear: y = x W^T + b + s (x A^T) B^T with gradients for x, A, B and b."""
    n, k, r, scale = 150, 200, 8, 2.0
    _, packed, state = quantize((n, k))
    w = NF4Weight.from_bnb(packed, state)
    g = torch.Generator().manual_seed(4)
    x, a, b, bias = (torch.randn(*s, generator=g).to(DEVICE) for s in ((*lead, k), (r, k), (n, r), (n,)))
    a, b = a * 0.1, b * 0.1
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], scale, leaves[3])
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(grad)
    refs = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    xr, ar, br, biasr = refs
    y_ref = nf4_matmul_ref(xr, w, biasr) + scale * (xr @ ar.t()) @ br.t()
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
    args = (x, *w.tensors(), bias, a, b, scale, n, k, 64, w.blocksize2, True)
    torch.library.opcheck(torch.ops.dtune.nf4_lora_linear.default, args)
    with pytest.raises(ValueError, match="adapter shapes"):
        nf4_lora_linear(x, w, b, a, scale)


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
    """Dynamo traces the NF4 matmul as one opaque custom op (no graph break, no decomposition into its parts), and
    the compiled function computes what eager does."""
    n, k = 64, 64
    _, packed, state = quantize((n, k))
    w = NF4Weight.from_bnb(packed, state)
    x = torch.randn(4, k, device=DEVICE)
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: nf4_linear(t, w) * 2, backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(x), nf4_linear(x, w) * 2)
    (graph,) = graphs
    ops = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    dtune_ops = [op for op in ops if "dtune" in str(op)]
    assert [str(op) for op in dtune_ops] == ["dtune.nf4_linear.default"], ops


def test_kernels_really_run_here():
    """Guard against silently testing the reference against itself."""
    assert use_triton(torch.zeros(1, device=DEVICE))


def test_fused_lora_layer_equals_peft_and_falls_back_where_it_must(tmp_path: Path):
    """A FusedLoraLinear4bit gives PEFT's own output and gradients; disabled adapters and dropout take PEFT's path."""
    from dtune.model import build_model
    from dtune.quant import FusedLoraLinear4bit, _peft_lora4bit_class
    from tests.helpers import compose_config, tiny_overrides

    cfg = compose_config(tiny_overrides(tmp_path, "quant=nf4_triton", "quant.fuse_lora=true"))
    model = build_model(cfg, torch.device(DEVICE))
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers  # every projection of every decoder layer
    layer = layers[0]
    from deepspeed.utils import z3_leaf_module

    assert z3_leaf_module(layer)  # ZeRO-3 gathers the adapter with the layer, not tensor by tensor on access
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # B starts at zero: make the adapter count
    x = torch.randn(2, 21, layer.in_features, device=DEVICE)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def out_and_grads(forward):
        xi = x.clone().requires_grad_()
        y = forward(xi)
        a.grad = b.grad = None
        y.backward(torch.ones_like(y))
        return y.detach(), xi.grad, a.grad.clone(), b.grad.clone()

    fused = out_and_grads(layer)
    peft = out_and_grads(lambda t: _peft_lora4bit_class().forward(layer, t))
    for ours, theirs in zip(fused, peft, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert fused[0].sub(layer.base_layer(x)).abs().max() > 1e-3  # the adapter term is really in there
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))

    # bf16 compute, fp32 adapters: under autocast the fused op runs (PEFT's adapter matmuls are bf16 there too);
    # without autocast PEFT computes the adapter in fp32, and so the fused layer hands over to it.
    layer.base_layer.compute_dtype = torch.bfloat16
    assert layer._fusable_adapter(x, (), {}) is None
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert layer._fusable_adapter(x, (), {}) == "default"
        ours, theirs = layer(x), _peft_lora4bit_class().forward(layer, x)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)

    layer.lora_dropout["default"] = torch.nn.Dropout(0.5)
    assert layer._fusable_adapter(x, (), {}) is None
    from dtune.quant import fuse_lora_layers

    dropout = compose_config(tiny_overrides(tmp_path, "quant=nf4_triton", "lora.dropout=0.1"))
    assert fuse_lora_layers(build_model(dropout, torch.device(DEVICE))) == 0  # plain LoRA only: nothing switched


@pytest.mark.parametrize("fuse_lora", [False, True])
def test_backward_reads_the_weight_zero3_gathers_again_instead_of_keeping_the_forward_one(tmp_path: Path, fuse_lora):
    """ZeRO-3 frees a gathered parameter after the module's forward with ``param.data = torch.empty(0)`` and gathers
    it again before its backward. The fused ops must save the Parameter itself: a view of its bytes saved for
    backward would keep every layer's gathered 4-bit weight alive from forward to backward (ZeRO-3's sharding of the
    base lost whenever activations are not recomputed)."""
    from dtune.model import build_model
    from dtune.quant import FusedLinear4bit, FusedLoraLinear4bit
    from tests.helpers import compose_config, tiny_overrides

    cfg = compose_config(tiny_overrides(tmp_path, "quant=nf4_triton", f"quant.fuse_lora={str(fuse_lora).lower()}"))
    model = build_model(cfg, torch.device(DEVICE))
    kind = FusedLoraLinear4bit if fuse_lora else FusedLinear4bit
    layer = next(m for m in model.modules() if isinstance(m, kind))
    weight = (layer.base_layer if fuse_lora else layer).weight
    x = torch.randn(2, 21, layer.in_features, device=DEVICE, requires_grad=True)
    y = layer(x)
    node = y.grad_fn
    while "dtune" not in type(node).__name__:  # past the output's dtype cast
        node = node.next_functions[0][0]
    gathered = weight.data
    weight.data = torch.empty(0, dtype=gathered.dtype, device=gathered.device)  # what ZeRO-3 does after forward
    held = [t for t in node.saved_tensors if t.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr()]
    assert not held, "a tensor saved for backward still holds the freed weight's bytes"
    # Gathered again before backward, into new memory: backward must read these bytes (here other ones than forward
    # saw, so that a copy kept from forward would show), as a fresh forward and backward through them do.
    weight.data = gathered.flip(0).contiguous()
    got = torch.autograd.grad(y.sum(), x)[0]
    expected = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    weight.data = gathered
    assert not torch.equal(got, torch.autograd.grad(layer(x).sum(), x)[0])  # the flipped bytes do change it


FUSED = {"bnb": [], "triton": ["quant.kernel=triton"], "triton_lora": ["quant.kernel=triton", "quant.fuse_lora=true"]}


def _fused_losses(out: Path, kernel: str) -> list[float]:
    """The train losses of three QLoRA steps through ``kernel`` (FUSED), then the eval loss."""
    import json

    from dtune.train import run
    from tests.helpers import compose_config, tiny_overrides

    overrides = ["optim.lr=1e-2", "data.train_size=8", "data.max_seq_len=96", "train.micro_batch_size=2"]
    overrides += ["data.eval_size=2"]  # the interpreter's time goes to every row: 2 held-out rows, not 8
    run(compose_config(tiny_overrides(out, *FUSED[kernel], *overrides)), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r] + [records[-1]["eval/loss"]]


@pytest.fixture(scope="module")
def bnb_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The same steps through bitsandbytes' own path, run once for both fused variants."""
    return _fused_losses(tmp_path_factory.mktemp("bnb"), "bnb")


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["triton", "triton_lora"])
def test_training_through_fused_kernels_equals_bitsandbytes(bnb_losses, tmp_path: Path, variant: str, monkeypatch):
    """Three QLoRA steps with quant.kernel=triton (and with the LoRA path fused too) give bitsandbytes' losses."""
    import dtune.quant

    calls = {"nf4_linear": 0, "nf4_lora_linear": 0}
    for name in calls:
        op = getattr(dtune.quant, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(dtune.quant, name, counted)
    assert _fused_losses(tmp_path / variant, variant) == pytest.approx(bnb_losses, abs=1e-4)
    assert calls["nf4_lora_linear" if variant == "triton_lora" else "nf4_linear"] > 0  # the fused path really ran
    assert calls["nf4_lora_linear"] == 0 or calls["nf4_linear"] == 0  # fused: no projection takes the plain path
    assert bnb_losses[0] - bnb_losses[2] > 0.05  # the steps really trained


@pytest.mark.integration
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU run the real benchmark instead")
def test_benchmark_harness_runs_end_to_end(tmp_path: Path):
    """The GPU benchmark's --smoke mode: same code path on tiny shapes, JSON with every figure it promises."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

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
    assert {r["pass"] for r in result["lora"]} == {"forward", "train"}
    assert all(set(r["ms"]) == {"fused", "unfused", "bnb"} and max(r["rel_err"].values()) < 2e-2 for r in result["lora"])
    assert result["copy_GBps"] > 0 and result["dequant"][0]["GBps"]["ours"] > 0
    assert "ours/bf16" in proc.stdout


@pytest.mark.integration
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels compile and run for real above")
def test_kernels_compile_for_hopper_without_spills(tmp_path: Path):
    """The interpreter accepts code the GPU compiler rejects: compile the training, LoRA, decode, dequantize and
    grouped (MoE) kernels with Triton's CUDA backend for sm_90 (no GPU needed) and require no spills and a launchable config."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "compile.json"
    cmd = [sys.executable, str(REPO / "kernels" / "compile_nf4.py"), "--arch", "90", "--first", "--out", str(out)]
    proc = subprocess.run([*cmd, "--only", "bf16"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    kinds = {r["kernel"] for r in result["compiled"]}
    assert {"nf4_dequantize bf16", "nf4_matmul bf16", "nf4_matmul_grad_input bf16 +LoRA r16", "nf4_gemv bf16 rows<=1"} <= kinds
    assert {"nf4_grouped bf16 BLOCK_M 16", "nf4_grouped_grad_input bf16 BLOCK_M 128"} <= kinds  # MoE experts
    assert not result["failures"]
    assert all(r["launches"] and r["spill_bytes"] == 0 and r["registers"] > 0 for r in result["compiled"])
