"""DoRA/LoRA layers against an fp64 implementation of the paper's formula on the dequantized weight.

Tolerances (relative Frobenius error vs fp64): fp32 compute 1e-5; bf16 compute 2e-2 (inputs, adapter
weights and outputs are bf16, whose unit roundoff is 2^-8 ~ 4e-3, and errors add over the sum).
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qdora.adapter_function import column_dots, scale_columns_
from qdora.dora import NORM_EPS, DoRALinear, LoRALinear, invalidate_norm_caches
from qdora.norm_cache import stamp as _stamp
from qdora.nf4 import NF4Weight

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(cls, out_f, in_f, rank, dtype, bias=None, **kw):
    w = torch.randn(out_f, in_f) / in_f ** 0.5
    layer = cls(NF4Weight.quantize(w), bias, rank, alpha=2.0 * max(rank, 1), dtype=dtype, **kw)
    with torch.no_grad():  # move away from the init point so every term matters
        if rank:
            layer.lora_B.normal_(0, 0.05)
        if hasattr(layer, "magnitude"):
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.7, 1.3))
    return layer


def reference(layer, x, detached=True):
    """fp64 DoRA (paper eq. 5; section 4.3 detaches the norm) or LoRA, with leaf tensors."""
    W = layer.weight.dequantize(torch.float32).double()
    leaves = {}
    V = W
    if layer.rank:
        A = leaves["A"] = layer.lora_A.detach().double().requires_grad_()
        B = leaves["B"] = layer.lora_B.detach().double().requires_grad_()
        V = W + layer.scale * B @ A
    if isinstance(layer, DoRALinear):
        m = leaves["m"] = layer.magnitude.detach().double().requires_grad_()
        n = V.norm(dim=1)
        V = m[:, None] * V / (n.detach() if detached else n)[:, None]
    return x @ V.T + (0 if layer.bias is None else layer.bias.double()), leaves


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def check(layer, x, detached=True):
    dtype = x.dtype
    x = x.clone().requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    xr = x.detach().double().requires_grad_()
    yr, leaves = reference(layer, xr, detached)
    g = torch.randn_like(yr)
    (y.double() * g).sum().backward()
    (yr * g).sum().backward()
    tol = TOL[dtype]
    assert rel(y, yr) < tol
    assert rel(x.grad, xr.grad) < tol
    names = {"A": "lora_A", "B": "lora_B", "m": "magnitude"}
    for key, leaf in leaves.items():
        assert rel(getattr(layer, names[key]).grad, leaf.grad) < tol, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,rank", [(37, 130, 1), (64, 172, 8), (100, 64, 16), (33, 257, 64), (8, 96, 3)])
def test_dora_matches_fp64_formula(out_f, in_f, rank, dtype):
    layer = make(DoRALinear, out_f, in_f, rank, dtype)
    check(layer, torch.randn(2, 5, in_f, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_exact_norm_gradient_matches_eq6(dtype):
    layer = make(DoRALinear, 40, 172, 8, dtype, norm_mode="exact")
    check(layer, torch.randn(3, 7, 172, dtype=dtype), detached=False)


def test_detached_and_exact_differ_only_in_gradient():
    a = make(DoRALinear, 40, 130, 8, torch.float32)
    b = DoRALinear(a.weight, None, 8, a.alpha, dtype=torch.float32, norm_mode="exact")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 130)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert not torch.allclose(a.lora_A.grad, b.lora_A.grad)


@pytest.mark.parametrize("cls,rank", [(DoRALinear, 8), (DoRALinear, 0), (LoRALinear, 8)])
def test_float32_adapters_with_bf16_compute_match_fp64(cls, rank):
    """As qdora.train runs: m, A, B stored in float32, activations in bf16 (A cast once per
    forward, the magnitude gradient divided by the float32 m)."""
    check(make(cls, 48, 172, rank, torch.float32), torch.randn(3, 7, 172, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_only(dtype):
    layer = make(DoRALinear, 30, 100, 0, dtype)
    assert layer.lora_A is None and sum(p.requires_grad for p in layer.parameters()) == 1
    check(layer, torch.randn(6, 100, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_matches_fp64(dtype):
    check(make(LoRALinear, 50, 172, 8, dtype), torch.randn(4, 172, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,rank", [(DoRALinear, 4), (DoRALinear, 0), (LoRALinear, 4)])
def test_bias_is_added_unscaled(cls, rank, dtype):
    """The bias is added once, after g: by QDoRA's pass that applies g, by the matmul of the
    magnitude-only (folded g) and QLoRA paths; the magnitude gradient recovers (out - bias) / g."""
    layer = make(cls, 12, 64, rank, dtype, bias=torch.randn(12) * 3)
    check(layer, torch.randn(3, 64, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_output_equals_nf4_base(dtype):
    """B = 0 and m = ||W0||: the output is the NF4 base output. In fp32 exactly; with a bf16
    magnitude, m carries one bf16 rounding (relative 2^-8) of the norm."""
    w = torch.randn(48, 172)
    layer = DoRALinear(NF4Weight.quantize(w), None, 8, 16.0, dtype=dtype)
    x = torch.randn(5, 172, dtype=dtype)
    base = x @ layer.weight.dequantize(dtype).T
    if dtype == torch.float32:
        assert torch.equal(layer(x), base)
    else:
        torch.testing.assert_close(layer(x), base, rtol=2 ** -7, atol=1e-2)


def test_norm_cache_recomputed_after_optimizer_step_only():
    layer = make(DoRALinear, 32, 96, 4, torch.float32)
    calls = []
    original = layer._norm_torch
    layer._norm_torch = lambda *a, **k: calls.append(1) or original(*a, **k)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 96)
    for _ in range(3):  # three gradient-accumulation micro-steps: one norm computation
        layer(x).square().mean().backward()
    assert len(calls) == 1
    norm_before = layer._norm_detached().clone()
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, **{kind: True})
        opt.step()
        opt.zero_grad()
        layer(x).square().mean().backward()
        layer(x).square().mean().backward()
    assert len(calls) == 3  # once per optimizer step, whatever AdamW implementation ran
    assert not torch.allclose(layer._norm_detached(), norm_before)
    # And the cached value is the norm of the current A, B.
    torch.testing.assert_close(layer._norm_detached(), layer.merged_weight().norm(dim=1) /
                               (layer.magnitude.float() / layer._norm_detached()), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [4, 0])
def test_small_g_check_runs_once_per_optimizer_step(rank, monkeypatch):
    """The check on g reads it on the host (a GPU synchronization): micro-steps and checkpoint
    recomputation reuse its result; an optimizer step or an in-place edit of m runs it again."""
    layer = make(DoRALinear, 16, 64, rank, torch.float32)
    reads = []
    amin = torch.amin
    monkeypatch.setattr(torch, "amin", lambda *a, **k: reads.append(1) or amin(*a, **k))
    x = torch.randn(2, 3, 64)
    for _ in range(2):  # two micro-steps, each forward recomputed by a checkpoint
        checkpoint(layer, x, use_reentrant=False).square().mean().backward()
    assert len(reads) == 1
    torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True).step()  # no version counter bumped
    layer(x).sum().backward()
    assert len(reads) == 2
    with torch.no_grad():
        layer.magnitude[:3] *= 1e-3  # in place: the check must find these rows now
    layer.zero_grad(set_to_none=True)
    check(layer, torch.randn(8, 64))
    assert len(reads) == 3


@pytest.mark.parametrize("seed", [0, 1, 2, 8])  # 1, 2 and 8 gave NaN with the norm divided by c twice before the dot
@pytest.mark.parametrize("double_quant", [True, False])
def test_no_nan_for_extreme_finite_weights(double_quant, seed):
    torch.manual_seed(seed)
    w = torch.randn(6, 64)
    w[0] = 0.0                      # a dead row: norm clamps to sqrt(NORM_EPS), m starts equal
    w[1] = 1e30                     # huge values: squared norms would overflow without row scaling
    w[2] = 1e-30                    # tiny values: squared norms would underflow
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("detached", "exact"):
            layer = DoRALinear(NF4Weight.quantize(w, double_quant=double_quant), None, 4, 8.0, dtype=dtype,
                               norm_mode=mode)
            with torch.no_grad():
                layer.lora_B.normal_()
            x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
            y = layer(x)
            assert torch.isfinite(y).all()
            y[:, [0, 2, 3]].sum().backward()
            for p in (x, layer.lora_A, layer.lora_B, layer.magnitude):
                assert torch.isfinite(p.grad).all()
            assert torch.isfinite(layer.merged_weight()).all()
    if not double_quant:  # bitsandbytes' 8-bit double quantization cannot keep a 1e-30 next to 1e30
        assert layer.magnitude[0].item() == pytest.approx(NORM_EPS ** 0.5, rel=1e-2)
        torch.testing.assert_close(layer.magnitude[1:3].double(), w[1:3].double().norm(dim=1), rtol=0.2, atol=0)


def tiny_row_layer() -> DoRALinear:
    """Row 1 of W0 is 1e-30 and B A is of order 1 there: that row's factored squared norm
    overflows float32 and must be computed again from V (_fix_overflowed_rows)."""
    w = torch.randn(4, 64)
    w[1] = 1e-30
    layer = DoRALinear(NF4Weight.quantize(w, double_quant=False), None, 4, 8.0, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_tiny_row_dominated_by_the_adapter_keeps_its_norm():
    """row_scale follows W0 alone: for a 1e-30 row with B A of order 1 the factored squared norm
    overflows float32, and that row's norm is computed again from V in float64, both when the
    forward computes the norm (checked with g) and when _norm_detached does."""
    layer = tiny_row_layer()
    V = layer.weight.dequantize(torch.float32).double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    x = torch.randn(3, 64)
    y, (yr, _) = layer(x).double(), reference(layer, x.double())  # the forward computes the norm first
    assert (((y - yr).norm(dim=0) / yr.norm(dim=0)) < 1e-4).all()
    torch.testing.assert_close(layer._norm_detached().double(), V.norm(dim=1), rtol=1e-5, atol=0)  # cached
    invalidate_norm_caches()
    torch.testing.assert_close(layer._norm_detached().double(), V.norm(dim=1), rtol=1e-5, atol=0)  # computed


def test_overflowed_row_is_repaired_beside_a_nan_magnitude():
    """A NaN in one row's g (here its m) must not hide another row's overflowed norm from the check
    (amin propagates the NaN, and NaN compares false)."""
    layer = tiny_row_layer()
    with torch.no_grad():
        layer.magnitude[3] = float("nan")
    x = torch.randn(3, 64)
    y, (yr, _) = layer(x).double(), reference(layer, x.double())
    assert torch.isnan(y[:, 3]).all()
    assert (((y - yr)[:, :3].norm(dim=0) / yr[:, :3].norm(dim=0)) < 1e-4).all()


def test_norm_computed_again_after_inference_mode_is_repaired_again():
    """A norm cached under torch.inference_mode is computed again by the next training forward
    (under the same cache key); its overflowed row must be repaired again, not skipped because the
    check on g was cached."""
    layer = tiny_row_layer()
    x = torch.randn(3, 64)
    yr, _ = reference(layer, x.double())
    with torch.inference_mode():
        y0 = layer(x).double()
    y = layer(x).double()
    for out in (y0, y):
        assert (((out - yr).norm(dim=0) / yr.norm(dim=0)) < 1e-4).all()


@pytest.mark.parametrize("replaced", ["magnitude", "lora_B"])
def test_caches_tell_a_new_parameter_from_the_old_one(replaced):
    """A parameter replaced by a new tensor whose stamp (step count, version counter, storage)
    matched the old one's (simulated here by restamping the caches) is still another object: the
    norm and the check on g are computed again."""
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(8, 64)
    layer(x)
    new = layer.magnitude.detach().clone() if replaced == "magnitude" else layer.lora_B.detach() * 3
    if replaced == "magnitude":
        new[:4] = 0.0  # rows the check must find (their gradient cannot come from out / g)
    setattr(layer, replaced, torch.nn.Parameter(new))
    _, inputs, norm = layer._norm_cache
    layer._norm_cache = (_stamp(layer._norm_inputs(), steps=True), inputs, norm)
    _, (m, _), rows = layer._rows_cache
    layer._rows_cache = (_stamp((layer.magnitude, norm), steps=True), (m, norm), rows)
    check(layer, x)


def test_check_follows_a_norm_recomputed_outside_forward():
    """The check on g belongs to the norm it was made with: B replaced (same version count) and the
    norm recomputed by _norm_detached, g drops far below 1 and the next forward must find those rows."""
    layer = make(DoRALinear, 16, 64, 4, torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    layer(x)
    layer.lora_B = torch.nn.Parameter(layer.lora_B.detach() * 300)
    layer._norm_detached()
    check(layer, x)


@pytest.mark.parametrize("how", ["data", "swap"])
def test_caches_see_data_assignment_and_swapped_loads(how):
    """`param.data = t` keeps the Parameter and its version but brings another storage; a
    load_state_dict that swaps tensors (torch.__future__'s swap flag) must not be refused and
    must not leave the old norm behind."""
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(8, 64)
    layer(x)
    if how == "data":
        layer.lora_B.data = layer.lora_B.detach() * 3
        layer.magnitude.data = layer.magnitude.detach() * 0.5
    else:
        other = make(DoRALinear, 16, 64, 4, torch.float32)
        other.weight, other.w0_sq, other.row_scale = layer.weight, layer.w0_sq, layer.row_scale
        state = {k: v for k, v in other.state_dict().items() if not k.startswith("weight.")}
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            layer.load_state_dict(state, strict=False)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        torch.testing.assert_close(layer.lora_B, other.lora_B, rtol=0, atol=0)
    check(layer, x)


def test_loading_other_nf4_bytes_brings_their_row_constants():
    """row_scale and ||W0||^2 are not in the state dict: loading another layer's NF4 bytes (a copy
    of another prepared model) recomputes them, so the layer then computes what that one does."""
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    other = make(DoRALinear, 16, 64, 4, torch.float32)
    with torch.no_grad():
        other.weight.packed.copy_(NF4Weight.quantize(torch.randn(16, 64) * 5).packed)
        other.w0_sq.copy_(other._w0_sq_norms())
        other.row_scale.copy_(other.weight.row_scale())
    x = torch.randn(8, 64)
    layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    check(layer, x)


def test_assigning_another_nf4_weight_brings_its_row_constants():
    """layer.weight = other NF4Weight (another quantization of the base, say) recomputes row_scale
    and ||W0||^2: the layer then computes what a layer built on that weight with the same m, A and
    B does, bit for bit (the old constants would give other rows' norms). A weight of another
    shape, or not NF4, is refused with both shapes named."""
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(8, 64)
    layer(x)
    w = NF4Weight.quantize(torch.randn(16, 64) * 5)
    built = DoRALinear(w, None, 4, alpha=8.0, dtype=torch.float32)
    built.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("weight.")}, strict=False)
    layer.weight = w
    assert torch.equal(layer(x), built(x))
    check(layer, x)
    with pytest.raises(ValueError, match=r"NF4Weight of shape \(16, 64\), got NF4Weight of shape \(16, 128\)"):
        layer.weight = NF4Weight.quantize(torch.randn(16, 128))
    with pytest.raises(ValueError, match=r"got Parameter"):
        layer.weight = torch.nn.Parameter(torch.randn(16, 64))
    lora = make(LoRALinear, 16, 64, 4, torch.float32)
    with pytest.raises(ValueError, match=r"LoRALinear.weight must be"):
        lora.weight = NF4Weight.quantize(torch.randn(8, 64))


def test_moving_the_layer_drops_its_caches():
    """model.to() sets param.data (same object, same version) or swaps tensors: the norm and the
    check are computed again, in the new dtype's layer as in a fresh one."""
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(8, 64)
    layer(x)
    layer.to(torch.bfloat16)
    assert layer._norm_cache is None and layer._rows_cache is None
    check(layer, x.bfloat16())


def test_layer_with_filled_caches_pickles_and_copies():
    """torch.save of the module and copy.deepcopy after a forward: the copies leave the caches
    out, compute their own norm and match."""
    import copy
    import io

    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(8, 64)
    y = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):  # our own object
        assert other._norm_cache is None
        assert torch.equal(other(x), y)


