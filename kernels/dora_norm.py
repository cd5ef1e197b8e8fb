"""DoRA row norms straight from the packed NF4 weight, in Triton.

DoRA needs ||V_i|| for V = W0 + s * B @ A, one value per output row. Expanding the square,

    ||V_i||^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 ||(B A)_i||^2,

where ||W0_i||^2 is a constant (`nf4_row_sq_norms`, once per layer) and the rest needs one pass
over W0: `dora_row_norm` streams each row's packed bytes and block scales once, decodes them in
registers and accumulates W0 A^T (out x r) and ||(B A)_i||^2 (the same number as B_i (A A^T) B_i^T,
computed from the A tiles already loaded for W0 A^T, so A is read once and no r x r Gram matrix is
needed). The dense out x in weight never exists; the traffic is about half a byte per parameter.

The dots run on bf16 tensor cores at close to float32 accuracy: NF4 codes (and A or B when they are
not bf16) are split into hi + lo bf16 parts, see `_split_dot`. Each K step stays inside one
quantization block, so its scale multiplies the (rows x r) partial product rather than every weight.
A byte holds columns 2t (high nibble) and 2t+1 (low nibble): the high-nibble tile meets the even
columns of A and the low-nibble tile the odd ones, so nothing is interleaved in registers.

With `row_scale` = c (one positive value per row) everything is computed for W0 / c and B / c and
the norm multiplied back by c, as `DoRALinear` does, so no finite weight overflows float32 squares.
When the rows alone give too few programs for the GPU, the in dimension is split across programs:
each writes its share 2 s cross + s^2 quad of every row (one float), and a small second kernel adds
them to w0_sq in a fixed order (deterministic, unlike atomics) and takes the root.
"""

from __future__ import annotations

import functools

import torch

from qdora.nf4 import FLOAT_DTYPES, NF4Weight

from .nf4_dequant import (check_nf4, check_vector, interpreting, nf4_code, nf4_dequantize_reference,
                          require_triton, triton)

