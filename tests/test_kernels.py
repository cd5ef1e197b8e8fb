"""Triton kernels against their PyTorch references, bitsandbytes and float64.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported). The interpreter truncates float32 -> bf16/fp16 casts where CUDA rounds to nearest,
hence the one-ulp tolerances. On a GPU, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the
compiled kernels on CUDA tensors instead.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import bitsandbytes.functional as bnbF  # noqa: E402

from qdora.kernels.dora_compose import dora_compose, dora_compose_reference  # noqa: E402
from qdora.kernels.dora_norm import (dora_row_norm, dora_row_norm_reference, nf4_row_sq_norms,  # noqa: E402
                                     nf4_row_sq_norms_reference)
from qdora.kernels.nf4_dequant import (NF4_CODE, interpreting, nf4_dequantize,  # noqa: E402
                                       nf4_dequantize_reference, reference_scales)
from qdora.nf4 import NF4Weight  # noqa: E402

if interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("compiled Triton needs CUDA; run with TRITON_INTERPRET=1 on CPU", allow_module_level=True)

SHAPES = [(7, 172), (33, 130), (64, 64), (5, 300)]
RANKS = [1, 8, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Dense outputs against bitsandbytes in the same dtype: float32 is bit-identical; a 16-bit result
# is that float32 value rounded once (truncated by the interpreter): one ulp, relative to the value,
# plus fp16's smallest subnormal.
DEQUANT_TOL = {
    torch.float32: dict(rtol=0.0, atol=0.0),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=0.0),
    torch.float16: dict(rtol=2.0 ** -10, atol=2.0 ** -24),
}
# Row norms against float64, by the dtype of A and B. bf16 and fp16 values split exactly into bf16
# hi + lo parts, leaving the NF4 codes' own split (2^-17); float32 factors keep about 2^-16 per
# element in theirs (the interpreter truncates the split; CUDA rounds it, about half the error).
# Worst seen over 12 seeds x all shapes and ranks here: 3.1e-5, 6.9e-7, 8.2e-7.
NORM_TOL = {
    torch.float32: dict(rtol=1e-4, atol=0.0),
    torch.bfloat16: dict(rtol=3e-6, atol=0.0),
    torch.float16: dict(rtol=3e-6, atol=0.0),
}
SQ_NORM_TOL = dict(rtol=2e-6, atol=0.0)


def quantized(shape, blocksize=64, double_quant=True, spread=True) -> NF4Weight:
    """An NF4 weight whose rows differ in scale by up to 1e3, so per-row scaling is exercised."""
    w = torch.randn(shape) * 0.02
    if spread:
        w = w * torch.logspace(-1.5, 1.5, shape[0])[:, None]
    return NF4Weight.quantize(w, blocksize, double_quant).to(DEVICE)


def factors(weight: NF4Weight, rank: int, dtype=torch.bfloat16, update=1.0):
    """LoRA factors whose update s*B@A is about `update` times W0 row by row, and s."""
    scale = 2.0
    A = torch.randn(rank, weight.in_features) / math.sqrt(weight.in_features)
    w0 = weight.dequantize(torch.float32).cpu()
    B = torch.randn(weight.out_features, rank) * (update / scale) * w0.norm(dim=1, keepdim=True) / math.sqrt(rank)
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype), scale


def test_code_table_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_is_bitsandbytes(shape, double_quant, blocksize):
    q = quantized(shape, blocksize, double_quant)
    torch.testing.assert_close(reference_scales(q), q.scales(), rtol=0, atol=0)
    for dtype in DTYPES:
        torch.testing.assert_close(nf4_dequantize_reference(q, dtype), q.dequantize(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize(shape, double_quant, dtype):
    q = quantized(shape, 64, double_quant)
    w = nf4_dequantize(q, dtype)
    assert w.shape == shape and w.dtype == dtype
    torch.testing.assert_close(w, q.dequantize(dtype), **DEQUANT_TOL[dtype])
    torch.testing.assert_close(w, nf4_dequantize_reference(q, dtype), **DEQUANT_TOL[dtype])
    assert (w != 0).float().mean() > 0.8  # not trivially zero: only the NF4 zero code decodes to 0


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_blocksize_128(double_quant):
    q = quantized((9, 200), 128, double_quant)
    torch.testing.assert_close(nf4_dequantize(q, torch.float32), q.dequantize(torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(nf4_dequantize(q, torch.bfloat16), q.dequantize(torch.bfloat16),
                               **DEQUANT_TOL[torch.bfloat16])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("with_row_scale", [True, False])
def test_row_sq_norms(shape, double_quant, with_row_scale):
    q = quantized(shape, 64, double_quant)
    c = q.row_scale() if with_row_scale else None
    sq = nf4_row_sq_norms(q, c)
    ref = nf4_row_sq_norms_reference(q, c)
    torch.testing.assert_close(sq, ref, **SQ_NORM_TOL)
    torch.testing.assert_close(sq, q.row_sq_norms(c), **SQ_NORM_TOL)  # the layer's PyTorch path
    dense = q.dequantize(torch.float32).double()
    if c is not None:
        dense = dense / c.double()[:, None]
    torch.testing.assert_close(sq.double(), dense.square().sum(1), **SQ_NORM_TOL)
    assert (sq > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dora_row_norm(shape, rank, double_quant):
    q = quantized(shape, 64, double_quant)
    c = q.row_scale()
    w0_sq = nf4_row_sq_norms(q, c)
    A, B, s = factors(q, rank)
    norm = dora_row_norm(q, w0_sq, A, B, s, 1e-12, c)
    assert norm.shape == (shape[0],) and norm.dtype == torch.float32
    torch.testing.assert_close(norm, dora_row_norm_reference(q, w0_sq, A, B, s, 1e-12, c), **NORM_TOL[A.dtype])
    # The expansion against the norm of the dense V = W0 + s B A, all in float64.
    v = q.dequantize(torch.float32).double() + s * B.double() @ A.double()
    torch.testing.assert_close(norm.double(), v.norm(dim=1), **NORM_TOL[A.dtype])
    # Not trivially ||W0||: the update (as large as W0) moves the norms far beyond the tolerance.
    assert ((norm - w0_sq.sqrt() * c).abs() / norm).mean() > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_row_scale", [True, False])
def test_dora_row_norm_factor_dtypes(dtype, with_row_scale):
    q = quantized((33, 130), 64, True)
    c = q.row_scale() if with_row_scale else None
    w0_sq = nf4_row_sq_norms(q, c)
    A, B, s = factors(q, 8, dtype)
    norm = dora_row_norm(q, w0_sq, A, B, s, 1e-12, c)
    torch.testing.assert_close(norm, dora_row_norm_reference(q, w0_sq, A, B, s, 1e-12, c), **NORM_TOL[dtype])


@pytest.mark.parametrize("blocksize", [32, 128])
def test_dora_row_norm_blocksizes(blocksize):
    q = quantized((20, 300), blocksize, True)
    c = q.row_scale()
    w0_sq = nf4_row_sq_norms(q, c)
    A, B, s = factors(q, 8)
    torch.testing.assert_close(dora_row_norm(q, w0_sq, A, B, s, 1e-12, c),
                               dora_row_norm_reference(q, w0_sq, A, B, s, 1e-12, c), **NORM_TOL[A.dtype])


@pytest.mark.parametrize("split", [2, 3, 100])
def test_dora_row_norm_split_in_dimension(split):
    q = quantized((40, 300), 64, True)
    c = q.row_scale()
    w0_sq = nf4_row_sq_norms(q, c)
    A, B, s = factors(q, 8)
    ref = dora_row_norm_reference(q, w0_sq, A, B, s, 1e-12, c)
    torch.testing.assert_close(dora_row_norm(q, w0_sq, A, B, s, 1e-12, c, split=split), ref, **NORM_TOL[A.dtype])


def test_dora_row_norm_strided_factors():
    q = quantized((33, 130), 64, False)
    w0_sq = nf4_row_sq_norms(q)
    A, B, s = factors(q, 8, torch.float32)
    At, Bt = A.T.contiguous().T, B.T.contiguous().T  # same values, transposed strides
    torch.testing.assert_close(dora_row_norm(q, w0_sq, At, Bt, s, 1e-12),
                               dora_row_norm_reference(q, w0_sq, A, B, s, 1e-12), **NORM_TOL[A.dtype])


@pytest.mark.parametrize("split", [1, 2])
def test_dora_row_norm_zero_update_is_exact(split):
    """B = 0 (DoRA's init): the norm is the IEEE sqrt(w0_sq) times c bit for bit. On CUDA, where
    torch's sqrt is correctly rounded too, that is how the layer's PyTorch path computes the initial
    magnitude, so g = m / norm is exactly 1. (Vectorized CPU torch.sqrt is sometimes one ulp off,
    hence the float64 square root as the reference here.)"""
    q = quantized((33, 130), 64, True)
    c = q.row_scale()
    w0_sq = nf4_row_sq_norms(q, c)
    A, B, s = factors(q, 8)
    norm = dora_row_norm(q, w0_sq, A, torch.zeros_like(B), s, 1e-12, c, split=split)
    assert torch.equal(norm, w0_sq.double().clamp_min(1e-12).sqrt().float() * c)
    if DEVICE == "cuda":
        assert torch.equal(norm, w0_sq.clamp_min(1e-12).sqrt() * c)


def test_dora_row_norm_zero_weight():
    """An all-zero W0 (row scale 1): only the s^2 ||B A||^2 term is left, and with B = 0 too the
    squared norm 0 is clamped at eps."""
    q = NF4Weight.quantize(torch.zeros(6, 100), 64, True).to(DEVICE)
    c = q.row_scale()
    w0_sq = nf4_row_sq_norms(q, c)
    assert torch.equal(w0_sq, torch.zeros_like(w0_sq)) and torch.equal(c, torch.ones_like(c))
    A, B = torch.randn(4, 100).to(DEVICE), torch.randn(6, 4).to(DEVICE)
    norm = dora_row_norm(q, w0_sq, A, B, 0.5, 1e-12, c)
    torch.testing.assert_close(norm.double(), 0.5 * (B.double() @ A.double()).norm(dim=1), **NORM_TOL[A.dtype])
    norm = dora_row_norm(q, w0_sq, A, torch.zeros_like(B), 0.5, 1e-4, c)
    assert torch.equal(norm, torch.full_like(norm, 1e-2))


@pytest.mark.parametrize("shape", [(3, 5, 33), (17, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dora_compose(shape, dtype):
    base = torch.randn(shape).to(DEVICE, dtype)
    lora = torch.randn(shape).to(DEVICE, dtype)
    g = (1 + 0.1 * torch.randn(shape[-1])).to(DEVICE)
    out = dora_compose(base, lora, g, 0.5)
    ref = dora_compose_reference(base, lora, g, 0.5)
    # Two roundings, of the bracket and of the sum (truncations in the interpreter): one ulp of each.
    delta = ((g - 1) * base.float() + (g * 0.5) * lora.float()).abs().max().item()
    tol = DEQUANT_TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * delta)
    assert not torch.equal(out, base)
    # g = 1 and no LoRA output: the base output comes back bit for bit.
    assert torch.equal(dora_compose(base, torch.zeros_like(lora), torch.ones_like(g), 0.5), base)


def test_errors_name_the_bad_value(monkeypatch):
    q = quantized((8, 64), 64, True)
    w0_sq = nf4_row_sq_norms(q)
    A, B, s = factors(q, 4)
    with pytest.raises(ValueError, match="B must be"):
        dora_row_norm(q, w0_sq, A, B[:, :3], s, 1e-12)
    with pytest.raises(ValueError, match="A must be"):
        dora_row_norm(q, w0_sq, A[:, :10], B, s, 1e-12)
    with pytest.raises(ValueError, match="A must be a 2-D tensor"):
        dora_row_norm(q, w0_sq, A.int(), B, s, 1e-12)
    with pytest.raises(ValueError, match="w0_sq must be float32"):
        dora_row_norm(q, w0_sq.double(), A, B, s, 1e-12)
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf4_dequantize(q, torch.int8)
    q.absmax.data = q.absmax.data.float()
    with pytest.raises(ValueError, match="weight.absmax must be torch.uint8"):
        nf4_dequantize(q, torch.float32)
    q2 = quantized((8, 128), 64, False)
    q2.packed.data = q2.packed.data.T.contiguous().T
    with pytest.raises(ValueError, match="weight.packed must be contiguous"):
        nf4_row_sq_norms(q2)
    with pytest.raises(ValueError, match="g must be float32"):
        dora_compose(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(8, dtype=torch.float64), 1.0)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            nf4_dequantize(quantized((8, 64)), torch.float32)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dora_layer_same_with_kernel_path(monkeypatch, double_quant):
    """DoRALinear with QDORA_KERNELS=triton (norms from the fused kernels) against the PyTorch path:
    outputs and the gradients of x, m, A and B within 1e-5 relative (fp32 compute)."""
    from qdora.dora import DoRALinear

    results = []
    w = torch.randn(40, 172) / 13
    for backend in ("torch", "triton"):
        monkeypatch.setenv("QDORA_KERNELS", backend)
        torch.manual_seed(1)
        layer = DoRALinear(NF4Weight.quantize(w, 64, double_quant).to(DEVICE), None, 8, 16.0,
                           dtype=torch.float32).to(DEVICE)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
        x = torch.randn(3, 5, 172, device=DEVICE, requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, 40, device=DEVICE)).sum().backward()
        results.append([y, x.grad, layer.magnitude.grad, layer.lora_A.grad, layer.lora_B.grad])
    for ref, got in zip(*results):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
