"""The autograd function of an adapted NF4 linear layer: the forward and backward that qdora.dora's
LoRALinear (QLoRA) and DoRALinear (detached-norm QDoRA) share."""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from .kernels import cpu_dora
from .nf4 import NF4Weight


G_RECOMPUTE = 0.5
# The overload itself, not the packet: no per-call overload resolution in Python.
_BATCH_NORM_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_BATCH_NORM_OUT = torch.ops.aten.native_batch_norm.out
_EMPTY = torch.empty(0)  # batch norm's saved statistics, which inference computes none of


class AdapterFunction(torch.autograd.Function):
    """QLoRA and detached-norm QDoRA on an NF4 base, with at most one pass over the activations.

        QLoRA  out =     x W0^T + s (x_d A^T) B^T  + bias
        QDoRA  out = g * (x W0^T + s (x_d A^T) B^T) + bias,   g = m / ||V|| (float32, detached)

    The caller gives g (float32, computed from m without a graph) and m itself, whose gradient this
    function returns.

    Forward: base = x W0^T; QDoRA then scales it by g and adds the bias in one pass
    (scale_columns_: float32 arithmetic rounded once, so g = 1 leaves it as it was). With `fold`
    (the norm was computed without dequantizing W0: Triton, or magnitude-only) g is instead folded
    into the NF4 block scales, so bitsandbytes dequantizes diag(g) W0 directly and the pass
    disappears (the matmul then adds the bias, as in QLoRA). The low-rank product is accumulated
    into the output by addmm with diag(g) s B (float32, rounded once), so it is never a separate
    (tokens x out) tensor. With `cpu_kernels` (bf16 on a CPU with AVX512-BF16, kernels/cpu_dora.py)
    one pass does both, g * base + bias + (A x) (diag(g) s B)^T rounded once, and backward's column
    dots for dL/dm are one kernel too. Backward always folds g into the block scales, so
    grad @ diag(g) W0 is one matmul, and the two input-gradient branches are summed by addmm.
    `dense` is W0 when the caller already dequantized it (for the norm) and `A_c` is A in the
    compute dtype. Saved: x (and x_d), A x, A_c, and for QDoRA the output and g; W0 is
    dequantized again in backward, never kept.

    dL/dm = sum_t grad * y / ||V|| needs y = x W0^T + s lora; it is recovered as (out - bias) / g
    rather than stored (the output is often saved by the next op anyway: attention's v, the MLP's
    gate and up). `rows` (an index tensor, or None) are those with |g| < G_RECOMPUTE, rare (m far
    below ||V||): there the output's rounding, relative to the bias too, is divided by a small g
    (and g = 0 leaves nothing to divide), so backward recomputes their y from x and those rows of W0.
    """

    @staticmethod
    def forward(ctx, x, x_drop, A, B, m, norm, g, rows, bias, weight: NF4Weight, scale: float,  # type: ignore[override]
                dense: torch.Tensor | None = None, A_c: torch.Tensor | None = None, fold: bool = False,
                cpu_kernels: bool = False):
        dtype = x.dtype
        # The bias is added where the output is first written, rounded once with it: by the matmul
        # (QLoRA, folded g) or by QDoRA's pass that applies g.
        if fold and g is not None:
            out = F.linear(x, _dequantize(weight, dtype, g), bias)
        else:
            w0 = weight.dequantize(dtype) if dense is None else dense
            if g is None:
                out = F.linear(x, w0, bias)
            elif cpu_kernels:
                out = F.linear(x, w0)  # dora_apply_ below applies g, the bias and the low-rank term
            else:
                out = scale_columns_(F.linear(x, w0), g, bias)
        ax = Bs = row_factor = None
        if A is not None:
            row_factor = scale if g is None else (g * scale).unsqueeze(1)
            A_c = A.to(dtype) if A_c is None else A_c
            ax = F.linear(x_drop, A_c)
            # float32 product, rounded once (contiguous whatever B's strides: the CPU kernel needs it)
            Bs = torch.mul(B.float(), row_factor, out=torch.empty(B.shape, dtype=dtype, device=B.device))
            if cpu_kernels:
                cpu_dora.dora_apply_(out, g, None if bias is None else bias.float(), ax, Bs)
            else:
                out.view(-1, out.shape[-1]).addmm_(ax.reshape(-1, ax.shape[-1]), Bs.T)
            if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
                A_c = None  # only the input gradient needs it
        ctx.weight, ctx.scale, ctx.drop_is_x, ctx.Bs, ctx.row_factor = weight, scale, x_drop is x, Bs, row_factor
        ctx.rows, ctx.cpu_kernels = rows, cpu_kernels
        ctx.save_for_backward(x, x_drop, A, A_c, B, m, norm, bias, ax, None if m is None else out, g)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, x_drop, A, A_c, B, m, norm, bias, ax, out, g = ctx.saved_tensors
        scale, weight, dtype = ctx.scale, ctx.weight, grad.dtype
        lead = grad.shape[:-1]
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_xd = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2 @ _dequantize(weight, dtype, g)
        if A is not None:
            grad_ax = grad2 @ ctx.Bs
            grad_B = ((grad2.T @ ax.reshape(-1, ax.shape[-1])).float() * ctx.row_factor).to(B.dtype)
            grad_A = (grad_ax.T @ x_drop.reshape(-1, x_drop.shape[-1])).to(A.dtype)
            if ctx.drop_is_x and grad_x is not None:
                grad_x.addmm_(grad_ax, A_c)  # both branches' input gradients in one sum
            elif ctx.needs_input_grad[1]:
                grad_xd = (grad_ax @ A_c).view(*lead, x.shape[-1])
        if grad_x is not None:
            grad_x = grad_x.view(*lead, x.shape[-1])
        if m is not None and ctx.needs_input_grad[4]:
            grad_m = _magnitude_grad(grad2, out, x, ax, B, m, norm, ctx.rows, bias, weight, scale, ctx.cpu_kernels)
        return grad_x, grad_xd, grad_A, grad_B, grad_m, None, None, None, None, None, None, None, None, None, None


