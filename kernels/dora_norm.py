"""Fused Triton kernels for the DoRA row norm on an NF4 base, plus plain-PyTorch references.

DoRA needs ||V_i|| for V = W0 + s * B @ A, once per optimizer step. Materializing V (what PEFT
does) reads and writes several dense out x in matrices. The factored form needs only W0 A^T:

    ||V_i / c_i||^2 = ||W0_i / c_i||^2 + 2 s (B_i / c_i) . (W0 A^T)_i / c_i + s^2 (B_i / c_i) G (B_i / c_i)^T

with G = A A^T (r x r) and c_i the per-row `row_scale` that keeps every square finite. The first
term is a constant (`nf4_row_sq_norms`, once at init); `dora_row_norm` streams the packed NF4
weight once, decodes each tile in registers, accumulates (W0 / c) A^T in float32 with `tl.dot`,
and evaluates the whole formula in the epilogue, so per call it reads ~0.52 bytes per base
parameter plus A and B and writes out * 4 bytes. No dense out x in tensor is ever written.

Tiles: a program owns BLOCK_M rows and walks the row in steps of BLOCK_K columns that never
straddle a quantization block, so each step needs one scale per row. The codes of a byte are
columns 2j (high nibble) and 2j + 1 (low nibble); instead of interleaving them in registers the
kernel multiplies the high-nibble tile by the even columns of A and the low-nibble tile by the
odd ones: (W A^T) = W_even A_even^T + W_odd A_odd^T.
"""

from __future__ import annotations

import torch

from qdora.nf4 import FLOAT_DTYPES, NF4Weight

from .nf4_dequant import (check_device, check_weight, is_interpreted, nf4_code_table,
                          nf4_dequantize_reference, require_triton, triton, _nested_args)

