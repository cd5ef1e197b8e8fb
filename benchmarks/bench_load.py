"""Peak host memory of loading a bf16 checkpoint for QDoRA: streaming (qdora.streaming) vs ordinary.

Writes a random Llama-like bf16 checkpoint (a few hundred MB; --hidden/--layers/--vocab) as a
safetensors folder, then loads it for QDoRA in a fresh subprocess per mode and reports the child's
peak resident set size (ru_maxrss) and that peak minus the resident size after imports (what loading
itself adds):

    streaming  build on meta, quantize tensor by tensor (what `qdora train` does by default)
    ordinary   from_pretrained in float32, then prepare_model (low_memory_load=False)

Target (issue 5): streaming peak RSS < 0.35 x checkpoint size + 1 GiB.

    python benchmarks/bench_load.py                 # ~440 MB checkpoint in a temporary folder
    python benchmarks/bench_load.py --keep DIR      # write (or reuse) the checkpoint in DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile

GIB = 2**30


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, mode: str) -> None:
    import torch

    for module in ("accelerate", "transformers.models.llama.modeling_llama"):
        importlib.import_module(module)  # their import cost is counted before the baseline, not as loading

    from qdora.model import AdapterConfig, load_model, prepare_model
    from qdora.streaming import load_prepared

    cfg = AdapterConfig(method="qdora", rank=16)
    base = rss_now()
    if mode == "streaming":
        model, summary = load_prepared(path, cfg, seed=0)
    else:
        model = load_model(path, torch.float32)
        torch.manual_seed(0)
        model, summary = prepare_model(model, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "after_imports": base, "base_bytes": summary.base_bytes}))


def write_checkpoint(path: str, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def measure(path: str, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", path, mode], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", help="folder for the checkpoint (reused if it has one)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    path = args.keep or tmp.name
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_checkpoint(path, args)
    size = checkpoint_bytes(path)
    print(f"checkpoint: {size / 2**20:.0f} MiB bf16 safetensors in {path}")
    print("| load | peak RSS MiB | added by loading MiB | peak / checkpoint size |")
    print("|---|---:|---:|---:|")
    results = {}
    for mode in ("streaming", "ordinary"):
        r = results[mode] = measure(path, mode)
        print(f"| {mode} | {r['peak'] / 2**20:.0f} | {(r['peak'] - r['after_imports']) / 2**20:.0f} | "
              f"{r['peak'] / size:.2f} |")
    bound = 0.35 * size + GIB
    ok = results["streaming"]["peak"] < bound
    print(f"4-bit base: {results['streaming']['base_bytes'] / 2**20:.0f} MiB; target: streaming peak < 0.35 x size + "
          f"1 GiB = {bound / 2**20:.0f} MiB: {'met' if ok else 'NOT met'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
