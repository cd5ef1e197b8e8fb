"""NF4 storage against bitsandbytes quantizing the same (row-padded) weight itself."""

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

from qdora.nf4 import NF4Weight, nf4_linear

SHAPES = [(1, 64), (7, 172), (33, 130), (64, 64), (5, 300), (300, 5)]


def bnb_reference(w: torch.Tensor, blocksize: int, double_quant: bool) -> torch.Tensor:
    pad = -w.shape[1] % blocksize
    packed, state = bnbF.quantize_4bit(F.pad(w, (0, pad)).contiguous(), blocksize=blocksize,
                                       compress_statistics=double_quant, quant_type="nf4")
    return bnbF.dequantize_4bit(packed, state)[:, : w.shape[1]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_matches_bitsandbytes(shape, double_quant, blocksize):
    w = torch.randn(shape) * 0.02
    q = NF4Weight.quantize(w, blocksize, double_quant)
    ref = bnb_reference(w, blocksize, double_quant)
    torch.testing.assert_close(q.dequantize(torch.float32), ref, rtol=0, atol=0)
    torch.testing.assert_close(q.dequantize(torch.bfloat16), ref.bfloat16(), rtol=0, atol=0)
    # NF4 error is bounded by half the widest code gap (~0.16) times the block's absmax.
    assert (q.dequantize() - w).abs().max() <= 0.17 * w.abs().max()


@pytest.mark.parametrize("double_quant", [True, False])
def test_layout_is_row_major_and_row_shardable(double_quant):
    w = torch.randn(10, 172)
    q = NF4Weight.quantize(w, 64, double_quant)
    assert q.packed.shape == (10, 96) and q.packed.dtype == torch.uint8
    assert q.absmax.shape == (10, 3)
    assert q.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    # Rows 3..6 dequantized alone equal the same rows of the full weight: no block spans rows.
    full = q.dequantize()
    torch.testing.assert_close(q.dequantize(rows=slice(3, 7)), full[3:7], rtol=0, atol=0)
    # Quantizing rows 3..6 on their own gives the same packed bytes (padding is per row).
    part = NF4Weight.quantize(w[3:7], 64, double_quant)
    assert torch.equal(part.packed, q.packed[3:7])


def test_padding_columns_are_zero_and_dropped():
    q = NF4Weight.quantize(torch.randn(4, 70), 64, False)
    assert q.in_pad == 128
    padded = bnbF.dequantize_4bit(q.packed.reshape(-1, 1), bnbF.QuantState(
        absmax=q.absmax.reshape(-1), shape=torch.Size((4, 128)), blocksize=64, quant_type="nf4",
        dtype=torch.float32))
    assert torch.all(padded[:, 70:] == 0)
    assert q.dequantize().shape == (4, 70)


def test_row_sq_norms_in_chunks():
    q = NF4Weight.quantize(torch.randn(37, 130))
    ref = q.dequantize().double().square().sum(1).float()
    torch.testing.assert_close(q.row_sq_norms(chunk_elems=300), ref, rtol=1e-6, atol=0)


def test_nf4_linear_matches_dense_and_keeps_no_dense_weight():
    q = NF4Weight.quantize(torch.randn(24, 130))
    x = torch.randn(3, 5, 130, requires_grad=True)
    y = nf4_linear(x, q)
    torch.testing.assert_close(y, x @ q.dequantize().T)
    # Saved for backward: x only (the dense 24 x 130 weight is re-dequantized in backward).
    saved = [t.shape for t in y.grad_fn.saved_tensors] if hasattr(y.grad_fn, "saved_tensors") else []
    assert (24, 130) not in saved
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ q.dequantize())


@pytest.mark.parametrize("bad", [torch.randn(3), torch.zeros(2, 3, dtype=torch.int32)])
def test_bad_weights_rejected(bad):
    with pytest.raises(ValueError, match="NF4 quantization"):
        NF4Weight.quantize(bad)


def test_nonfinite_weight_rejected():
    w = torch.randn(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        NF4Weight.quantize(w)


def test_bad_blocksize_rejected():
    with pytest.raises(ValueError, match="blocksize 48"):
        NF4Weight.quantize(torch.randn(2, 64), blocksize=48)


def test_dequantize_rows_by_slice_or_index_equals_full_rows():
    w = NF4Weight.quantize(torch.randn(9, 172), double_quant=True)
    full = w.dequantize(torch.float32)
    idx = torch.tensor([7, 0, 4])
    assert torch.equal(w.dequantize(torch.float32, rows=idx), full[idx])
    assert torch.equal(w.dequantize(torch.bfloat16, rows=slice(2, 5)), w.dequantize(torch.bfloat16)[2:5])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(8, 172), (300, 64)])
def test_meta_weight_quantizes_to_the_same_shapes(shape, double_quant):
    """A meta weight (qdora.memory's models) gives an NF4Weight whose tensors have the shapes and
    dtypes quantizing real data gives, without running bitsandbytes."""
    real = NF4Weight.quantize(torch.randn(shape), double_quant=double_quant)
    meta = NF4Weight.quantize(torch.empty(shape, device="meta"), double_quant=double_quant)
    got = {k: (tuple(t.shape), t.dtype, t.device.type) for k, t in meta.state_dict().items()}
    assert got == {k: (tuple(t.shape), t.dtype, "meta") for k, t in real.state_dict().items()}
    for vector in (meta.row_scale(), meta.row_sq_norms()):
        assert vector.is_meta and vector.shape == (shape[0],) and vector.dtype == torch.float32