if triton is not None:
    import triton.language as tl

    from .nf4_dequant import nf4_block_scale

    @triton.jit
    def _nf4_scaled_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                         rows, row_mask, c, k0, half, nblocks,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HALF_K: tl.constexpr):
        """W0 / c for columns k0 .. k0 + 2 * HALF_K of `rows`, as (even columns, odd columns)."""
        byte = k0 // 2 + tl.arange(0, HALF_K)
        q = tl.load(packed_ptr + rows[:, None] * half + byte[None, :],
                    mask=row_mask[:, None], other=0).to(tl.int32)
        scale = nf4_block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                rows * nblocks + k0 // BLOCKSIZE, row_mask, DOUBLE_QUANT) / c
        hi = tl.load(code_ptr + (q >> 4)) * scale[:, None]
        lo = tl.load(code_ptr + (q & 0xF)) * scale[:, None]
        return hi, lo

    @triton.jit
    def _nf4_row_sq_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                           row_scale_ptr, out_ptr, n_rows, in_pad, nblocks,
                           BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                           BLOCK_M: tl.constexpr, HALF_K: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        c = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)
        acc = tl.zeros((BLOCK_M, HALF_K), dtype=tl.float32)
        for k0 in range(0, in_pad, 2 * HALF_K):
            hi, lo = _nf4_scaled_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                      code_ptr, rows, row_mask, c, k0, in_pad // 2, nblocks,
                                      BLOCKSIZE, DOUBLE_QUANT, HALF_K)
            acc += hi * hi + lo * lo
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)

    @triton.jit
    def _dora_norm_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                          row_scale_ptr, w0_sq_ptr, a_ptr, b_ptr, g_ptr, out_ptr,
                          n_rows, in_features, in_pad, nblocks, rank, scale, eps,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          BLOCK_M: tl.constexpr, HALF_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_RC: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        c = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)
        r = tl.arange(0, BLOCK_R)
        r_mask = r < rank
        j = tl.arange(0, HALF_K)

        # Main loop: acc = (W0 / c) @ A^T over the padded row, float32 accumulation.
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_pad, 2 * HALF_K):
            hi, lo = _nf4_scaled_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                      code_ptr, rows, row_mask, c, k0, in_pad // 2, nblocks,
                                      BLOCKSIZE, DOUBLE_QUANT, HALF_K)
            even = k0 + 2 * j  # padding columns (>= in_features) meet zeros of A
            a_even = tl.load(a_ptr + r[None, :] * in_features + even[:, None],
                             mask=r_mask[None, :] & (even[:, None] < in_features), other=0.0)
            a_odd = tl.load(a_ptr + r[None, :] * in_features + even[:, None] + 1,
                            mask=r_mask[None, :] & (even[:, None] + 1 < in_features), other=0.0)
            acc = tl.dot(hi, a_even.to(tl.float32), acc, input_precision=PRECISION)
            acc = tl.dot(lo, a_odd.to(tl.float32), acc, input_precision=PRECISION)

        # Epilogue: cross term (B/c) . acc and quadratic term (B/c) G (B/c)^T, G in column chunks.
        b_rows = b_ptr + rows[:, None] * rank
        b = tl.load(b_rows + r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        b = b.to(tl.float32) / c[:, None]
        cross = tl.sum(b * acc, axis=1)
        quad = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j0 in tl.static_range(0, BLOCK_R, BLOCK_RC):
            cols = j0 + tl.arange(0, BLOCK_RC)
            col_mask = cols < rank
            g = tl.load(g_ptr + r[:, None] * rank + cols[None, :],
                        mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            b_j = tl.load(b_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            b_j = b_j.to(tl.float32) / c[:, None]
            quad += tl.sum(tl.dot(b, g, input_precision=PRECISION) * b_j, axis=1)
        w0_sq = tl.load(w0_sq_ptr + rows, mask=row_mask, other=0.0)
        n2 = w0_sq + 2.0 * scale * cross + (scale * scale) * quad
        tl.store(out_ptr + rows, tl.sqrt(tl.maximum(n2, eps)) * c, mask=row_mask)


def _check_vector(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float32 tensor of shape ({n},), got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the NF4 weight is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor ({', '.join(map(str, FLOAT_DTYPES))}) "
                         f"of shape {shape}, got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the NF4 weight is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _dot_precision(device: torch.device, interpreted: bool) -> str:
    """float32 tl.dot precision: 3xTF32 on Ampere+ NVIDIA (about float32 accuracy on tensor
    cores; plain TF32 would cost ~3 decimal digits in W0 A^T), IEEE float32 elsewhere."""
    if interpreted or device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


def _row_block(n_rows: int, preferred: int) -> int:
    return max(16, min(preferred, triton.next_power_of_2(n_rows)))


def nf4_row_sq_norms(weight: NF4Weight, row_scale: torch.Tensor) -> torch.Tensor:
    """float32 (out,) ||W0_i / row_scale_i||^2, one Triton pass over the packed weight."""
    require_triton()
    check_weight(weight)
    device = weight.packed.device
    interpreted = is_interpreted(_nf4_row_sq_kernel)
    check_device(weight.packed, interpreted)
    _check_vector("row_scale", row_scale, weight.out_features, device)
    out = torch.empty(weight.out_features, dtype=torch.float32, device=device)
    block_m = _row_block(weight.out_features, 32)
    half_k = min(weight.blocksize, 256) // 2
    absmax2, code2, offset = _nested_args(weight)
    _nf4_row_sq_kernel[(triton.cdiv(weight.out_features, block_m),)](
        weight.packed, weight.absmax, absmax2, code2, offset, nf4_code_table(device), row_scale, out,
        weight.out_features, weight.in_pad, weight.absmax.shape[1],
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, BLOCK_M=block_m,
        HALF_K=half_k, num_warps=4, enable_fp_fusion=True)
    return out


def dora_row_norm(weight: NF4Weight, w0_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scale: float, eps: float, row_scale: torch.Tensor) -> torch.Tensor:
    """float32 (out,) ||W0 + scale * B @ A||_row from one fused pass over the packed NF4 weight.

    `w0_sq` is `nf4_row_sq_norms(weight, row_scale)`; A is (r, in_features), B (out, r), any
    float dtype (read as is, computed in float32). The squared norm is clamped at `eps` (on the
    row-scaled rows) before the square root, exactly as `DoRALinear._norm_from_wa`.
    """
    require_triton()
    check_weight(weight)
    device = weight.packed.device
    interpreted = is_interpreted(_dora_norm_kernel)
    check_device(weight.packed, interpreted)
    out_f, in_f = weight.out_features, weight.in_features
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] < 1:
        raise ValueError(f"A must be a 2-D (rank, {in_f}) tensor with rank >= 1, got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    rank = A.shape[0]
    _check_matrix("A", A, (rank, in_f), device)
    _check_matrix("B", B, (out_f, rank), device)
    _check_vector("w0_sq", w0_sq, out_f, device)
    _check_vector("row_scale", row_scale, out_f, device)
    if not (eps >= 0):
        raise ValueError(f"eps must be >= 0, got {eps}")

    a32 = A.float()
    gram = (a32 @ a32.T).contiguous()  # (r, r): tiny next to the weight
    out = torch.empty(out_f, dtype=torch.float32, device=device)
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = _row_block(out_f, 64 if block_r <= 64 else 32)
    half_k = min(weight.blocksize, 128 if block_r <= 64 else 64) // 2
    absmax2, code2, offset = _nested_args(weight)
    _dora_norm_kernel[(triton.cdiv(out_f, block_m),)](
        weight.packed, weight.absmax, absmax2, code2, offset, nf4_code_table(device),
        row_scale, w0_sq, A, B, gram, out,
        out_f, in_f, weight.in_pad, weight.absmax.shape[1], rank, float(scale), float(eps),
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, BLOCK_M=block_m,
        HALF_K=half_k, BLOCK_R=block_r, BLOCK_RC=min(block_r, 64),
        PRECISION=_dot_precision(device, interpreted),
        num_warps=4, num_stages=3 if block_r <= 64 else 2, enable_fp_fusion=True)
    return out


def nf4_row_sq_norms_reference(weight: NF4Weight, row_scale: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `nf4_row_sq_norms` (dense float32 weight)."""
    w = nf4_dequantize_reference(weight, torch.float32) / row_scale[:, None]
    return w.square().sum(1)


def dora_row_norm_reference(weight: NF4Weight, w0_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            scale: float, eps: float, row_scale: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `dora_row_norm`: the same factored formula on a dense float32 W0."""
    A, B = A.float(), B.float()
    c = row_scale[:, None]
    wa = nf4_dequantize_reference(weight, torch.float32) @ A.T
    Bc = B / c
    n2 = w0_sq + 2 * scale * (Bc * (wa / c)).sum(1) + scale ** 2 * ((Bc @ (A @ A.T)) * Bc).sum(1)
    return n2.clamp_min(eps).sqrt() * row_scale
