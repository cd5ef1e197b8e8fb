"""LoRA and DoRA adapters on a frozen NF4 base weight (QLoRA and QDoRA)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from . import norm_cache
from .adapter_function import G_RECOMPUTE, AdapterFunction
from .kernels import cpu_dora
from .nf4 import NF4Weight, nf4_linear
from .norm_cache import cache_hit, stamp

NORM_MODES = ("detached", "exact")
KERNEL_BACKENDS = ("auto", "torch", "triton")
# Squared row norms (of rows divided by their row scale) are clamped here before the square root:
# a row of W0 + s*B@A that is all zeros gets norm 1e-6 instead of 0, so m / norm stays finite.
NORM_EPS = 1e-12
# Row chunk of W0 dequantized to float32 for W0 @ A^T on the PyTorch path (1 MiB: few calls, in cache).
NORM_CHUNK_ELEMS = 1 << 18
# Public here, where DoRALinear's caches live (see qdora.norm_cache).
invalidate_norm_caches = norm_cache.invalidate_norm_caches




def kernel_backend() -> str:
    """Which kernels DoRA uses: QDORA_KERNELS=auto|torch|triton (default auto: Triton on CUDA, the
    C++ kernels of kernels/cpu_dora.py on the CPU where they are built; torch: plain PyTorch). One
    switch for the whole process."""
    value = os.environ.get("QDORA_KERNELS", "auto")
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"QDORA_KERNELS={value!r} is not one of {KERNEL_BACKENDS}")
    return value


def _use_triton(device: torch.device) -> bool:
    backend = kernel_backend()
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def _use_cpu_kernels(device: torch.device, bf16: bool) -> bool:
    """Whether DoRA's CPU kernels run here: QDORA_KERNELS=auto, a CPU tensor, the library built and,
    for the two bf16 passes (`bf16`), a CPU with AVX512-BF16."""
    if device.type != "cpu" or kernel_backend() != "auto":
        return False
    return cpu_dora.available() if bf16 else cpu_dora.norm_available()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoRALinear(nn.Module):
    """QLoRA: y = x W0^T + s * dropout(x) A^T B^T + bias, with W0 frozen in NF4.

    A (r x in) starts Kaiming-uniform and B (out x r) at zero, so the adapter starts as the
    identity edit; s = alpha / r. Set `rank=0` for no LoRA factors (used by magnitude-only DoRA).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None, rank: int, alpha: float,
                 dropout: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.weight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank if rank else 0.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = weight.packed.device
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as LoRA uses
        else:
            self.lora_A = self.lora_B = None

    def __setattr__(self, name: str, value) -> None:
        # A replacement NF4 base must fit the adapter; DoRALinear then recomputes what it derives
        # from W0 (_weight_replaced).
        replacing = name == "weight" and "weight" in self._modules
        if replacing and not (isinstance(value, NF4Weight)
                              and (value.out_features, value.in_features) == (self.out_features, self.in_features)):
            got = (f"NF4Weight of shape ({value.out_features}, {value.in_features})"
                   if isinstance(value, NF4Weight) else type(value).__name__)
            raise ValueError(f"{type(self).__name__}.weight must be an NF4Weight of shape "
                             f"({self.out_features}, {self.in_features}), got {got}")
        super().__setattr__(name, value)
        if replacing:
            self._weight_replaced()

    def _weight_replaced(self) -> None:
        """Called after `layer.weight = other NF4Weight`; QLoRA derives nothing from W0."""

    def _lora(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dropout(x) A^T B^T in `dtype` (without the scale s)."""
        return (self.dropout(x) @ self.lora_A.to(dtype).T) @ self.lora_B.to(dtype).T

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if not self.rank:
                out = nf4_linear(x, self.weight)
                return out if self.bias is None else out + self._bias(dtype)
            return AdapterFunction.apply(x, self.dropout(x), self.lora_A, self.lora_B, None, None, None, None,
                                          self._bias(dtype), self.weight, self.scale)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """s * B @ A in float32 (zeros without LoRA factors)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, device=self.weight.packed.device)
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight this layer applies, W0 + s*B@A, in float32; `base` replaces the
        dequantized NF4 W0 (export's "merge against the original weights")."""
        w0 = self.weight.dequantize(torch.float32) if base is None else base.float()
        return w0 + self.delta()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, bias={self.bias is not None}"


class DoRALinear(LoRALinear):
    """QDoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):

        V  = W0 + s * B @ A                       direction, with W0 frozen in NF4
        W' = m * V / ||V||_row                    m: trainable magnitude, one per output row
        y  = x W'^T + bias

    m starts at ||W0||_row of the *dequantized* NF4 weight, so at init W' = W0. The row norm never
    needs V itself: ||V_i||^2 = ||W0_i||^2 + 2 s B_i . (W0 A^T)_i + s^2 B_i (A A^T) B_i^T, where
    ||W0||^2_row is a constant computed once and the rest needs only W0 @ A^T (out x r) and A @ A^T
    (r x r), accumulated in fp32 and clamped at NORM_EPS before the square root.

    With g = m / ||V|| (fp32) the output is y = g * base + dropout(x) A^T (diag(g) s B)^T with
    base = x W0^T, in one pass over the output and one addmm, or with g folded into the dequantization
    of W0 when the norm needs no dense W0 (see AdapterFunction); when g = 1 and B = 0 the output
    equals the NF4 base output bit for bit.

    norm_mode="detached" (default, paper section 4.3) treats ||V|| as a constant in backward: the
    gradient reaches A and B only through the numerator. The norm then changes only when A or B
    change, so it is computed once per optimizer step and reused by every gradient-accumulation
    micro-step and activation-checkpoint recomputation, as is the check on g = m / ||V|| (cached
    for the very A, B and m tensors, their storage and version counters, and the optimizer-step
    count: see qdora.norm_cache.stamp; in-place writes through `.data` need invalidate_norm_caches).
    norm_mode="exact" differentiates through the norm as well (paper eq. 6).
    rank=0 gives a magnitude-only module (V = W0, only m trains; the paper's Table 6 mixes these);
    its norm is a constant, computed once.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None, rank: int, alpha: float,
                 dropout: float = 0.0, dtype: torch.dtype = torch.bfloat16,
                 norm_mode: str = "detached") -> None:
        super().__init__(weight, bias, rank, alpha, dropout, dtype)
        if norm_mode not in NORM_MODES:
            raise ValueError(f"DoRA norm_mode {norm_mode!r} is not one of {NORM_MODES}")
        self.norm_mode = norm_mode
        # Norms are computed on rows divided by row_scale (then multiplied back), so any finite
        # weight, however large or small, has a finite norm.
        self.register_buffer("row_scale", weight.row_scale(), persistent=False)
        self.register_buffer("w0_sq", self._w0_sq_norms(), persistent=False)
        self.magnitude = nn.Parameter(self._norm_from_wa(None, None, None).to(dtype))
        # (stamp, inputs, norm) and (stamp, (m, norm), rows): see norm_cache.stamp, _cached_norm, _gain.
        self._norm_cache: tuple | None = None
        self._rows_cache: tuple | None = None
        self._loading_weight = False
        self.register_load_state_dict_post_hook(DoRALinear._after_load)

    def _drop_caches(self) -> None:
        self._norm_cache = self._rows_cache = None

    def __getstate__(self) -> dict:
        # Pickling (torch.save of the module, deepcopy) leaves the caches out: a copy's parameters
        # are other tensors.
        return {**super().__getstate__(), "_norm_cache": None, "_rows_cache": None}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Under FSDP2 loading writes the sharded parameters, which the caches' stamps do not see.
        self._drop_caches()
        self._loading_weight = any(k.startswith(prefix + "weight.") for k in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _after_load(self: "DoRALinear", incompatible_keys) -> None:
        """Loaded NF4 bytes (the child `weight`, loaded after this module's own tensors) bring their
        own row scales and ||W0||^2, which are not in any state dict. Under FSDP2 the bytes are
        row shards; there they must be the ones the model was built from."""
        loaded, self._loading_weight = self._loading_weight, False
        if loaded:
            self._refresh_constants()

    def _weight_replaced(self) -> None:
        # `layer.weight = other`: its row scales and ||W0||^2 replace the old ones; m is trained and
        # stays as it is (at B = 0 the layer then applies m * W0_new / ||W0_new||).
        self._drop_caches()
        self._refresh_constants()

    def _refresh_constants(self) -> None:
        """row_scale and ||W0||^2 from the current NF4 bytes (no state dict carries them). Not for
        FSDP2 row shards, which must be the bytes the model was built from."""
        if hasattr(self.weight.packed, "to_local"):
            return
        with torch.no_grad():
            self.row_scale.copy_(self.weight.row_scale())
            self.w0_sq.copy_(self._w0_sq_norms())

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) casts the adapters as asked but keeps the norm constants in float32.
        keep = {id(self.w0_sq), id(self.row_scale)}

        def fp32_constants(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if id(t) in keep and out.dtype != t.dtype else out
        self._drop_caches()  # _apply may set param.data (same object, same version) or swap tensors
        return super()._apply(fp32_constants, recurse)

    def _w0_sq_norms(self) -> torch.Tensor:
        if _use_triton(self.weight.packed.device):
            from qdora.kernels.dora_norm import nf4_row_sq_norms
            return nf4_row_sq_norms(self.weight, self.row_scale)
        return self.weight.row_sq_norms(self.row_scale)

    def _norm_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the norm is computed from (row_scale and the NF4 weight are constants, as is w0_sq)."""
        return (self.w0_sq, self.lora_A, self.lora_B) if self.rank else (self.w0_sq,)

    def _cached_norm(self) -> torch.Tensor | None:
        """The detached norm if A and B are unchanged since it was computed, else None (also when it
        was computed under torch.inference_mode and this forward is not: autograd cannot save it)."""
        cache = self._norm_cache
        if not cache_hit(cache, self._norm_inputs(), steps=self.rank > 0):
            return None
        norm = cache[2]
        return None if norm.is_inference() and not torch.is_inference_mode_enabled() else norm

    @torch.no_grad()
    def _norm_detached(self) -> torch.Tensor:
        """||V||_row in fp32, no graph; recomputed only after an optimizer step or an in-place edit."""
        norm = self._cached_norm()
        if norm is None:
            norm = self._compute_norm()
            self._fix_overflowed_rows(norm)
        return norm

    def _compute_norm(self, dense: torch.Tensor | None = None, A_c: torch.Tensor | None = None) -> torch.Tensor:
        """||V||_row in fp32, computed now and cached, overflowed rows not yet repaired
        (_fix_overflowed_rows). Called under torch.no_grad() (by forward and _norm_detached), so that
        the forward pays for one such block, not one per helper. `dense`, when given, is W0 already
        dequantized for this forward, reused for W0 @ A^T, and `A_c` is A already cast to its dtype."""
        A, B = self.lora_A, self.lora_B
        if not self.rank:
            norm = self._norm_from_wa(None, None, None)
        elif _use_triton(A.device):
            from qdora.kernels.dora_norm import dora_row_norm
            norm = dora_row_norm(self.weight, self.w0_sq, A, B, self.scale, NORM_EPS, self.row_scale)
        else:
            norm = self._norm_torch(A, B, dense, A_c)
        inputs = self._norm_inputs()
        self._norm_cache = (stamp(inputs, steps=self.rank > 0), inputs, norm)
        return norm

    @torch.no_grad()
    def _fix_overflowed_rows(self, norm: torch.Tensor) -> bool:
        """Rows whose factored norm overflowed (inf or NaN), in place: row_scale follows W0 alone, so
        a row where s B A dwarfs a tiny W0 (say 1e-30) squares past float32. Those rows of V in
        float64. Whether there were any (a magnitude-only norm is ||W0||, always finite)."""
        if not self.rank or torch.isfinite(norm).all():
            return False
        rows = (~torch.isfinite(norm)).nonzero().squeeze(1)
        v = self.weight.dequantize(torch.float32, rows=rows).double()
        v += self.scale * self.lora_B[rows].double() @ self.lora_A.double()
        norm[rows] = v.norm(dim=1).float()
        return True

    def _norm_torch(self, A: torch.Tensor, B: torch.Tensor, dense: torch.Tensor | None = None,
                    A_c: torch.Tensor | None = None) -> torch.Tensor:
        """Factored row norm in fp32, no graph. W0 @ A^T is one matmul on `dense` (W0 in
        the compute dtype, from this forward) when given: fp32 accumulation, each of the out x r
        results rounded once to that dtype (a relative 2^-9 on the cross term in bf16, ~3e-5 on the
        norm, far under bf16's own rounding). Otherwise it runs over float32 row chunks dequantized
        from NF4, each small enough to stay in cache (never an out x in fp32 copy). On the CPU the
        rest is one call into kernels/cpu_dora.py when that library is built (same formula)."""
        if dense is not None:
            if A_c is None or A_c.dtype != dense.dtype:
                A_c = A.to(dense.dtype)
            wa = F.linear(dense, A_c)
        else:
            Af = A.float()
            wa = torch.cat([w @ Af.T for _, w in self.weight.row_chunks(chunk_elems=NORM_CHUNK_ELEMS)])
        if _use_cpu_kernels(wa.device, bf16=False):
            return cpu_dora.row_norm(wa, A, B, self.w0_sq, self.row_scale, self.scale, NORM_EPS)
        return self._norm_from_wa(wa.float(), A.float(), B.float())

    def _norm_from_wa(self, wa: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None) -> torch.Tensor:
        """c * sqrt(max(||W0/c||^2 + (s/c) (B/c).(2 W0 A^T + s B A A^T), eps)), c = row_scale: the
        squared norm ||W0||^2 + 2s B.(W0 A^T) + s^2 B (A A^T) B^T of rows divided by c. Dividing by c
        once before and once after the dot product (not twice before) keeps the terms finite until
        the sum, where s^2 B A A^T B^T >= 0 dominates any overflow: such a row comes out +inf (g = 0
        in exact mode; _fix_overflowed_rows recomputes it), not the NaN of inf - inf."""
        if wa is None:
            return self._unscale(self.w0_sq)
        c = self.row_scale
        t = torch.addmm(wa, B, F.linear(A, A), beta=2, alpha=self.scale)
        n2 = torch.addcdiv(self.w0_sq, torch.linalg.vecdot(B / c.unsqueeze(1), t), c, value=self.scale)
        return self._unscale(n2)

    def _unscale(self, n2: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Row norms from squared norms of rows divided by c (row_scale): clamp, root, scale back."""
        return n2.clamp_min(NORM_EPS).sqrt() * (self.row_scale if c is None else c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if self.norm_mode == "exact" and self.rank:
                return self._forward_exact(x, dtype)
            x_drop = self.dropout(x) if self.rank else x
            dense = A_c = None
            # Without LoRA factors, or with the Triton norm (read from NF4), the norm never needs
            # W0 dequantized, so g is folded into the output's dequantization. The choice does not
            # depend on the cache, so a checkpoint's recomputation repeats the forward bit for bit.
            fold = not self.rank or _use_triton(x.device)
            cpu_kernels = not fold and dtype == torch.bfloat16 and _use_cpu_kernels(x.device, bf16=True)
            with torch.no_grad():  # one block for all of the norm's work (A_c too needs no graph)
                norm = self._cached_norm()
                fresh = norm is None
                if fresh:
                    if self.rank:
                        A_c = self.lora_A.to(dtype)
                        if not fold:
                            dense = self.weight.dequantize(dtype)  # one dequantization for the norm and the output
                    norm = self._compute_norm(dense, A_c)  # _gain repairs it
                g, rows = self._gain(norm, repair=fresh)
            return AdapterFunction.apply(x, x_drop, self.lora_A, self.lora_B, self.magnitude, norm, g, rows,
                                          self._bias(dtype), self.weight, self.scale, dense, A_c, fold, cpu_kernels)

    def _gain(self, norm: torch.Tensor, repair: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g = m / ||V|| (float32, no graph) and the rows with |g| < G_RECOMPUTE (None when there are
        none). One reduction covers the common case: a non-finite norm (overflow) makes its g 0 or
        NaN, so it fails the same check. With `repair` (a norm computed by this forward, not yet
        saved by any backward) such rows are repaired in the cache before g is recomputed; a cached
        norm was repaired when it was computed, so whatever is left there (a NaN factor) stays.
        The check reads g on the host (on a GPU, a synchronization), so its result is kept until m or
        the norm change: gradient-accumulation micro-steps and activation-checkpoint recomputation
        reuse it, and only the first forward after an optimizer step waits for it (under FSDP2 too:
        its all-gathers refill the same parameters). It is kept for this m and this norm tensor,
        stamped as the norm is (qdora.norm_cache.stamp). Called under torch.no_grad() (by forward)."""
        g = torch.div(self.magnitude, norm)
        inputs = (self.magnitude, norm)
        if not repair and cache_hit(self._rows_cache, inputs, steps=True):
            return g, self._rows_cache[2]
        rows = None
        if not torch.amin(g).item() >= G_RECOMPUTE:  # NaN fails it too
            if repair and self._fix_overflowed_rows(norm):
                g = torch.div(self.magnitude, norm)
            rows = (g.abs() < G_RECOMPUTE).nonzero().squeeze(1)
            rows = rows if rows.numel() else None
        self._rows_cache = (stamp(inputs, steps=True), inputs, rows)
        return g, rows

    def _forward_exact(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        A, B = self.lora_A.float(), self.lora_B.float()
        # W0 @ A^T through nf4_linear, so backward re-dequantizes W0 instead of keeping it alive.
        g = self.magnitude.float() / self._norm_from_wa(nf4_linear(A, self.weight).T, A, B)
        base = nf4_linear(x, self.weight)
        lora = self._lora(x, dtype)
        out = base + ((g - 1) * base.float() + (g * self.scale) * lora.float()).to(dtype)
        return out if self.bias is None else out + self._bias(dtype)

    @torch.no_grad()
    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight this layer applies, m * V / ||V||_row, in float32 (`base` as in
        LoRALinear.merged_weight; its rows are rescaled by their own largest value)."""
        v = super().merged_weight(base)
        c = self.row_scale if base is None else torch.where(v.abs().amax(1) > 0, v.abs().amax(1), 1.0)
        norm = self._unscale((v / c[:, None]).square().sum(1), c)
        return v * (self.magnitude.float() / norm)[:, None]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_mode={self.norm_mode}"
