"""One training step (forward + backward + AdamW) of our QDoRA and QLoRA and PEFT's QDoRA and QLoRA, side by side.

The same small Llama (random weights), the same NF4 bytes, rank 16 on every linear layer but the head,
batch 2 x 256 tokens. PEFT runs on bitsandbytes `Linear4bit` layers holding our NF4 bytes; its QLoRA
is a reference row (how fast the same library's plain LoRA is). Every step is what qdora.train runs on
the CPU: fused AdamW, and glibc keeping freed memory (qdora.streaming.keep_freed_memory). Time: the
four models step in turn inside one process (the order rotating every round), median of --repeats, so
machine noise hits all of them alike. Memory: each configuration also runs alone in a fresh
subprocess, which reports its peak resident set size during two training steps (the kernel's
high-water mark is reset after the model is built) and that peak minus the resident size just before
the first step (what training itself adds); twice, with the trainer's allocator policy and with a fixed 64 KiB mmap threshold
(LIVE_MALLOC: RSS then follows live tensors rather than what the heap keeps).
Besides wall time, process CPU time per step is reported: on a shared machine it is far less noisy
(with --threads 1 it is the work done, whatever else runs).

Targets (issue 2): ours QDoRA / ours QLoRA <= 1.10 time, <= 1.05 peak memory; ours QDoRA / PEFT QDoRA
<= 0.60 time.

    python benchmarks/bench_layer.py                  # CPU, bf16 compute
    python benchmarks/bench_layer.py --device cuda    # on a GPU (memory then from torch.cuda)
    python benchmarks/bench_layer.py --profile        # which operators make up QDoRA's extra time
    python benchmarks/bench_layer.py --floor          # QLoRA plus only the passes DoRA cannot avoid
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from qdora.model import AdapterConfig, adapter_layers, prepare_model
from qdora.streaming import keep_freed_memory, trim_heap

CONFIGS = ("qdora", "qlora", "peft-qdora", "peft-qlora")
# glibc keeps freed heap chunks resident and raises its mmap threshold to the largest freed block, so
# peak RSS also counts how the allocator fragmented. With a fixed 64 KiB threshold every tensor of
# consequence is its own mapping, returned on free: peak RSS then follows the live tensors.
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rotated(names, i: int) -> list:
    """The configs in the order of round i, rotated by one each round, so that no config always
    runs first in its round (over a multiple of len(names) rounds, each runs in each place equally
    often)."""
    names = list(names)
    return names[i % len(names):] + names[:i % len(names)]


def build(name: str, args) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    method = "qlora" if name == "qlora" else "qdora"
    model, _ = prepare_model(model, AdapterConfig(method=method, rank=args.rank, alpha=2.0 * args.rank))
    if name.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        layers = adapter_layers(model)
        for qual, layer in layers.items():
            parent, _, child = qual.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.weight.to_linear4bit(torch.bfloat16))
        targets = sorted({q.rsplit(".", 1)[-1] for q in layers})
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=targets, use_dora=name == "peft-qdora"))
    return model.to(args.device).train()


def step_fn(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as qdora.train steps on one device, for all four
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Return freed heap to the OS, then reset the kernel's peak-RSS mark (VmHWM), so that neither
    the peak nor the baseline carries what building (and quantizing) the model left behind."""
    import gc

    gc.collect()
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure_memory(name: str, args) -> dict:
    if args.trainer_malloc:
        keep_freed_memory()
    step = step_fn(build(name, args), args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        for _ in range(2):
            step()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"peak_mb": peak, "added_mb": peak - before}
    reset_peak_rss()
    before = rss_mb()
    for _ in range(2):
        step()
    peak = peak_rss_mb()
    return {"peak_mb": peak, "added_mb": peak - before}