def test_small_magnitude_rows_use_recomputed_gradient():
    """Rows with g << 1 lose precision in (out - bias) / g; backward recomputes them."""
    layer = make(DoRALinear, 16, 64, 4, torch.bfloat16)
    with torch.no_grad():
        layer.magnitude[:5] *= 1e-4
    check(layer, torch.randn(8, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [4, 0])
def test_small_magnitude_rows_are_accurate_row_by_row(rank, bias):
    """Each output row and each magnitude gradient within bf16's tolerance of the fp64 formula, also
    where g = m / ||V|| is far below 1 (those rows' gradients are recomputed from x in backward)."""
    layer = make(DoRALinear, 16, 64, rank, torch.bfloat16, bias=torch.randn(16) if bias else None)
    with torch.no_grad():
        layer.magnitude[:4] *= torch.tensor([0.01, 0.05, 0.2, 0.4], dtype=torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    y = layer(x)
    yr, leaves = reference(layer, x.double())
    assert (((y.double() - yr).norm(dim=0) / yr.norm(dim=0)) < TOL[torch.bfloat16]).all()
    g = torch.randn_like(yr)
    (y.double() * g).sum().backward()
    (yr * g).sum().backward()
    # each dL/dm_i = sum_t grad y / m_i is a sum over tokens: its error bound scales with sum_t |grad y|
    y_unbiased = yr - (0 if layer.bias is None else layer.bias.double())
    bound = (g * y_unbiased).abs().sum(0) / leaves["m"].detach().abs()
    assert ((layer.magnitude.grad.double() - leaves["m"].grad).abs() / bound < TOL[torch.bfloat16]).all()


@pytest.mark.parametrize("rank", [4, 0])
def test_training_after_an_inference_mode_forward(rank):
    """A norm cached under torch.inference_mode cannot be saved for backward: the next training
    forward computes it again."""
    layer = make(DoRALinear, 16, 64, rank, torch.float32)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = layer(x).clone()
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert layer.magnitude.grad is not None


@pytest.mark.parametrize("rank", [4, 0])
def test_checkpoint_recomputation_repeats_the_forward(rank):
    """Activation checkpointing (non-reentrant) gives bit-identical outputs and gradients, with
    float32 adapters under bf16 autocast and the norm computed in the first forward."""
    torch.manual_seed(0)
    layer = make(DoRALinear, 24, 96, rank, torch.float32)
    x = torch.randn(2, 5, 96)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad(set_to_none=True)
        invalidate_norm_caches()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = checkpoint(layer, xi, use_reentrant=False) if checkpointed else layer(xi)
        (y.float() * torch.linspace(-1, 1, 24)).sum().backward()
        grads.append([y, xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_autocast_runs_in_bf16():
    layer = make(DoRALinear, 16, 64, 4, torch.float32)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_dropout_only_on_adapter_branch():
    layer = DoRALinear(NF4Weight.quantize(torch.randn(16, 64)), None, 4, 8.0, dropout=0.5,
                       dtype=torch.float32)
    x = torch.randn(5, 64)
    base = x @ layer.weight.dequantize().T
    layer.train()
    torch.testing.assert_close(layer(x), base)  # B = 0: dropout cannot show yet
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), layer(x))  # train mode: random
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": -1}, "rank must be positive"),
    ({"alpha": 0.0}, "alpha must be positive"),
    ({"dropout": 1.0}, "dropout"),
    ({"norm_mode": "approx"}, "norm_mode 'approx'"),
])
def test_bad_layer_arguments(kwargs, message):
    args = {"rank": 4, "alpha": 8.0} | kwargs
    mode = args.pop("norm_mode", "detached")
    with pytest.raises(ValueError, match=message):
        DoRALinear(NF4Weight.quantize(torch.randn(4, 64)), None, norm_mode=mode, **args)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_gradients_match_fp64(cls, dtype):
    """With dropout the adapter branch sees x_d = dropout(x): the input gradient is the sum of the base
    branch's and the adapter branch's through the mask (reference: the same mask, fp64)."""
    layer = make(cls, 24, 130, 4, dtype)
    layer.dropout = torch.nn.Dropout(0.3)
    layer.train()
    x = torch.randn(3, 5, 130, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = layer.dropout(torch.ones_like(x)).double()  # the same draw: mask / (1 - p)
    xr = x.detach().double().requires_grad_()
    W = layer.weight.dequantize(torch.float32).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    yr = xr @ W.T + layer.scale * (xr * keep) @ A.T @ B.T
    if cls is DoRALinear:
        g = layer.magnitude.detach().double() / (W + layer.scale * B @ A).norm(dim=1)
        yr = yr * g
    gy = torch.randn_like(yr)
    (y.double() * gy).sum().backward()
    (yr * gy).sum().backward()
    assert rel(y, yr) < TOL[dtype]
    assert rel(x.grad, xr.grad) < TOL[dtype]


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_input_without_grad_gives_same_adapter_gradients(cls):
    """A first layer's input needs no gradient: the adapter's gradients are unchanged."""
    layer = make(cls, 20, 64, 4, torch.float32)
    x = torch.randn(6, 64)
    grads = []
    for needs in (True, False):
        layer.zero_grad()
        layer(x.clone().requires_grad_(needs)).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_columns_is_one_rounding_of_the_float32_product(dtype):
    y = torch.randn(3, 5, 37, dtype=dtype)
    g = torch.rand(37) * 3
    g[:4] = 1.0
    y_in = y.clone()
    out = scale_columns_(y_in, g)
    assert out is y_in and out.dtype == dtype and out.shape == y.shape  # written over its input
    assert torch.equal(out, (y.float() * g).to(dtype))
    assert torch.equal(out[..., :4], y[..., :4])  # g = 1 leaves the output bit for bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_columns_adds_the_shift_in_the_same_rounding(dtype):
    """y * g + shift rounded once to dtype from float32: within half an ulp of the float64 result
    plus float32's rounding of y * g (a float32 multiply-add, fused or not), where rounding y * g to
    dtype and adding the shift after would not be near cancellation. (Float32 itself is left out:
    there an unfused multiply-add is that round-then-add.)"""
    y = torch.randn(64, 37, dtype=dtype)
    g = torch.rand(37) * 3
    shift = (torch.randn(37) * 4).to(dtype)
    out = scale_columns_(y.clone(), g, shift)
    assert out.dtype == dtype and out.shape == y.shape
    product = y.double() * g.double()
    exact = product + shift.double()
    bound = torch.finfo(dtype).eps / 2 * exact.abs() + 2 ** -23 * product.abs() + torch.finfo(dtype).tiny
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [False, True])
def test_column_dots_match_float64(dtype, shift):
    """Float32 products and sums (on the CPU): within a few float32 roundings of the float64 sums,
    also for non-contiguous operands."""
    a = torch.randn(37, 300, dtype=dtype).T  # (300 tokens, 37 columns), column-major
    b = torch.randn(300, 37, dtype=dtype)
    s = torch.randn(37) if shift else None
    prod = a.double() * (b.double() - (0 if s is None else s.double()))
    got = column_dots(a, b, s)
    assert got.dtype == torch.float32
    assert ((got.double() - prod.sum(0)).abs() <= 1e-6 * prod.abs().sum(0)).all()


