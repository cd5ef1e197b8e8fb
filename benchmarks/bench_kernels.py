"""Memory traffic (and, on a GPU, speed) of the DoRA row norm and of NF4 dequantization.

For Llama-3-8B projection shapes and LoRA ranks 8-64, the bytes each way of computing the DoRA row norm
||W0 + s B A||_row reads and writes per call, from the shapes and dtypes of the tensors it touches
(NF4Weight is built on the meta device; nothing full-size is allocated). A PyTorch op reads its inputs
and writes its output once.
  fused  `dora_row_norm`. "B/param" counts each tensor once (the HBM minimum); "issued" counts loads as
         the kernel issues them under `norm_launch_config`: A once per BLOCK_M-row block, B and
         row_scale once per split of the in dimension, absmax2 and code2 once per (row, K step).
         With a split in dimension, the (split, out) partials are written and read back by the
         finishing kernel.
  torch  `DoRALinear._norm_torch`: bitsandbytes dequantizes W0 to fp32 in row chunks (written, then
         re-read by chunk @ A^T), then the O(out x r) factored-norm epilogue.
  peft   PEFT's DoRA: bnb dequantize to bf16, B A as lora_B(lora_A(eye(in))), s BA and W0 + s BA
         written, linalg.norm over rows.
Also `nf4_dequantize` (Triton) vs bitsandbytes `dequantize_4bit`, both to bf16. Targets (issue): fused
<= 0.55 bytes per base parameter, PEFT > 6; on a GPU fused >= 4x faster than torch at >= 70% of peak.

    python benchmarks/bench_kernels.py   # byte tables; with a CUDA device also timings
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from qdora.kernels.dora_norm import norm_launch_config
from qdora.nf4 import NF4Weight

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # q/o, k/v, gate/up, down
RANKS = (8, 16, 32, 64)
F32, BF16 = 4, 2


class Traffic(list[tuple[str, int, int]]):
    """Bytes one call reads and writes, itemized as (name, read, written)."""

    def add(self, name: str, read: int = 0, written: int = 0) -> None:
        self.append((name, int(read), int(written)))

    def sums(self) -> tuple[int, int]:
        return sum(i[1] for i in self), sum(i[2] for i in self)

    def total(self) -> int:
        return sum(self.sums())


def storage(out: int, inp: int, bs: int) -> tuple[dict[str, int], int, int]:
    """Bytes of each NF4Weight tensor (meta device), in_pad, number of block scales."""
    w = NF4Weight(out, inp, bs, double_quant=True, device="meta")
    sizes = {n: t.numel() * t.element_size() for n, t in (*w.named_parameters(), *w.named_buffers())}
    return sizes, w.in_pad, w.absmax.numel()


def fused_norm(out: int, inp: int, r: int, fdt: torch.dtype, bs: int, sms: int) -> tuple[Traffic, Traffic]:
    """`dora_row_norm`: (each tensor once, loads as issued)."""
    st, _, _ = storage(out, inp, bs)
    cfg = norm_launch_config(out, inp, bs, r, sms)
    bk, split, row_blocks = cfg["BLOCK_K"], cfg["split"], -(-out // cfg["BLOCK_M"])
    steps = -(-inp // bk)
    loads = out * steps  # block_scale() loads: one per (row, K step)
    once, issued = Traffic(), Traffic()
    for t, o in ((once, True), (issued, False)):
        t.add("packed NF4 bytes", out * steps * bk // 2)
        t.add("absmax uint8, per (row, K step)", st["absmax"] if o else loads)
        t.add("absmax2 fp32, per (row, K step)", st["absmax2"] if o else loads * F32)
        t.add("code2 fp32, per (row, K step)", st["code2"] if o else loads * F32)
        t.add("offset, per (program, K step)", F32 if o else row_blocks * steps * F32)
        t.add("NF4 code hi/lo tables", 2 * 16 * BF16)
        t.add(f"A, x{row_blocks} row blocks", (1 if o else row_blocks) * r * inp * fdt.itemsize)
        t.add(f"B, x{split} splits", (1 if o else split) * out * r * fdt.itemsize)
        t.add(f"row_scale, x{split} splits", (1 if o else split) * out * F32)
        t.add("w0_sq; norm (output)", out * F32, out * F32)
        if split > 1:  # (split, out) partials, added to w0_sq by the finishing kernel (which rereads row_scale)
            t.add(f"partials ({split} splits), finishing kernel", split * out * F32 + (0 if o else out * F32),
                  split * out * F32)
    return once, issued


def bnb_dequant(out: int, inp: int, bs: int) -> Traffic:
    """bitsandbytes dequantize_4bit (nested scales) to bf16: scales to fp32, += offset, 4-bit kernel."""
    st, in_pad, ns = storage(out, inp, bs)
    t = Traffic()
    t.add("dequantize_blockwise: uint8 scales -> fp32", st["absmax"] + st["absmax2"] + st["code2"], ns * F32)
    t.add("scales += offset", ns * F32 + F32, ns * F32)
    t.add("dequantize_4bit -> bf16", st["packed"] + ns * F32 + 16 * F32, out * in_pad * BF16)
    return t


def triton_dequant(out: int, inp: int, bs: int) -> tuple[Traffic, Traffic]:
    """`nf4_dequantize` to bf16: (each tensor once, as issued: absmax2 and code2 per block scale)."""
    st, _, ns = storage(out, inp, bs)
    once, issued = Traffic(), Traffic()
    for t, o in ((once, True), (issued, False)):
        t.add("packed, uint8 scales, NF4 code table", st["packed"] + st["absmax"] + 16 * F32)
        t.add("absmax2, code2, offset", st["absmax2"] + st["code2"] + F32 if o else ns * 2 * F32)
        t.add("output bf16", 0, out * inp * BF16)
    return once, issued


def torch_norm(out: int, inp: int, r: int, fdt: torch.dtype, bs: int) -> Traffic:
    """`DoRALinear._norm_detached` on the PyTorch path: `_norm_torch(A.float(), B.float())`."""
    st, in_pad, ns = storage(out, inp, bs)
    t, orr, o, rr = Traffic(), out * r * F32, out * F32, r * r * F32
    if fdt != torch.float32:
        t.add("A.float(), B.float()", (r * inp + out * r) * fdt.itemsize, (r * inp + out * r) * F32)
    t.add("scales(): dequantize_blockwise, + offset", sum(st[k] for k in ("absmax", "absmax2", "code2")) + ns * F32,
          2 * ns * F32)
    step = max(1, (1 << 24) // in_pad)  # _norm_torch's chunk_elems
    for i in range(0, out, step):
        n = min(step, out - i)
        t.add("dequantize row chunk to fp32", n * in_pad // 2 + n * in_pad // bs * F32, n * in_pad * F32)
        t.add("chunk @ A.T", (n * inp + r * inp) * F32, n * r * F32)
    t.add("torch.cat(W0 A^T chunks)", orr, orr)
    t.add("B / c, W0A^T / c, product, .sum(1)", 5 * orr + 2 * o, 3 * orr + o)
    t.add("A @ A.T", 2 * r * inp * F32, rr)
    t.add("(Bc @ AA^T) * Bc, .sum(1)", 4 * orr + rr, 2 * orr + o)
    t.add("n2 = w0_sq + 2s cross + s^2 quad, clamp, sqrt, * c", 10 * o, 7 * o)
    return t


def peft_norm(out: int, inp: int, r: int, fdt: torch.dtype, bs: int) -> Traffic:
    """PEFT `DoraLinearLayer.forward`'s norm: get_lora_weight, dequantize_module_weight, get_weight_norm."""
    e, n = fdt.itemsize, out * inp  # eye and B A take lora_A's dtype
    t = Traffic()
    t.add("torch.eye(in)", 0, inp * inp * e)
    t.add("lora_A(eye)", inp * inp * e + r * inp * e, inp * r * e)
    t.add("lora_B(...) = (B A)^T", inp * r * e + out * r * e, n * e)
    if e != BF16:
        t.add("lora_weight.to(bf16)", n * e, n * BF16)
    t += bnb_dequant(out, inp, bs)
    t.add("scaling * lora_weight; W0 + s BA", 3 * n * BF16, 2 * n * BF16)
    t.add("linalg.norm(dim=1)", n * BF16, out * BF16)
    return t


