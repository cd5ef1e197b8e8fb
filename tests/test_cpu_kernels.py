"""The CPU kernels (kernels/cpu_dora.cpp) against float64 references, and DoRALinear with and
without them.

dora_apply_ rounds a float32 sum once (bf16 products are exact in float32), so it must equal the
float64 result rounded once to bf16, except where float32's summation error (at most (r + 4) 2^-24
of the terms' size) can put the sum on the other side of a rounding midpoint: there the adjacent
bf16 value is allowed. The column dots and the norm are float32 sums held to a few float32 ulps of
the terms' size.
"""

import shutil

import pytest
import torch

from qdora.kernels import cpu_dora
from qdora.dora import DoRALinear, _use_cpu_kernels
from qdora.nf4 import NF4Weight

DOTS_TOL = dict(rtol=1e-6, terms=2.0 ** -20)
NORM_TOL = dict(rtol=2e-6, atol=0.0)

APPLY_SHAPES = [(1, 1, 1), (3, 17, 3), (37, 100, 16), (130, 129, 17), (5, 64, 64), (64, 200, 2), (2, 1000, 33)]

needs_library = pytest.mark.skipif(not cpu_dora.norm_available(), reason="the CPU kernels could not be built here")
needs_bf16 = pytest.mark.skipif(not cpu_dora.available(), reason="needs the CPU kernels and a CPU with AVX512-BF16")


def test_library_builds_where_a_compiler_is():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here")
    assert cpu_dora._library() is not None


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,r", APPLY_SHAPES)
def test_dora_apply_rounds_the_float64_result_once(M, N, r, bias):
    torch.manual_seed(M * 1000 + N + r)
    y = torch.randn(M, N).bfloat16()
    g = torch.rand(N) + 0.5
    b = torch.randn(N) if bias else None
    ax = torch.randn(M, r).bfloat16()
    Bs = (0.1 * torch.randn(N, r)).bfloat16()
    exact = g.double() * y.double() + ax.double() @ Bs.double().T + (0 if b is None else b.double())
    expected = cpu_dora.dora_apply_reference(y, g, b, ax, Bs)
    assert torch.equal(expected, exact.bfloat16())
    got = cpu_dora.dora_apply_(y.clone(), g, b, ax, Bs)
    terms = (g.double() * y.double()).abs() + ax.double().abs() @ Bs.double().abs().T + (0 if b is None else b.double().abs())
    differ = got.view(torch.int16) != expected.view(torch.int16)
    adjacent = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs() == 1
    midpoint = (got.double() + expected.double()) / 2
    near_midpoint = (exact - midpoint).abs() <= (r + 4) * 2.0 ** -24 * terms
    bad = differ & ~(adjacent & near_midpoint)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs are not the float64 result rounded once, "
                           f"e.g. {got[bad][:4].tolist()} against {expected[bad][:4].tolist()}")
    assert differ.float().mean() < 0.01  # boundary cases are rare


@needs_bf16
def test_dora_apply_rounds_to_nearest_even_as_pytorch_does():
    """g = 1 and B = 0, so the kernel rounds y + bias from float32: every bit pattern of the bias
    (exact ties, subnormals, infinities, huge values) gives PyTorch's rounding bit for bit, NaN
    aside (its payload: 0x7FC0 here, 0xFFFF from PyTorch's vectorized cast)."""
    torch.manual_seed(0)
    N, M = 1024, 64
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (N,), dtype=torch.int64).to(torch.int32)
    bits[:256] = (bits[:256] & ~0xFFFF) | 0x8000  # exactly halfway between two bf16 values
    bits[256:320] = bits[256:320] & 0x807FFFFF  # float32 subnormals
    bias = bits.view(torch.float32)
    y = torch.randn(M, N).bfloat16()
    y[:, 300:310] = 0
    got = cpu_dora.dora_apply_(y.clone(), torch.ones(N), bias, torch.zeros(M, 2).bfloat16(), torch.zeros(N, 2).bfloat16())
    expected = (y.float() + bias).bfloat16()
    keep = ~expected.isnan()
    assert torch.equal(got.view(torch.int16)[keep], expected.view(torch.int16)[keep])
    assert got[~keep].isnan().all()