def profile_difference(args, steps: int = 3, rows: int = 15) -> None:
    """Where our QDoRA's extra time goes: both of our models stepped under torch.profiler, operators
    ranked by how much more self time they take in QDoRA than in QLoRA (profiler overhead included,
    so read the shares, not the absolute times)."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for name in ("qdora", "qlora"):
        step = step_fn(build(name, args), args)
        for _ in range(3):  # warm-up: the first steps page in the heap and fill oneDNN's caches
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        totals[name] = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    dora, lora = totals["qdora"], totals["qlora"]
    diff = sorted(((dora.get(k, 0) - lora.get(k, 0), k) for k in dora.keys() | lora.keys()), reverse=True)
    print(f"self CPU ms per step: QDoRA {sum(dora.values()):.1f}, QLoRA {sum(lora.values()):.1f}\n")
    print("| operator | QDoRA - QLoRA ms per step |\n| --- | --- |")
    for ms, key in diff[:rows]:
        print(f"| {key} | {ms:+.2f} |")


def dora_floor(args) -> None:
    """The least any exact QDoRA built on these kernels can add to our QLoRA step: our QLoRA model
    stepped with and without the work that DoRA's formula needs and QLoRA's does not, results
    unchanged:
      forward: W0 A^T on the dequantized weight (the norm's cross term), and applying g to the base
               output (here g = 1, through qdora.adapter_function's own route: the CPU kernel
               dora_apply_ in bf16 where it runs, else the batch-norm pass scale_columns_; with
               g = 1 either changes no value but -0.0);
      backward: g folded into the dequantization, and sum_t grad * out (the magnitude gradient,
               the same route's column dots) at the end of the layer's backward.
    The norm's r x r arithmetic, g itself and the small-g check are left out, so the ratio is a lower
    bound. Our QDoRA steps in the same rotation, for comparison. CPU only: on CUDA our QDoRA takes
    the Triton norm and folds g into the dequantization, which this does not model."""
    from qdora.adapter_function import AdapterFunction, column_dots
    from qdora.dora import LoRALinear, _compute_dtype, _use_cpu_kernels
    from qdora.kernels import cpu_dora

    if args.device != "cpu":
        raise SystemExit("--floor models the CPU path; run it with --device cpu")

    on = {"floor": False}
    pending = {}  # NF4Weight -> the A whose W0 A^T its next dequantization (the forward's) computes
    qlora, qdora = build("qlora", args), build("qdora", args)

    def floor_forward(layer):
        plain = layer.forward

        def forward(x):
            if not on["floor"]:
                return plain(x)
            pending[layer.weight] = layer.lora_A
            dtype = _compute_dtype(x)
            with torch.autocast("cpu", enabled=False):
                x = x.to(dtype)
                kernels = dtype == torch.bfloat16 and _use_cpu_kernels(x.device, bf16=True)
                out = AdapterFunction.apply(x, layer.dropout(x), layer.lora_A, layer.lora_B, None, None, layer.one, None,
                                            layer._bias(dtype), layer.weight, layer.scale, None, None, False, kernels)
            saved = out.detach().reshape(-1, out.shape[-1])
            dots = cpu_dora.column_dots if kernels else column_dots

            def magnitude_grad(grad_in, grad_out) -> None:  # runs right after the layer's backward
                dots(grad_out[0].reshape(saved.shape).contiguous(), saved)
            out.grad_fn.register_hook(magnitude_grad)
            return out
        return forward

    def with_norm_mm(weight, dequantize):
        def wrapped(dtype, *a, **k):
            dense = dequantize(dtype, *a, **k)
            A = pending.pop(weight, None)
            if A is not None:
                dense @ A.to(dense.dtype).T
            return dense
        return wrapped

    for layer in qlora.modules():
        if isinstance(layer, LoRALinear):
            layer.one = torch.ones(layer.out_features, device=args.device)
            layer.weight.dequantize = with_norm_mm(layer.weight, layer.weight.dequantize)
            layer.forward = floor_forward(layer)
    step_qlora = step_fn(qlora, args)  # one model and optimizer; on["floor"] switches DoRA's work on
    steps = {"qlora": step_qlora, "qlora + DoRA's passes": step_qlora, "qdora": step_fn(qdora, args)}
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.repeats + 1):
        for name in rotated(names, i):
            on["floor"] = name == "qlora + DoRA's passes"
            t = time.perf_counter()
            steps[name]()
            if i:  # the first round is warm-up
                times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"median of {args.repeats} steps each, interleaved\n\n| config | step s | / ours QLoRA |\n| --- | --- | --- |")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {t / med['qlora']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="rank the operators by QDoRA's extra time over QLoRA")
    p.add_argument("--floor", action="store_true",
                   help="time our QLoRA with only the passes over memory that DoRA needs added (a lower bound)")
    p.add_argument("--memory-only", choices=CONFIGS, help=argparse.SUPPRESS)  # the subprocess mode
    p.add_argument("--trainer-malloc", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.memory_only:
        keep_freed_memory()  # as qdora.train does for its CPU training loop
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args)))
        return
    if args.profile:
        profile_difference(args)
        return
    if args.floor:
        dora_floor(args)
        return

    steps = {name: step_fn(build(name, args), args) for name in CONFIGS}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in CONFIGS}
    cpu = {name: [] for name in CONFIGS}
    for i in range(args.repeats):
        for name in rotated(CONFIGS, i):
            step = steps[name]
            if args.device == "cuda":
                torch.cuda.synchronize()
            c, t = time.process_time(), time.perf_counter()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    del steps
    memory = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--memory-only", name] + [
            f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "intermediate", "vocab", "rank", "batch",
                                                  "seq", "device", "threads")]
        for key, env in (("default", {}), ("live", LIVE_MALLOC)):
            trainer = [f"--trainer-malloc={int(key == 'default' and args.device == 'cpu')}"]
            out = subprocess.run(cmd + trainer, check=True, capture_output=True, text=True,
                                 env=os.environ | env).stdout
            memory[name, key] = json.loads(out.strip().splitlines()[-1])
    med = {n: statistics.median(t) for n, t in times.items()}
    cmed = {n: statistics.median(t) for n, t in cpu.items()}
    print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
          f"rank {args.rank}, batch {args.batch}x{args.seq}, {args.device} ({torch.get_num_threads()} threads), "
          f"bf16 compute, median of {args.repeats}\n")
    print("| config | step s | min step s | process CPU s | peak MB | added MB | peak MB (live) | added MB (live) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in CONFIGS:
        d, live = memory[n, "default"], memory[n, "live"]
        print(f"| {n} | {med[n]:.3f} | {min(times[n]):.3f} | {cmed[n]:.3f} | {d['peak_mb']:.0f} | {d['added_mb']:.0f} "
              f"| {live['peak_mb']:.0f} | {live['added_mb']:.0f} |")
    mem = lambda a, b, key, kind="default": memory[a, kind][key] / memory[b, kind][key]  # noqa: E731
    print(f"\nours QDoRA / ours QLoRA: time {med['qdora'] / med['qlora']:.3f} (target <= 1.10; process CPU "
          f"{cmed['qdora'] / cmed['qlora']:.3f}), peak memory {mem('qdora', 'qlora', 'peak_mb'):.3f} (target <= 1.05; "
          f"live {mem('qdora', 'qlora', 'peak_mb', 'live'):.3f}), added memory {mem('qdora', 'qlora', 'added_mb'):.3f} "
          f"(live {mem('qdora', 'qlora', 'added_mb', 'live'):.3f})")
    print(f"ours QDoRA / PEFT QDoRA: time {med['qdora'] / med['peft-qdora']:.3f} (target <= 0.60; process CPU "
          f"{cmed['qdora'] / cmed['peft-qdora']:.3f}), peak memory {mem('qdora', 'peft-qdora', 'peak_mb'):.3f}")
    print(f"PEFT QDoRA / PEFT QLoRA: time {med['peft-qdora'] / med['peft-qlora']:.3f}; "
          f"ours QLoRA / PEFT QLoRA: time {med['qlora'] / med['peft-qlora']:.3f}")
    if args.repeats >= 4:  # how far the machine's noise moves the ratio: the same ratio within each round
        paired = [a / b for a, b in zip(times["qdora"], times["qlora"])]
        q1, q2, q3 = statistics.quantiles(paired, n=4)
        print(f"ours QDoRA / ours QLoRA within each round: median {q2:.3f}, quartiles {q1:.3f} to {q3:.3f}, "
              f"{sum(r <= 1.10 for r in paired)} of {len(paired)} rounds <= 1.10")

if __name__ == "__main__":
    main()