def traffics(out: int, inp: int, r: int, fdt: torch.dtype, bs: int, sms: int) -> dict[str, Traffic]:
    (fused, fused_issued), (dq, dq_issued) = fused_norm(out, inp, r, fdt, bs, sms), triton_dequant(out, inp, bs)
    return {"fused": fused, "fused_issued": fused_issued, "torch": torch_norm(out, inp, r, fdt, bs),
            "peft": peft_norm(out, inp, r, fdt, bs), "dequant_triton": dq, "dequant_triton_issued": dq_issued,
            "dequant_bnb": bnb_dequant(out, inp, bs)}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def mb(t: Traffic) -> str:
    return "{:.1f} / {:.1f}".format(*(x / 1e6 for x in t.sums()))


def byte_tables(shapes: list[tuple[int, int]], ranks: list[int], fdt: torch.dtype, bs: int, sms: int,
                breakdown: str) -> None:
    print(f"## DoRA row norm: MB read / written per call, bytes per base parameter "
          f"(A, B {str(fdt).removeprefix('torch.')}, blocksize {bs}, launch config for {sms} SMs)\n")
    rows, dq_rows, ok = [], [], [0, 0]
    for out, inp in shapes:
        for r in ranks:
            t, n = traffics(out, inp, r, fdt, bs, sms), out * inp
            b = {k: v.total() / n for k, v in t.items()}
            ok = [ok[0] + (b["fused"] <= 0.55), ok[1] + (b["peft"] > 6)]
            rows.append([f"{out}x{inp}", str(r), mb(t["fused"]), f"{b['fused']:.3f}", f"{b['fused_issued']:.3f}",
                         mb(t["torch"]), f"{b['torch']:.2f}", mb(t["peft"]), f"{b['peft']:.2f}",
                         f"{b['peft'] / b['fused']:.0f}x"])
        dq_rows.append([f"{out}x{inp}", mb(t["dequant_triton"]), f"{b['dequant_triton']:.3f}",
                        f"{b['dequant_triton_issued']:.3f}", mb(t["dequant_bnb"]), f"{b['dequant_bnb']:.3f}"])
    print(markdown(["out x in", "r", "fused MB r/w", "fused B/param", "fused B/param issued", "torch MB r/w",
                    "torch B/param", "PEFT MB r/w", "PEFT B/param", "PEFT / fused"], rows))
    print(f"\nTargets: fused <= 0.55 B/param in {ok[0]}/{len(rows)} rows; PEFT > 6 B/param in {ok[1]}/{len(rows)}.")
    print("\n## NF4 dequantization to bf16: MB read / written, bytes per parameter\n")
    print(markdown(["out x in", "Triton MB r/w", "Triton B/param", "Triton B/param issued", "bnb MB r/w",
                    "bnb B/param"], dq_rows))
    if breakdown:
        shape, rank = breakdown.split(":")
        out, inp, r = *map(int, shape.split("x")), int(rank)
        once, issued = fused_norm(out, inp, r, fdt, bs, sms)
        print(f"\n## Fused norm itemized, {out}x{inp} rank {r}: {norm_launch_config(out, inp, bs, r, sms)}\n")
        print(markdown(["tensor", "bytes read (once)", "bytes written", "bytes read as issued"],
                       [[a[0], f"{a[1]:,}", f"{a[2]:,}", f"{b[1]:,}"] for a, b in zip(once, issued)]))


