"""NF4 storage of a frozen base weight, laid out by output row.

bitsandbytes quantizes and dequantizes; this module only owns the layout. A weight of shape
(out, in) is zero-padded per row to `in_pad`, the next multiple of the block size, so that every
block of 64 values lies inside one row. Then every stored tensor that grows with the weight has
the output row as its first dimension and FSDP2 can shard it by rows like any other parameter:

    packed  uint8    (out, in_pad // 2)   two 4-bit codes per byte, high nibble first
    absmax  uint8    (out, in_pad // bs)  double-quantized block scales   (double_quant=True)
            float32  (out, in_pad // bs)  plain block scales              (double_quant=False)

With double quantization the uint8 scales are dequantized through three small tensors that do not
grow with the rows and are replicated on every rank: `absmax2` (one float32 per 256 scales),
`code2` (bitsandbytes' 256-entry dynamic map) and `offset` (the mean that was subtracted).

Padding rule: when `in_features` is not a multiple of the block size (stories260K's 172, for
instance), each row is padded with zeros, which NF4 encodes exactly; the padded columns are
sliced off on dequantization. No quantization block ever mixes two rows.

We own plain tensors rather than bitsandbytes' `Params4bit` because the latter loses its quant
state under FSDP2, and `bnb.nn.Linear4bit` repacks its bytes in place into a CPU-only layout during
eval-mode forwards on AVX512-BF16 CPUs, after which `dequantize_4bit` returns garbage.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

# bitsandbytes logs a warning at import when the optional PyPI package `kernels` is missing; it is
# optional for us too, so keep it out of our users' terminals.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _Lazy:
    """bitsandbytes.functional, imported on first use: its import takes seconds, and a command that
    only checks its flags (or --help) should not wait for it."""

    def __getattr__(self, name: str):
        import bitsandbytes.functional

        return getattr(bitsandbytes.functional, name)


bnbF = _Lazy()

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the second-level (double) quantization
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NF4Weight(nn.Module):
    """A frozen (out x in) weight held as NF4 in row-major, row-shardable tensors.

    Built with `NF4Weight.quantize(weight)`. `dequantize(dtype)` returns the dense (out x in) weight;
    bitsandbytes does the arithmetic, so its `dequantize_4bit` is both our implementation here and
    the oracle the Triton kernel is tested against.
    """

    def __init__(self, out_features: int, in_features: int, blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4 blocksize {blocksize} is not supported; use one of {BLOCKSIZES}")
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"NF4 weight shape ({out_features}, {in_features}) must be positive")
        self.out_features, self.in_features = out_features, in_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.in_pad = math.ceil(in_features / blocksize) * blocksize
        nblocks = self.in_pad // blocksize
        # Parameters (not buffers) so that FSDP2 shards them by rows; never trainable.
        self.packed = nn.Parameter(
            torch.zeros(out_features, self.in_pad // 2, dtype=torch.uint8, device=device), requires_grad=False)
        scale_dtype = torch.uint8 if double_quant else torch.float32
        self.absmax = nn.Parameter(
            torch.zeros(out_features, nblocks, dtype=scale_dtype, device=device), requires_grad=False)
        n2 = math.ceil(out_features * nblocks / NESTED_BLOCKSIZE) if double_quant else 0
        self.register_buffer("absmax2", torch.zeros(n2, dtype=torch.float32, device=device))
        self.register_buffer("code2", torch.zeros(256 if double_quant else 0, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a dense (out x in) weight with bitsandbytes, padding each row to whole blocks. A
        weight on the meta device gives an NF4Weight of the same shapes, also on meta."""
        if weight.dim() != 2:
            raise ValueError(f"NF4 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"NF4 quantization needs a float weight, got {weight.dtype}")
        out_f, in_f = weight.shape
        self = cls(out_f, in_f, blocksize, double_quant, device=weight.device)
        if weight.is_meta:  # shapes only (qdora.memory builds models on the meta device)
            return self
        if not torch.isfinite(weight).all():
            raise ValueError("NF4 quantization got a weight with NaN or Inf values; check the checkpoint")
        w = weight.detach()
        if self.in_pad != in_f:
            w = torch.nn.functional.pad(w, (0, self.in_pad - in_f))
        packed, state = bnbF.quantize_4bit(w.contiguous(), blocksize=blocksize,
                                           compress_statistics=double_quant, quant_type="nf4")
        self.packed.data = packed.view(out_f, self.in_pad // 2)
        self.absmax.data = state.absmax.view(out_f, -1)
        if double_quant:
            self.absmax2.copy_(state.state2.absmax)
            self.code2.copy_(state.state2.code)
            self.offset.copy_(state.offset)
        return self

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) must move but never cast the packed bytes or their float32 scales.
        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)
        return super()._apply(move_only, recurse)

    def scales(self) -> torch.Tensor:
        """Block scales as float32, shape (out, in_pad // blocksize)."""
        if not self.double_quant:
            return self.absmax
        nested = bnbF.QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE,
                                 dtype=torch.float32)
        flat = bnbF.dequantize_blockwise(self.absmax.reshape(-1), nested) + self.offset
        return flat.view(self.absmax.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor | None = None,
                   scales: torch.Tensor | None = None) -> torch.Tensor:
        """Dense weight (or some of its rows: a slice or an index tensor) in `dtype`, padding columns removed."""
        rows = slice(None) if rows is None else rows
        scales = self.scales() if scales is None else scales
        packed = self.packed[rows]
        n = packed.shape[0]
        state = bnbF.QuantState(absmax=scales[rows].reshape(-1), shape=torch.Size((n, self.in_pad)),
                                blocksize=self.blocksize, quant_type="nf4", dtype=dtype)
        w = bnbF.dequantize_4bit(packed.reshape(-1, 1), state)
        return w if self.in_pad == self.in_features else w[:, : self.in_features]

    def row_scale(self) -> torch.Tensor:
        """A positive float32 scale per row (its largest block scale; 1 for an all-zero row), so
        that squared norms of W0 / row_scale cannot overflow or underflow float32."""
        if self.packed.is_meta:  # shapes only: bitsandbytes' kernels would run (slowly) for nothing
            return torch.empty(self.out_features, device="meta")
        c = self.scales().abs().amax(1)
        return torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))

    def row_chunks(self, dense: torch.Tensor | None = None, chunk_elems: int = 1 << 24):
        """(first row, float32 rows) over the weight, a bounded number of rows at a time, so no
        float32 copy of the whole (out x in) matrix ever exists. Rows come from `dense` (an already
        dequantized W0 in any float dtype) when given, else are dequantized here."""
        step = max(1, chunk_elems // self.in_pad)
        scales = self.scales() if dense is None else None
        for i in range(0, self.out_features, step):
            rows = slice(i, i + step)
            yield i, (self.dequantize(torch.float32, rows, scales) if dense is None else dense[rows].float())

    def row_sq_norms(self, row_scale: torch.Tensor | None = None, chunk_elems: int = 1 << 24) -> torch.Tensor:
        """||W0 / row_scale||^2 per row in float32 (row_scale defaults to 1)."""
        if self.packed.is_meta:
            return torch.empty(self.out_features, device="meta")
        out = []
        for i, w in self.row_chunks(chunk_elems=chunk_elems):
            if row_scale is not None:
                w = w / row_scale[i : i + w.shape[0], None]
            out.append(w.square().sum(1))
        return torch.cat(out)

    def quant_state(self, dtype: torch.dtype = torch.float32) -> "bnbF.QuantState":
        """bitsandbytes' QuantState for these bytes (shape (out, in_pad), nested scales if any)."""
        nested = None
        if self.double_quant:
            nested = bnbF.QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE,
                                     dtype=torch.float32)
        return bnbF.QuantState(absmax=self.absmax.reshape(-1), shape=torch.Size((self.out_features, self.in_pad)),
                               code=bnbF.get_4bit_type("nf4", device=self.packed.device), blocksize=self.blocksize,
                               quant_type="nf4", dtype=dtype, offset=self.offset if self.double_quant else None,
                               state2=nested)

    def to_linear4bit(self, dtype: torch.dtype = torch.float32, bias: torch.Tensor | None = None):
        """A bitsandbytes `Linear4bit` holding these very bytes, for interoperability (PEFT on a 4-bit
        base). Only when in_features is a multiple of the block size: bitsandbytes' flat layout then
        equals ours byte for byte."""
        import bitsandbytes as bnb

        if self.in_pad != self.in_features:
            raise ValueError(f"in_features={self.in_features} is not a multiple of blocksize={self.blocksize}; "
                             f"bitsandbytes' flat layout cannot hold our per-row padding")
        lin = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=bias is not None, compute_dtype=dtype,
                                quant_type="nf4", compress_statistics=self.double_quant, device=self.packed.device)
        lin.weight = bnb.nn.Params4bit(self.packed.reshape(-1, 1).clone(), requires_grad=False,
                                       quant_state=self.quant_state(dtype), blocksize=self.blocksize,
                                       compress_statistics=self.double_quant, quant_type="nf4", bnb_quantized=True)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return lin

    def nbytes(self) -> int:
        """Bytes of everything stored for this weight."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")


class _NF4Linear(torch.autograd.Function):
    """y = x @ W0^T for a frozen NF4 W0, saving only x: W0 is dequantized again in backward
    instead of being kept alive between forward and backward (the point of a 4-bit base)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x @ weight.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.weight.dequantize(grad.dtype), None


def nf4_linear(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """x @ W0^T without keeping the dense W0 alive for backward."""
    return _NF4Linear.apply(x, weight)