@needs_bf16
def test_dora_apply_writes_over_y_in_any_leading_shape():
    torch.manual_seed(0)
    y = torch.randn(2, 5, 70).bfloat16()
    g, ax, Bs = torch.rand(70) + 0.5, torch.randn(2, 5, 4).bfloat16(), torch.randn(70, 4).bfloat16()
    expected = cpu_dora.dora_apply_reference(y, g, None, ax, Bs)
    out = cpu_dora.dora_apply_(y, g, None, ax, Bs)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expected, rtol=2.0 ** -7, atol=1e-5)  # one ulp: see the test above


@needs_bf16
def test_dora_apply_identity_is_exact():
    """g = 1, no bias, B = 0 gives y back bit for bit: subnormals, infinities and NaN included
    (a -0.0 becomes +0.0, as y + 0 does)."""
    torch.manual_seed(0)
    y = torch.randn(7, 70).bfloat16()
    y[0, :3] = torch.tensor([1e-39, float("inf"), -float("inf")])
    y[1, 5] = float("nan")
    out = cpu_dora.dora_apply_(y.clone(), torch.ones(70), None, torch.randn(7, 4).bfloat16(), torch.zeros(70, 4).bfloat16())
    assert torch.equal(out.view(torch.int16), y.view(torch.int16))


@needs_bf16
def test_dora_apply_rejects_other_dtypes():
    y = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="y must be a contiguous bfloat16"):
        cpu_dora.dora_apply_(y, torch.ones(8), None, torch.randn(3, 2).bfloat16(), torch.randn(8, 2).bfloat16())
    with pytest.raises(RuntimeError, match="g must be a contiguous float32"):
        cpu_dora.dora_apply_(y.bfloat16(), torch.ones(8).bfloat16(), None, torch.randn(3, 2).bfloat16(),
                             torch.randn(8, 2).bfloat16())


@needs_bf16
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("M,N", [(1, 1), (3, 17), (300, 100), (65, 1000), (1000, 33)])
def test_column_dots_match_float64(M, N, shift):
    torch.manual_seed(M + N)
    a, b = torch.randn(M, N).bfloat16(), (3 * torch.randn(M, N)).bfloat16()
    s = torch.randn(N) if shift else None
    expected = cpu_dora.column_dots_reference(a, b, s)
    got = cpu_dora.column_dots(a, b, s)
    terms = (a.double() * (b.double() - (0 if s is None else s.double()))).abs().sum(0)
    torch.testing.assert_close(got.double(), expected, rtol=DOTS_TOL["rtol"], atol=DOTS_TOL["terms"] * terms.max().item())