def cuda_ms(fn: Callable[[], object], warmup: int, iters: int, graph: bool = False) -> float:
    """Median milliseconds of fn over `iters` runs (torch.cuda.Event), L2 flushed before each. With
    `graph`, fn is captured once in a CUDA graph and its replays are timed (no Python or launch overhead)."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record(), fn(), end.record(), torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_paths(out: int, inp: int, r: int, fdt: torch.dtype, bs: int, device: str) -> dict[str, Callable[[], object]]:
    """Callables for one random layer: fused, torch, peft (if installed), dequant_triton, dequant_bnb."""
    import bitsandbytes.functional as bnbF

    from qdora.dora import NORM_EPS, DoRALinear
    from qdora.kernels.dora_norm import dora_row_norm
    from qdora.kernels.nf4_dequant import nf4_dequantize

    torch.manual_seed(0)
    weight = NF4Weight.quantize(torch.randn(out, inp, device=device, dtype=torch.bfloat16) * 0.02, bs)
    layer = DoRALinear(weight, None, r, 2.0 * r, dtype=fdt)
    layer.lora_B.data.normal_(std=0.01)
    A, B, s, qs = layer.lora_A, layer.lora_B, layer.scale, weight.quant_state(torch.bfloat16)
    paths: dict[str, Callable[[], object]] = {
        "fused": lambda: dora_row_norm(weight, layer.w0_sq, A, B, s, NORM_EPS, layer.row_scale),
        "torch": lambda: layer._norm_torch(A.float(), B.float()),
        "dequant_triton": lambda: nf4_dequantize(weight, torch.bfloat16),
        "dequant_bnb": lambda: bnbF.dequantize_4bit(weight.packed.reshape(-1, 1), qs)}
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.utils.integrations import dequantize_module_weight
    except ImportError:
        return paths
    lin4, dora = weight.to_linear4bit(torch.bfloat16), DoraLinearLayer(fan_in_fan_out=False)
    la = torch.nn.Linear(inp, r, bias=False, device=device, dtype=fdt)
    lb = torch.nn.Linear(r, out, bias=False, device=device, dtype=fdt)
    la.weight.data, lb.weight.data = A.data, B.data
    paths["peft"] = lambda: dora.get_weight_norm(dequantize_module_weight(lin4).to(torch.bfloat16),
                                                 dora.get_lora_weight(la, lb).detach(), s)
    return paths


def timings(shapes: list[tuple[int, int]], ranks: list[int], fdt: torch.dtype, bs: int, sms: int, peak: float,
            warmup: int, iters: int, graph: bool, device: str = "cuda") -> None:
    print(f"\n## Timings on {torch.cuda.get_device_name()}{' (CUDA graph replays)' if graph else ''}: "
          f"median ms of {iters}, L2 flushed; "
          f"GB/s = bytes (each tensor once) / time, % of {peak:g} GB/s\n")
    rows, dq_rows, ok = [], [], [0, 0]
    for out, inp in shapes:
        for i, r in enumerate(ranks):
            paths, t = make_paths(out, inp, r, fdt, bs, device), traffics(out, inp, r, fdt, bs, sms)
            with torch.no_grad():
                ref = paths["torch"]()
                err = ((paths["fused"]() - ref).abs() / ref).max().item()
                ms = {k: cuda_ms(f, warmup, iters, graph) for k, f in paths.items() if i == 0 or "dequant" not in k}
            del paths
            gbs = {k: t[k].total() / v / 1e6 for k, v in ms.items()}
            cell = {k: [f"{ms[k]:.3f}", f"{gbs[k]:.0f} ({100 * gbs[k] / peak:.0f}%)"] for k in ms}
            ok = [ok[0] + (ms["torch"] / ms["fused"] >= 4), ok[1] + (gbs["fused"] >= 0.7 * peak)]
            rows.append([f"{out}x{inp}", str(r), *cell["fused"], *cell["torch"], *cell.get("peft", ["-", "-"]),
                         f"{ms['torch'] / ms['fused']:.1f}x",
                         f"{ms['peft'] / ms['fused']:.1f}x" if "peft" in ms else "-", f"{err:.1e}"])
            if i == 0:
                dq_rows.append([f"{out}x{inp}", *cell["dequant_triton"], *cell["dequant_bnb"],
                                f"{ms['dequant_bnb'] / ms['dequant_triton']:.2f}x"])
            torch.cuda.empty_cache()
    print(markdown(["out x in", "r", "fused ms", "fused GB/s", "torch ms", "torch GB/s", "PEFT ms", "PEFT GB/s",
                    "torch / fused", "PEFT / fused", "max rel diff fused vs torch"], rows))
    print(f"\nTargets: fused >= 4x faster than torch in {ok[0]}/{len(rows)} rows; "
          f"fused >= 70% of peak in {ok[1]}/{len(rows)}.\n\n### NF4 dequantization to bf16\n")
    print(markdown(["out x in", "Triton ms", "Triton GB/s", "bnb ms", "bnb GB/s", "bnb / Triton"], dq_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN ...")
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--factor-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="dtype of A and B")
    p.add_argument("--num-sms", type=int, default=132, help="SMs for the launch config without CUDA (H100 SXM: 132)")
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="peak HBM bandwidth in GB/s (H100 SXM: 3350)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays (no Python/launch overhead)")
    p.add_argument("--breakdown", default="4096x4096:16", help="OUTxIN:RANK to itemize ('' for none)")
    args = p.parse_args()
    shapes = [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.shapes]
    fdt, bs, cuda = getattr(torch, args.factor_dtype), args.blocksize, torch.cuda.is_available()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else args.num_sms
    byte_tables(shapes, args.ranks, fdt, bs, sms, args.breakdown)
    if cuda:
        timings(shapes, args.ranks, fdt, bs, sms, args.peak_gbs, args.warmup, args.iters, args.cuda_graph)
    else:
        print("\nNo CUDA device, so no timings: on a GPU the same command also times each path "
              "(torch.cuda.Event, median of --iters) and prints GB/s, % of --peak-gbs and fused speedup.")


if __name__ == "__main__":
    main()
