"""Predicted per-rank peak GPU memory (GiB) of the shipped configs: QLoRA vs QDoRA (vs full FT).

    python -P benchmarks/memory.py [--seq_len 2048] [--batch_size 1]

Rank 16 on every linear layer, activation checkpointing, one GPU; then each config on two ranks
with FSDP2 and CPU offload (GPU and host RAM per rank). Prints Markdown. Takes a few seconds: the
models are built on the meta device (qdora.memory), no weights are read.
"""

import argparse

from qdora.memory import GiB, SHIPPED, load_config, predict
from qdora.model import AdapterConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=1)
    args = ap.parse_args()
    run = dict(seq_len=args.seq_len, batch_size=args.batch_size, checkpointing=True)
    print(f"{args.batch_size} x {args.seq_len} tokens, rank 16, all linear layers, activation checkpointing\n")
    print("| config | QLoRA, 1 GPU | QDoRA, 1 GPU | QDoRA - QLoRA | full FT, 1 GPU | QDoRA, 2 ranks + offload: GPU / host per rank |")
    print("|---|---|---|---|---|---|")
    for name in SHIPPED:
        cfg = load_config(name)
        qlora = predict(cfg, AdapterConfig(method="qlora"), **run)["gpu_total"] / GiB
        qdora = predict(cfg, AdapterConfig(method="qdora"), **run)["gpu_total"] / GiB
        ft = predict(cfg, AdapterConfig(method="ft"), **run)["gpu_total"] / GiB
        two = predict(cfg, AdapterConfig(method="qdora"), world_size=2, offload=True, **run)
        print(f"| {name} | {qlora:.2f} | {qdora:.2f} | {qdora - qlora:+.2f} | {ft:.1f} | "
              f"{two['gpu_total'] / GiB:.2f} / {two['host_total'] / GiB:.2f} |")


if __name__ == "__main__":
    main()
