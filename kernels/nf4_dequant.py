"""NF4 dequantization in Triton, reading `NF4Weight`'s row-major storage directly.

A program owns a tile of BLOCK_M rows x BLOCK_B quantization blocks. Each block scale is computed
once per tile (from the uint8 double-quantized scale when `double_quant`) and broadcast over the
block's packed bytes; the high and low nibbles of a byte are columns 2t and 2t+1, so the two
decoded halves are interleaved back into column order before the store.

The float32 result is bit-identical to bitsandbytes (`NF4Weight.dequantize`): the same products
in the same order, with floating-point contraction (FMA) disabled so that the double-quant scale
`code2[q] * absmax2 + offset` is rounded twice, as bitsandbytes rounds it.

Also here: the pieces shared with `dora_norm` (the NF4 code table, the storage checks, the
Triton block-scale helper) and a plain PyTorch reference.
"""

from __future__ import annotations

import functools
import os

import torch

from qdora.nf4 import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Weight

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = tl = None

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes' get_4bit_type("nf4") stores
# them in float32; tests check the two agree.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Packed bytes handled by one program of the dequantization kernel.
_TILE_BYTES = 2048
_TILE_ROW_BYTES = 256


@functools.cache
def _nf4_code_cached(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_code(device: torch.device | str) -> torch.Tensor:
    """The NF4 code table as a float32 tensor of 16 values on `device` (cached per device)."""
    return _nf4_code_cached(torch.device(device))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def require_triton(who: str) -> None:
    """Raise a clear error when Triton is not installed."""
    if triton is None:
        raise ImportError(f"{who} needs Triton, which is not installed; install `triton` or use the "
                          "PyTorch path (QDORA_KERNELS=torch)")


def check_device(t: torch.Tensor, name: str, who: str) -> None:
    """Compiled Triton needs CUDA tensors; the interpreter runs on CPU tensors."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{who}: {name} is on {t.device}, but Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them on CPU)")


def check_nf4(weight: NF4Weight, who: str) -> None:
    """Check that `weight` has the layout the kernels index into (shapes, dtypes, one device,
    contiguity), naming the offending tensor."""
    if not isinstance(weight, NF4Weight):
        raise ValueError(f"{who} needs an NF4Weight, got {type(weight).__name__}")
    out_f, nblocks = weight.out_features, weight.in_pad // weight.blocksize
    scale_dtype = torch.uint8 if weight.double_quant else torch.float32
    expected = {"packed": ((out_f, weight.in_pad // 2), torch.uint8),
                "absmax": ((out_f, nblocks), scale_dtype)}
    if weight.double_quant:
        expected["absmax2"] = ((-(-out_f * nblocks // NESTED_BLOCKSIZE),), torch.float32)
        expected["code2"] = ((256,), torch.float32)
        expected["offset"] = ((), torch.float32)
    device = weight.packed.device
    for name, (shape, dtype) in expected.items():
        t = getattr(weight, name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{who}: weight.{name} must be {dtype} of shape {shape}, "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{who}: weight.{name} must be contiguous (stride {t.stride()})")
        if t.device != device:
            raise ValueError(f"{who}: weight.{name} is on {t.device} but weight.packed is on {device}")
    check_device(weight.packed, "weight.packed", who)


def check_vector(t: torch.Tensor, name: str, n: int, device: torch.device, who: str) -> None:
    """A contiguous float32 (n,) tensor on `device`."""
    if t.shape != (n,) or t.dtype != torch.float32:
        raise ValueError(f"{who}: {name} must be float32 of shape ({n},), got {t.dtype} of shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{who}: {name} must be contiguous (stride {t.stride()})")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device} but the weight is on {device}")


def reference_scales(weight: NF4Weight) -> torch.Tensor:
    """Block scales in float32, (out, in_pad // blocksize), in plain PyTorch:
    code2[q] * absmax2[j // 256] + offset for the j-th flat uint8 scale q when double-quantized."""
    if not weight.double_quant:
        return weight.absmax.float()
    q = weight.absmax.reshape(-1).long()
    group = torch.arange(q.numel(), device=q.device) // NESTED_BLOCKSIZE
    return (weight.code2[q] * weight.absmax2[group] + weight.offset).view(weight.absmax.shape)


def nf4_dequantize_reference(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in_features) weight in `dtype`: unpack nibbles (high first), look up the NF4
    code, multiply by the block scale in float32, drop the padding columns, cast."""
    p = weight.packed
    codes = torch.stack((p >> 4, p & 0xF), dim=-1).reshape(weight.out_features, -1, weight.blocksize)
    w = nf4_code(p.device)[codes.long()] * reference_scales(weight)[..., None]
    return w.reshape(weight.out_features, weight.in_pad)[:, : weight.in_features].to(dtype)


if triton is not None:
    NESTED = tl.constexpr(NESTED_BLOCKSIZE)

    @triton.jit
    def block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask, DOUBLE_QUANT: tl.constexpr):
        """float32 scale of the quantization blocks at flat indices `flat` (row * nblocks + block)."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + flat, mask=mask, other=0).to(tl.int32)
            s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + flat // NESTED, mask=mask, other=0.0)
            return s + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + flat, mask=mask, other=0.0)

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
                            n_rows, in_features, nblocks,
                            DOUBLE_QUANT: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
        # Tile axes: (row, quantization block, byte within the block); HALF = blocksize // 2 bytes.
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None, None]
        blocks = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B))[None, :, None]
        mask = (rows < n_rows) & (blocks < nblocks)
        rows = rows.to(tl.int64)
        byte = blocks * HALF + tl.arange(0, HALF)[None, None, :]
        packed = tl.load(packed_ptr + rows * (nblocks * HALF) + byte, mask=mask, other=0)
        scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows * nblocks + blocks, mask,
                            DOUBLE_QUANT)
        hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale
        lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale
        w = tl.interleave(hi, lo)
        cols = blocks * (2 * HALF) + tl.arange(0, 2 * HALF)[None, None, :]
        tl.store(out_ptr + rows * in_features + cols, w.to(out_ptr.dtype.element_ty),
                 mask=mask & (cols < in_features))