if triton is not None:
    import triton.language as tl

    from .nf4_dequant import block_scale

    @triton.jit
    def _bf16_dot(a, b, INTERPRET: tl.constexpr):
        # The interpreter's bf16 dot is wrong; there the bf16 values are multiplied as float32.
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, out_dtype=tl.float32)

    @triton.jit
    def _split(x, SPLIT: tl.constexpr):
        """float32 x as bf16 hi + lo (lo only when SPLIT; x is exactly bf16 otherwise)."""
        hi = x.to(tl.bfloat16)
        if SPLIT:
            return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)
        else:
            return hi, hi

    @triton.jit
    def _split_dot(a_hi, a_lo, b_hi, b_lo, A_LO: tl.constexpr, B_LO: tl.constexpr, INTERPRET: tl.constexpr):
        """(a_hi + a_lo) @ (b_hi + b_lo) on bf16 tensor cores with float32 accumulation, with lo
        terms only for the operands that were split. Products are exact for bf16 and fp16 values
        (which split exactly into two bf16s); a float32 value keeps ~2^-17 of relative error in its
        split (TF32 would give 2^-11)."""
        acc = _bf16_dot(a_hi, b_hi, INTERPRET)
        if A_LO:
            acc += _bf16_dot(a_lo, b_hi, INTERPRET)
        if B_LO:
            acc += _bf16_dot(a_hi, b_lo, INTERPRET)
        if A_LO and B_LO:
            acc += _bf16_dot(a_lo, b_lo, INTERPRET)
        return acc

    @triton.jit
    def _row_sq_norms_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                             row_scale_ptr, out_ptr, n_rows, in_features, nblocks,
                             DOUBLE_QUANT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        # Tile axes: (row, quantization block, byte within the block), as in _nf4_dequant_kernel.
        row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = row_ids[:, None, None]
        row_mask = rows < n_rows
        rows = rows.to(tl.int64)
        t = tl.arange(0, HALF)[None, None, :]
        if HAS_ROW_SCALE:
            inv_c = tl.div_rn(1.0, tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0))
        acc = tl.zeros((BLOCK_M, BLOCK_B, HALF), dtype=tl.float32)
        for b0 in range(0, nblocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)[None, :, None]
            mask = row_mask & (blocks < nblocks)
            packed = tl.load(packed_ptr + rows * (nblocks * HALF) + blocks * HALF + t, mask=mask, other=0)
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows * nblocks + blocks, mask,
                                DOUBLE_QUANT)
            if HAS_ROW_SCALE:
                scale = scale * inv_c
            col = blocks * (2 * HALF) + 2 * t
            hi = tl.where(col < in_features, tl.load(code_ptr + (packed >> 4).to(tl.int32)), 0.0) * scale
            lo = tl.where(col + 1 < in_features, tl.load(code_ptr + (packed & 0xF).to(tl.int32)), 0.0) * scale
            acc += hi * hi + lo * lo
        tl.store(out_ptr + row_ids, tl.sum(tl.sum(acc, axis=2), axis=1), mask=row_ids < n_rows)

    @triton.jit
    def _dora_norm_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_hi_ptr, code_lo_ptr,
                          a_ptr, b_ptr, w0_sq_ptr, row_scale_ptr, out_ptr,
                          n_rows, in_features, rank, blocksize, nblocks, steps_per_split,
                          stride_ar, stride_ak, stride_bm, stride_br, scale, eps,
                          DOUBLE_QUANT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, FINAL: tl.constexpr,
                          SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, INTERPRET: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_k = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        r_mask = r < rank
        t = tl.arange(0, BLOCK_K // 2)
        if HAS_ROW_SCALE:
            c = tl.load(row_scale_ptr + rows, mask=row_mask, other=1.0)
        else:
            c = tl.full((BLOCK_M,), 1.0, tl.float32)
        inv_c = tl.div_rn(1.0, c)
        b = tl.load(b_ptr + rows64[:, None] * stride_bm + r[None, :] * stride_br,
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        b_hi, b_lo = _split(b, SPLIT_B)
        wa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)        # (W0 / c) A^T
        ba_sq = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)  # ((B A) / c)^2, reduced at the end

        k_begin = pid_k * steps_per_split * BLOCK_K
        k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, in_features)
        for k0 in range(k_begin, k_end, BLOCK_K):
            packed = tl.load(packed_ptr + rows64[:, None] * (nblocks * blocksize // 2) + k0 // 2 + t[None, :],
                             mask=row_mask[:, None], other=0)
            s = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows64 * nblocks + k0 // blocksize,
                            row_mask, DOUBLE_QUANT) * inv_c
            q_hi = (packed >> 4).to(tl.int32)
            q_lo = (packed & 0xF).to(tl.int32)
            cols = k0 + 2 * t
            a_mask = r_mask[:, None] & (cols[None, :] < in_features)
            a_ptrs = a_ptr + r[:, None] * stride_ar + cols[None, :] * stride_ak
            ae_hi, ae_lo = _split(tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32), SPLIT_A)
            ao_hi, ao_lo = _split(tl.load(a_ptrs + stride_ak, mask=a_mask & (cols[None, :] + 1 < in_features),
                                          other=0.0).to(tl.float32), SPLIT_A)
            # Codes of the high nibbles meet the even columns of A, low nibbles the odd ones.
            part = _split_dot(tl.load(code_hi_ptr + q_hi), tl.load(code_lo_ptr + q_hi), tl.trans(ae_hi),
                              tl.trans(ae_lo), True, SPLIT_A, INTERPRET)
            part += _split_dot(tl.load(code_hi_ptr + q_lo), tl.load(code_lo_ptr + q_lo), tl.trans(ao_hi),
                               tl.trans(ao_lo), True, SPLIT_A, INTERPRET)
            wa += part * s[:, None]
            ba_even = _split_dot(b_hi, b_lo, ae_hi, ae_lo, SPLIT_B, SPLIT_A, INTERPRET) * inv_c[:, None]
            ba_odd = _split_dot(b_hi, b_lo, ao_hi, ao_lo, SPLIT_B, SPLIT_A, INTERPRET) * inv_c[:, None]
            ba_sq += ba_even * ba_even + ba_odd * ba_odd

        cross = tl.sum(b * inv_c[:, None] * wa, axis=1)
        quad = tl.sum(ba_sq, axis=1)
        update = 2.0 * scale * cross + scale * scale * quad
        if FINAL:
            n2 = tl.load(w0_sq_ptr + rows, mask=row_mask, other=0.0) + update
            # NaN (inf - inf in an overflowed row) must reach DoRALinear's overflow check: a GPU's
            # max() returns the other operand for NaN unless told to propagate it
            n2 = tl.maximum(n2, eps, propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + rows, tl.sqrt_rn(n2) * c, mask=row_mask)
        else:
            tl.store(out_ptr + pid_k * n_rows + rows, update, mask=row_mask)  # partials are (split, out)

    @triton.jit
    def _dora_norm_finish_kernel(part_ptr, w0_sq_ptr, row_scale_ptr, out_ptr, n_rows, n_split, eps,
                                 HAS_ROW_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n_rows
        n2 = tl.load(w0_sq_ptr + rows, mask=mask, other=0.0)
        for k in range(n_split):
            n2 += tl.load(part_ptr + k * n_rows + rows, mask=mask, other=0.0)
        norm = tl.sqrt_rn(tl.maximum(n2, eps, propagate_nan=tl.PropagateNan.ALL))  # NaN: as above
        if HAS_ROW_SCALE:
            norm = norm * tl.load(row_scale_ptr + rows, mask=mask, other=1.0)
        tl.store(out_ptr + rows, norm, mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def norm_launch_config(out_features: int, in_features: int, blocksize: int, rank: int,
                       num_sms: int) -> dict[str, int]:
    """Tile sizes and the split of the in dimension for `dora_row_norm`.

    One K step is at most one quantization block (so one scale per row applies) and at least 32
    columns (16 bytes: the smallest tl.dot K). The in dimension is split until there are about two
    programs per SM (the interpreter counts as one SM, so a single row block is split in two there).
    """
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = 64 if block_r <= 64 else (32 if block_r <= 128 else 16)
    block_k = min(blocksize, 64)
    steps = triton.cdiv(in_features, block_k)
    split = max(1, min(steps, (2 * num_sms) // triton.cdiv(out_features, block_m)))
    steps_per_split = triton.cdiv(steps, split)
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, split=triton.cdiv(steps, steps_per_split),
                steps_per_split=steps_per_split, num_warps=4 if block_r <= 32 else 8)


@functools.cache
def _nf4_code_split(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 codes as bf16 hi + lo parts (hi + lo is within 2^-17 of each float32 code)."""
    code = nf4_code(device)
    hi = code.to(torch.bfloat16)
    return hi, (code - hi.float()).to(torch.bfloat16)


def _nested(weight: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    # Without double quantization the kernels never read absmax2/code2; any pointer will do.
    return (weight.absmax2, weight.code2) if weight.double_quant else (weight.absmax, weight.absmax)


def nf4_row_sq_norms(weight: NF4Weight, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """||W0_i / row_scale_i||^2 per row (row_scale defaults to 1) as float32 (out,), in one pass over
    the packed weight. Used once per layer, for the constant term of the DoRA norm."""
    require_triton("nf4_row_sq_norms")
    check_nf4(weight, "nf4_row_sq_norms")
    device = weight.packed.device
    if row_scale is not None:
        check_vector(row_scale, "row_scale", weight.out_features, device, "nf4_row_sq_norms")
    out = torch.empty(weight.out_features, dtype=torch.float32, device=device)
    nblocks = weight.in_pad // weight.blocksize
    half = weight.blocksize // 2
    block_b = min(triton.next_power_of_2(nblocks), max(1, 256 // half))
    block_m = max(1, 2048 // (block_b * half))
    _row_sq_norms_kernel[(triton.cdiv(weight.out_features, block_m),)](
        weight.packed, weight.absmax, *_nested(weight), weight.offset, nf4_code(device),
        out if row_scale is None else row_scale, out, weight.out_features, weight.in_features, nblocks,
        DOUBLE_QUANT=weight.double_quant, HAS_ROW_SCALE=row_scale is not None, HALF=half,
        BLOCK_M=block_m, BLOCK_B=block_b, num_warps=4, enable_fp_fusion=True)
    return out


def nf4_row_sq_norms_reference(weight: NF4Weight, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_row_sq_norms` in float64 PyTorch from the dequantized weight, returned as float32."""
    w = nf4_dequantize_reference(weight, torch.float32).double()
    if row_scale is not None:
        w = w / row_scale.double()[:, None]
    return w.square().sum(1).float()


def _check_factors(weight: NF4Weight, w0_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   row_scale: torch.Tensor | None, who: str) -> None:
    device = weight.packed.device
    check_vector(w0_sq, "w0_sq", weight.out_features, device, who)
    if row_scale is not None:
        check_vector(row_scale, "row_scale", weight.out_features, device, who)
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOAT_DTYPES:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{who}: {name} must be a 2-D tensor of dtype {FLOAT_DTYPES}, got {got}")
        if t.device != device:
            raise ValueError(f"{who}: {name} is on {t.device} but the weight is on {device}")
    rank = A.shape[0]
    if rank == 0 or A.shape[1] != weight.in_features:
        raise ValueError(f"{who}: A must be (rank >= 1, in_features={weight.in_features}), got {tuple(A.shape)}")
    if tuple(B.shape) != (weight.out_features, rank):
        raise ValueError(f"{who}: B must be (out_features={weight.out_features}, rank={rank}), "
                         f"got {tuple(B.shape)}")


def dora_row_norm(weight: NF4Weight, w0_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  eps: float, row_scale: torch.Tensor | None = None, *, split: int | None = None) -> torch.Tensor:
    """DoRA row norm ||W0 + scale * B @ A||_row as float32 (out,), in one pass over the packed W0.

    norm = c * sqrt(max(w0_sq + 2 s (B/c).(W0 A^T / c) + s^2 ||(B A) / c||^2, eps)) with c = row_scale
    (1 when None) and w0_sq = ||W0 / c||^2 per row (`nf4_row_sq_norms`), as `DoRALinear` computes it.
    A is (r, in_features) and B (out_features, r), any float dtype and strides; the arithmetic is
    float32. `split` overrides how many programs share a row block's in dimension (for tests).
    """
    who = "dora_row_norm"
    require_triton(who)
    check_nf4(weight, who)
    _check_factors(weight, w0_sq, A, B, row_scale, who)
    device = weight.packed.device
    rank = A.shape[0]
    cfg = norm_launch_config(weight.out_features, weight.in_features, weight.blocksize, rank, _num_sms(device))
    if split is not None:
        steps = triton.cdiv(weight.in_features, cfg["BLOCK_K"])
        cfg["steps_per_split"] = triton.cdiv(steps, max(1, min(split, steps)))
        cfg["split"] = triton.cdiv(steps, cfg["steps_per_split"])
    n_split = cfg.pop("split")
    final = n_split == 1
    out = torch.empty((weight.out_features,) if final else (n_split, weight.out_features),
                      dtype=torch.float32, device=device)
    _dora_norm_kernel[(triton.cdiv(weight.out_features, cfg["BLOCK_M"]), n_split)](
        weight.packed, weight.absmax, *_nested(weight), weight.offset, *_nf4_code_split(device),
        A, B, w0_sq, w0_sq if row_scale is None else row_scale, out,
        weight.out_features, weight.in_features, rank, weight.blocksize, weight.in_pad // weight.blocksize,
        cfg.pop("steps_per_split"), A.stride(0), A.stride(1), B.stride(0), B.stride(1), float(scale), float(eps),
        DOUBLE_QUANT=weight.double_quant, HAS_ROW_SCALE=row_scale is not None, FINAL=final,
        SPLIT_A=A.dtype != torch.bfloat16, SPLIT_B=B.dtype != torch.bfloat16, INTERPRET=interpreting(),
        enable_fp_fusion=True, **cfg)
    if final:
        return out
    norm = torch.empty(weight.out_features, dtype=torch.float32, device=device)
    _dora_norm_finish_kernel[(triton.cdiv(weight.out_features, 1024),)](
        out, w0_sq, w0_sq if row_scale is None else row_scale, norm, weight.out_features, n_split, float(eps),
        HAS_ROW_SCALE=row_scale is not None, BLOCK=1024, num_warps=4, enable_fp_fusion=False)
    return norm


def dora_row_norm_reference(weight: NF4Weight, w0_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            scale: float, eps: float, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`dora_row_norm` in float64 PyTorch from the dequantized weight, with the formula as written:
    c * sqrt(max(w0_sq + 2 s (B/c).(W0 A^T / c) + s^2 ((B/c) (A A^T)) . (B/c), eps)), as float32."""
    _check_factors(weight, w0_sq, A, B, row_scale, "dora_row_norm_reference")
    w = nf4_dequantize_reference(weight, torch.float32).double()
    a, b = A.double(), B.double()
    c = torch.ones(weight.out_features, dtype=torch.float64, device=w.device) if row_scale is None \
        else row_scale.double()
    bc = b / c[:, None]
    n2 = w0_sq.double() + 2 * scale * (bc * (w @ a.T / c[:, None])).sum(1) \
        + scale ** 2 * ((bc @ (a @ a.T)) * bc).sum(1)
    return (n2.clamp_min(eps).sqrt() * c).float()