def _magnitude_grad(grad2, out, x, ax, B, m, norm, rows, bias, weight: NF4Weight, scale: float,
                    cpu_kernels: bool = False) -> torch.Tensor:
    """dL/dm = sum_t grad * y / ||V|| with y = (out - bias) / g, that is sum_t grad * (out - bias) / m
    (g ||V|| = m), its result rounded once to m's dtype. `rows` (|g| < G_RECOMPUTE, found in
    forward) are recomputed from x (see AdapterFunction)."""
    out2 = out.reshape(-1, out.shape[-1])
    if cpu_kernels and grad2.is_contiguous() and grad2.dtype == out2.dtype:  # else the batch-norm route
        dots = cpu_dora.column_dots(grad2, out2, None if bias is None else bias.float())
    else:
        dots = column_dots(grad2, out2, bias)
    grad_m = dots.div_(m).to(m.dtype)
    if rows is not None:
        y = _recompute_rows(x, ax, B, weight, rows, scale)
        grad_m[rows] = ((grad2[:, rows].float() * y).sum(0) / norm[rows]).to(m.dtype)
    return grad_m


def column_dots(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t a[t] * (b[t] - shift) per column of two (tokens x n) tensors, in float32. On the CPU one
    pass with float32 products: batch norm's backward computes sum_t grad * (x - mean) * invstd per
    channel, here with mean = shift and invstd = 1. Elsewhere the product is rounded to the compute
    dtype before the float32 sum."""
    if a.shape[0] == 0:  # no tokens (batch norm's kernel would divide by zero)
        return torch.zeros(a.shape[-1], device=a.device)
    if a.device.type == "cpu":
        zeros, ones = _unit_stats(a.shape[-1], a.device)
        mean = zeros if shift is None else shift.float()
        return _BATCH_NORM_BACKWARD(a, b, None, None, None, mean, ones, True, 0.0, [False, True, False])[1]
    return (a * (b if shift is None else b - shift)).sum(0, dtype=torch.float32)


def scale_columns_(y: torch.Tensor, g: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """y * g (+ shift) per output column (g float32), written over y (contiguous) and returned: one
    pass, float32 arithmetic rounded once to y's dtype (a bf16 multiply would round g itself
    first), so g = 1 and no shift leave every value as it was (on the CPU a -0.0 becomes +0.0).
    In place because a pass into a fresh tensor also reads that tensor's memory before writing it:
    on the CPU, 243 against 292 us at 512 x 2816 right after the matmul that made y (measured).
    On the CPU batch norm in inference form (zero mean, unit variance, weight g, bias shift)
    computes exactly that, faster than a mixed-dtype multiply, which PyTorch runs there without
    vectorizing; elsewhere that multiply (addcmul with a shift)."""
    assert y.is_contiguous()
    if y.device.type != "cpu":
        return torch.mul(y, g, out=y) if shift is None else torch.addcmul(shift, y, g, out=y)
    zeros, ones = _unit_stats(g.shape[0], g.device)
    shift = None if shift is None else shift.float()
    y2 = y.view(-1, y.shape[-1])
    # The overload itself, not torch.batch_norm or F.batch_norm: their checks in Python and C++
    # cost 20-40 us (measured) right after a large matmul has evicted the interpreter's code and
    # data from cache.
    _BATCH_NORM_OUT(y2, g, shift, zeros, ones, False, 0.0, 0.0, out=y2, save_mean=_EMPTY, save_invstd=_EMPTY)
    return y


@functools.cache
def _unit_stats(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero means and unit variances (float32, read-only use) for the batch-norm passes above, made
    outside inference mode so that they serve any later call."""
    with torch.inference_mode(False):
        return (torch.zeros(n, dtype=torch.float32, device=device),
                torch.ones(n, dtype=torch.float32, device=device))


def _dequantize(weight: NF4Weight, dtype: torch.dtype, g: torch.Tensor | None) -> torch.Tensor:
    """W0, or diag(g) W0 with g (float32, per row) folded into the block scales, in `dtype`."""
    return weight.dequantize(dtype) if g is None else weight.dequantize(dtype, scales=weight.scales() * g.unsqueeze(1))


def _recompute_rows(x, ax, B, weight: NF4Weight, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """y[:, rows] = x W0[rows]^T + s * ax B[rows]^T in fp32 (the base term alone when ax is None),
    for the few rows where it is needed."""
    xf = x.reshape(-1, x.shape[-1]).float()
    y = xf @ weight.dequantize(torch.float32, rows=rows).T
    if ax is not None:
        y = y + scale * ax.reshape(-1, ax.shape[-1]).float() @ B.float()[rows].T
    return y