def _dequant_tiles(blocksize: int, nblocks: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_B): about _TILE_BYTES packed bytes per program, at most _TILE_ROW_BYTES per row."""
    half = blocksize // 2
    block_b = min(triton.next_power_of_2(nblocks), max(1, _TILE_ROW_BYTES // half))
    return max(1, _TILE_BYTES // (block_b * half)), block_b


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in_features) weight in `dtype` from the NF4 storage, in one Triton kernel.

    float32 output is bit-identical to `weight.dequantize(torch.float32)`; bf16/fp16 output is
    that value rounded once (the interpreter truncates instead, one ulp at most).
    """
    require_triton("nf4_dequantize")
    check_nf4(weight, "nf4_dequantize")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    device = weight.packed.device
    out = torch.empty(weight.out_features, weight.in_features, dtype=dtype, device=device)
    nblocks = weight.in_pad // weight.blocksize
    block_m, block_b = _dequant_tiles(weight.blocksize, nblocks)
    grid = (triton.cdiv(weight.out_features, block_m), triton.cdiv(nblocks, block_b))
    dq = weight.double_quant
    absmax2, code2 = (weight.absmax2, weight.code2) if dq else (weight.absmax, weight.absmax)
    _nf4_dequant_kernel[grid](
        weight.packed, weight.absmax, absmax2, code2, weight.offset, nf4_code(device), out,
        weight.out_features, weight.in_features, nblocks,
        DOUBLE_QUANT=dq, HALF=weight.blocksize // 2, BLOCK_M=block_m, BLOCK_B=block_b,
        num_warps=4, enable_fp_fusion=False)
    return out
