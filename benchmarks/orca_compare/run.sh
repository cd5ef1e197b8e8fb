#!/usr/bin/env bash
# QDoRA vs QLoRA vs full FT (and FT then NF4) on the same budget, with the table and plot kept here.
#   bash benchmarks/orca_compare/run.sh            # both comparisons below (about 15 minutes on 2 CPU cores)
# 1. the embedded default: SmolLM2-135M-Instruct on generated math word problems;
# 2. the real stories260K Llama on GSM8K (../shared/data, beside the checkout).
# On a GPU, for the real thing (Answer.AI's Orca-Math protocol):
#   qdora compare --model meta-llama/Meta-Llama-3-8B --data microsoft/orca-math-word-problems-200k \
#       --preset answerai-orca --max_length 1024 --steps 1000 --device cuda --out_dir runs/orca
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="${RUNS:-runs/orca_compare}"
rm -rf "$runs"

qdora compare --out_dir "$runs/default"
cp "$runs/default/compare.md" "$here/default.md"
cp "$runs/default/compare.png" "$here/default.png"

shared="$(cd "$here/../.." && pwd)/../shared/data"
qdora compare --model "$shared/stories260K" --data "$shared/gsm8k/train.jsonl" --steps 60 --batch_size 16 \
    --max_length 512 --eval_rows 100 --max_new_tokens 64 --qdora_lr 3e-3 --qlora_lr 3e-3 --ft_lr 1e-3 \
    --out_dir "$runs/stories260k"
cp "$runs/stories260k/compare.md" "$here/stories260k_gsm8k.md"
cp "$runs/stories260k/compare.png" "$here/stories260k_gsm8k.png"