@needs_bf16
def test_column_dots_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    a, b = torch.randn(1000, 300).bfloat16(), torch.randn(1000, 300).bfloat16()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(cpu_dora.column_dots(a, b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_library
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out,inp,r", [(1, 64, 1), (37, 130, 16), (100, 64, 33)])
def test_row_norm_matches_float64_and_the_pytorch_route(out, inp, r, dtype):
    torch.manual_seed(out + inp + r)
    A = (torch.randn(r, inp) / inp ** 0.5).to(dtype)
    B = (0.1 * torch.randn(out, r)).to(dtype)
    W = torch.randn(out, inp) * torch.logspace(-3, 1, out)[:, None]
    c = W.abs().amax(1)
    w0_sq = (W / c[:, None]).square().sum(1)
    wa = (W @ A.float().T).to(dtype)
    got = cpu_dora.row_norm(wa, A, B, w0_sq, c, 2.0, 1e-12)
    torch.testing.assert_close(got, cpu_dora.row_norm_reference(wa, A, B, w0_sq, c, 2.0, 1e-12), **NORM_TOL)
    layer = DoRALinear(NF4Weight.quantize(W), None, rank=r, alpha=2.0 * r)
    layer.row_scale.copy_(c)
    layer.w0_sq.copy_(w0_sq)
    torch.testing.assert_close(got, layer._norm_from_wa(wa.float(), A.float(), B.float()), **NORM_TOL)


@needs_library
def test_row_norm_overflow_is_inf_not_nan():
    """A row where s B A dwarfs W0 squares past float32: +inf, as on the PyTorch route, which
    DoRALinear then recomputes in float64; never NaN."""
    A = torch.full((2, 64), 1e18)
    B = torch.tensor([[1e18, 1e18], [0.0, 0.0]])
    c, w0_sq = torch.ones(2), torch.tensor([1.0, 4.0])
    wa = torch.zeros(2, 2)
    got = cpu_dora.row_norm(wa, A, B, w0_sq, c, 1.0, 1e-12)
    assert got[0] == float("inf") and got[1] == 2.0


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_layer_with_and_without_cpu_kernels(bias, monkeypatch):
    """A bf16 DoRALinear step with the kernels against the same step on the PyTorch route. The
    gradients of x, A and B do not depend on the route: equal. The output is rounded once by the
    kernel and twice by the route (after g * y + bias, then after adding the low-rank term), so they
    differ by up to two bf16 ulps of the larger intermediate (measured: 6.0e-3 of the largest output
    over 8 seeds); dL/dm sums grad * out, so it inherits that (7.2e-3 of its largest)."""
    torch.manual_seed(0)
    dense = torch.randn(96, 130)
    calls = []
    apply_, dots = cpu_dora.dora_apply_, cpu_dora.column_dots
    monkeypatch.setattr(cpu_dora, "dora_apply_", lambda *a: calls.append("apply") or apply_(*a))
    monkeypatch.setattr(cpu_dora, "column_dots", lambda *a: calls.append("dots") or dots(*a))

    def run(backend):
        monkeypatch.setenv("QDORA_KERNELS", backend)
        torch.manual_seed(1)
        layer = DoRALinear(NF4Weight.quantize(dense), torch.randn(96) if bias else None, rank=8, alpha=16.0)
        layer = layer.to(torch.bfloat16)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.mul_(torch.rand(96).bfloat16() + 0.6)
        x = torch.randn(2, 5, 130).bfloat16().requires_grad_()
        out = layer(x)
        out.backward(torch.randn_like(out))
        return out, x.grad, layer.magnitude.grad, layer.lora_A.grad, layer.lora_B.grad

    fused = run("auto")
    assert calls == ["apply", "dots"], calls
    calls.clear()
    plain = run("torch")
    assert not calls
    for got, expected in zip(fused[:3:2], plain[:3:2]):  # the output and dL/dm
        torch.testing.assert_close(got.float(), expected.float(), rtol=2.0 ** -7, atol=2.0 ** -6 * expected.abs().max().item())
    for got, expected in zip(fused[1::2], plain[1::2]):  # dL/dx, dL/dA (and dL/dB below)
        assert torch.equal(got, expected)
    assert torch.equal(fused[4], plain[4])


def test_without_the_library_the_pytorch_route_is_used(monkeypatch):
    import torch.utils.cpp_extension as ext

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'qdora_cpu': [1/2] c++ -MMD -c cpu_dora.cpp\n"
                           "cpu_dora.cpp:12:3: error: 'x' was not declared in this scope\nninja: build stopped")

    cpu_dora._library.cache_clear()
    cpu_dora._cpu_has_bf16.cache_clear()
    monkeypatch.setattr(ext, "load", fail)
    try:
        with pytest.warns(RuntimeWarning, match=r"could not build its CPU kernels \(cpu_dora.cpp:12:3: error: 'x' was not"):
            assert not cpu_dora.available()
        layer = DoRALinear(NF4Weight.quantize(torch.randn(8, 64)), None, rank=2, alpha=4.0).to(torch.bfloat16)
        layer(torch.randn(3, 64).bfloat16()).sum().backward()
        assert layer.magnitude.grad is not None
    finally:
        monkeypatch.undo()
        cpu_dora._library.cache_clear()
        cpu_dora._cpu_has_bf16.cache_clear()


def test_qdora_kernels_torch_turns_them_off(monkeypatch):
    calls = []
    for name in ("dora_apply_", "column_dots", "row_norm"):
        monkeypatch.setattr(cpu_dora, name, lambda *a, _n=name: calls.append(_n))
    monkeypatch.setenv("QDORA_KERNELS", "torch")
    assert not _use_cpu_kernels(torch.device("cpu"), bf16=True) and not _use_cpu_kernels(torch.device("cpu"), bf16=False)
    layer = DoRALinear(NF4Weight.quantize(torch.randn(16, 64)), None, rank=2, alpha=4.0).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    layer(torch.randn(3, 64).bfloat16()).sum().backward()
    assert not calls and layer.magnitude.grad is not None
