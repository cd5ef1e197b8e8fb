"""The DoRA layer's CPU kernels (cpu_dora.cpp): their build, launchers and plain-PyTorch references.

Eager PyTorch applies DoRA's per-column gain g = m / ||V|| with one pass over the (tokens x out)
activations and adds the low-rank term with a second (addmm_), and computes the magnitude's gradient
with a third (batch norm's backward); each pass right after a large matmul also pays for the cache
it finds evicted. The kernels here do each job in one pass:

    dora_apply_   y = g * y + bias + ax Bs^T    (bf16, in place, float32 arithmetic rounded once)
    column_dots   sum_t a[t] * (b[t] - shift)   (bf16 in, float32 sums)
    row_norm      DoRA's factored row norm from W0 A^T, A and B, without PyTorch's dozen small calls

Measured at 512 tokens, 1024 -> 2816, right after the matmul that made y: 278 us against 418 for
batch norm then addmm_; column_dots 157 against 269. The library is compiled on first use with
torch.utils.cpp_extension (a C++ compiler and ninja; about 10 s, then cached on disk), for any
x86-64 CPU: the AVX512-BF16 functions carry their own target attribute and `available()` asks the
CPU. When it cannot be built, qdora warns once and keeps to the PyTorch path (QDORA_KERNELS=torch
selects that path outright: qdora.dora.kernel_backend).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_dora.cpp")


@functools.cache
def _library():
    """torch.ops.qdora_cpu, built and loaded once per process, or None (with one warning) when it
    cannot be built here."""
    try:
        from torch.utils.cpp_extension import load
        # at::parallel_for is inlined here: with torch's OpenMP build it needs -fopenmp to run in parallel
        openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
        # Named for the torch build too: a library built against another torch must not be loaded.
        load(name="qdora_cpu_" + re.sub(r"\W", "_", torch.__version__), sources=[str(SOURCE)],
             extra_cflags=["-O3", *openmp], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compile error: the PyTorch path still works
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])[:300]
        tools = shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")
        fix = ("set QDORA_KERNELS=torch to silence this" if tools else
               "install a C++ compiler and `pip install ninja`, or set QDORA_KERNELS=torch to silence this")
        warnings.warn(f"qdora: could not build its CPU kernels ({reason}); using the slower PyTorch path: {fix}.",
                      RuntimeWarning, stacklevel=3)
        return None
    return torch.ops.qdora_cpu


def norm_available() -> bool:
    """Whether row_norm can run (it needs only the library)."""
    return _library() is not None


@functools.cache
def _cpu_has_bf16() -> bool:
    return _library().supported()


def available() -> bool:
    """Whether dora_apply_ and column_dots can run: the library built and a CPU with AVX512-BF16."""
    return norm_available() and _cpu_has_bf16()


def dora_apply_(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, ax: torch.Tensor,
                Bs: torch.Tensor) -> torch.Tensor:
    """y = g * y + bias + ax Bs^T per output column, written over y and returned. y (..., out) and
    ax (..., r) contiguous bf16, Bs (out, r) bf16, g and bias float32 (out,)."""
    return _library().dora_apply_(y, g, bias, ax, Bs)


def dora_apply_reference(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, ax: torch.Tensor,
                         Bs: torch.Tensor) -> torch.Tensor:
    """dora_apply_ in float64, rounded once to y's dtype (a new tensor)."""
    out = g.double() * y.double() + (ax.reshape(-1, ax.shape[-1]).double() @ Bs.double().T).view(y.shape)
    return (out if bias is None else out + bias.double()).to(y.dtype)


def column_dots(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t a[t] * (b[t] - shift) per column of two contiguous bf16 (..., n), in float32."""
    return _library().column_dots(a, b, shift)


def column_dots_reference(a: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """column_dots in float64."""
    a2, b2 = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return (a2 * (b2 if shift is None else b2 - shift.double())).sum(0)


def row_norm(wa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w0_sq: torch.Tensor, c: torch.Tensor,
             scale: float, eps: float) -> torch.Tensor:
    """c * sqrt(max(w0_sq + (s/c) (B/c).(2 wa + s B A A^T), eps)) per row, in float32: the norm of
    W0 + s B A from wa = W0 A^T and w0_sq = ||W0 / c||^2 (qdora.dora.DoRALinear._norm_from_wa)."""
    return _library().dora_norm(wa, A, B, w0_sq, c, scale, eps)


def row_norm_reference(wa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w0_sq: torch.Tensor, c: torch.Tensor,
                       scale: float, eps: float) -> torch.Tensor:
    """row_norm's formula in float64, the same order of operations."""
    A, B, c = A.double(), B.double(), c.double()
    t = 2 * wa.double() + scale * B @ (A @ A.T)
    n2 = w0_sq.double() + scale * ((B / c[:, None]) * t).sum(1) / c
    return (n2.clamp_min(eps).sqrt() * c).float()
