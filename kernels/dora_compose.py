"""The DoRA output composition as one elementwise Triton kernel.

    out = base + ((g - 1) * base + (g * s) * lora)      (bracket in float32, rounded once to dtype)

base = x W0^T and lora = x A^T B^T are (tokens, out) activations in bf16/fp16/fp32 and g = m / ||V||
is float32 (out,). Eager PyTorch writes and rereads float32 temporaries for each operator (about 50
bytes per output element for bf16); the kernel reads base and lora once and writes out once (6
bytes). Floating-point contraction is disabled so that, with round-to-nearest casts, the result is
bit-identical to the eager expression, and g = 1 with lora = 0 gives back base exactly.
"""

from __future__ import annotations

import torch

from qdora.nf4 import FLOAT_DTYPES

from .nf4_dequant import check_device, require_triton, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _dora_compose_kernel(base_ptr, lora_ptr, g_ptr, out_ptr, n_tokens, n_out, scale,
                             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_out
        mask = (tokens < n_tokens)[:, None] & col_mask[None, :]
        offs = tokens.to(tl.int64)[:, None] * n_out + cols[None, :]
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lora = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=col_mask, other=1.0)[None, :]
        delta = ((g - 1.0) * base + (g * scale) * lora).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, (base + delta.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def _check(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, who: str) -> None:
    if base.dtype not in FLOAT_DTYPES or base.dim() < 1:
        raise ValueError(f"{who}: base must be a float tensor (..., out), got {base.dtype} of shape {tuple(base.shape)}")
    if lora.shape != base.shape or lora.dtype != base.dtype:
        raise ValueError(f"{who}: lora must match base ({base.dtype}, {tuple(base.shape)}), "
                         f"got {lora.dtype} of shape {tuple(lora.shape)}")
    if g.dtype != torch.float32 or g.shape != base.shape[-1:]:
        raise ValueError(f"{who}: g must be float32 of shape ({base.shape[-1]},), got {g.dtype} of shape {tuple(g.shape)}")
    for name, t in (("lora", lora), ("g", g)):
        if t.device != base.device:
            raise ValueError(f"{who}: {name} is on {t.device} but base is on {base.device}")


def dora_compose(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """base + ((g - 1) * base + (g * scale) * lora) with float32 math and base's dtype for I/O.

    base and lora are (..., out) of one float dtype, contiguous; g is float32 (out,).
    """
    who = "dora_compose"
    require_triton(who)
    _check(base, lora, g, who)
    check_device(base, "base", who)
    for name, t in (("base", base), ("lora", lora), ("g", g)):
        if not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous (stride {t.stride()})")
    out = torch.empty_like(base)
    n_out = base.shape[-1]
    n_tokens = base.numel() // max(n_out, 1)
    if out.numel() == 0:
        return out
    block_n = min(triton.next_power_of_2(n_out), 256)
    block_t = max(1, 4096 // block_n)
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(n_out, block_n))
    _dora_compose_kernel[grid](base, lora, g, out, n_tokens, n_out, float(scale),
                               BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False)
    return out


def dora_compose_reference(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """The eager expression: base + ((g - 1) * base.float() + (g * s) * lora.float()).to(dtype). (`DoRALinear`
    itself no longer materializes lora: it scales base in place and adds the low-rank term by addmm.)"""
    _check(base, lora, g, "dora_compose_reference")
    return base + ((g - 1) * base.float() + (g * scale) * lora.float()).to(base.dtype)