@pytest.mark.parametrize("cls,rank", [(DoRALinear, 4), (DoRALinear, 0), (LoRALinear, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_no_tokens(cls, rank, bias):
    """A layer that gets no tokens (an empty batch, an idle expert): empty output, zero gradients."""
    layer = make(cls, 8, 64, rank, torch.bfloat16, bias=torch.randn(8) if bias else None)
    x = torch.randn(0, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any()


def test_lora_with_bf16_factors_in_fp32_compute():
    """s * B is formed in float32 before it meets the float32 compute, not rounded to B's bf16."""
    layer = make(LoRALinear, 64, 64, 4, torch.bfloat16)
    layer.scale = 0.7  # not a power of two: s * B in bf16 would round
    x = torch.randn(5, 64)
    yr, _ = reference(layer, x.double())
    assert rel(layer(x), yr) < 1e-6


def test_a_nan_factor_stays_in_its_row():
    """A NaN in one row of B cannot be repaired: that row's output is NaN, the others are exact, and
    a cached norm is not rewritten by later forwards (two forwards, one backward)."""
    layer = make(DoRALinear, 8, 64, 4, torch.float32)
    with torch.no_grad():
        layer.lora_B[3, 0] = float("nan")
    x = torch.randn(3, 64)
    y1, y2 = layer(x), layer(x)
    (y1.sum() + y2.sum()).backward()
    assert torch.isnan(y1[:, 3]).all() and torch.isfinite(y1[:, [0, 1, 2, 4, 5, 6, 7]]).all()
    assert torch.equal(y1[:, :3], y2[:, :3])
    assert torch.isfinite(layer.magnitude.grad[[0, 1, 2, 4, 5, 6, 7]]).all()
