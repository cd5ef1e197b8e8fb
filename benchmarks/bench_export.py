"""Peak host memory of `qdora export` (merged, streamed) on a random Llama of a few hundred MB.

Target (issue 4): the export's peak resident memory above the process' baseline after imports
stays under 1.5 x one shard + one layer, where one layer is the largest base tensor in float32
(the merge's working set is a few float32 copies of one weight). The export runs in a fresh
subprocess which reads ru_maxrss right after its imports (baseline) and after the export (peak).

    python -P benchmarks/bench_export.py                       # ~330 MB bf16 base, 100MB shards
    python -P benchmarks/bench_export.py --layers 16 --shard 200MB
    python -P benchmarks/bench_export.py --against     # merged onto NF4 vs onto the original (~3-7 min)

--against trains QDoRA briefly on stories260K (float32 checkpoint) with GSM8K rows and compares the
two float32 merged exports: logits, and answer-token loss on the training rows and on held-out rows.

The base and a QDoRA run with random nonzero adapters are built once under --work (kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(2)
import qdora.export as E
from transformers import AutoConfig, AutoTokenizer  # imported by the export's last step
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
t0 = time.time()
E.export(E.ExportConfig(run=sys.argv[1], out_dir=sys.argv[2], max_shard_size=sys.argv[3]))
print(json.dumps({"baseline": base, "peak": rss(), "seconds": time.time() - t0}))
"""

MAKE = r"""
import os, sys
from dataclasses import asdict
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from qdora.checkpoint import save_adapter
from qdora.model import AdapterConfig, adapter_layers, prepare_model
from qdora.train import TrainConfig
work, layers, hidden, inter, vocab = sys.argv[1], *map(int, sys.argv[2:6])
cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
base = os.path.join(work, "base")
model.save_pretrained(base)
adapter = AdapterConfig(rank=16, alpha=32.0)
model, _ = prepare_model(model, adapter)
with torch.no_grad():
    for layer in adapter_layers(model).values():
        layer.lora_B.normal_(0, 0.01)
os.makedirs(os.path.join(work, "run"))
save_adapter(model, os.path.join(work, "run", "adapter"),
             {"step": 1, "train": asdict(TrainConfig(model=base)), "adapter": asdict(adapter)})
"""


def answer_nll(model, tokenizer, rows) -> float:
    """Mean next-token loss on the answer tokens of (question, answer) rows, prompted as in training."""
    import torch

    from qdora.data import encode_rows

    examples, _ = encode_rows(rows, tokenizer, 512)
    total = count = 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def against_demo(work: str, steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdora.cli import main as qdora
    from qdora.data import load_rows
    from qdora.export import ExportConfig, export
    from qdora.model import AdapterConfig, find_targets
    from qdora.nf4 import NF4Weight

    torch.manual_seed(0)
    stories, gsm = "/work/shared/data/stories260K", "/work/shared/data/gsm8k/train.jsonl"
    work = os.path.join(work, "against")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    lines = [line for line in open(gsm).read().splitlines() if len(line) < 330]
    for name, part in (("train", lines[:64]), ("held", lines[64:96])):
        with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
            f.write("\n".join(part) + "\n")
    run = os.path.join(work, "run")
    assert qdora(["train", f"--model={stories}", f"--data={work}/train.jsonl", f"--out_dir={run}", f"--steps={steps}",
                  "--batch_size=8", "--eval_rows=0", "--lr=1e-2", "--warmup=2", "--max_length=512", "--rank=8"]) == 0
    models = {}
    for against in ("nf4", "original"):
        export(ExportConfig(run=run, out_dir=os.path.join(work, against), dtype="float32", against=against))
        models[f"merged onto {against}"] = AutoModelForCausalLM.from_pretrained(os.path.join(work, against),
                                                                                dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    models["base original"] = base
    nf4 = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32)
    with torch.no_grad():
        for name in find_targets(nf4, AdapterConfig().targets):
            w = nf4.get_submodule(name).weight
            w.copy_(NF4Weight.quantize(w.to(torch.bfloat16)).dequantize())
    models["base nf4"] = nf4
    tok = AutoTokenizer.from_pretrained(stories)
    tok.pad_token = tok.pad_token or tok.eos_token
    train_rows, held = load_rows(f"{work}/train.jsonl"), load_rows(f"{work}/held.jsonl")
    from qdora.data import encode_rows

    examples = encode_rows(held, tok, 512)[0][:8]
    with torch.no_grad():  # logits over 8 held-out examples, concatenated
        logits = {k: torch.cat([m(torch.tensor([ids])).logits[0].double() for ids, _ in examples])
                  for k, m in models.items()}

    def rel(a, b):
        return ((logits[a] - logits[b]).norm() / logits[b].norm()).item()

    print(f"QDoRA rank 8, {steps} steps on 64 GSM8K rows, stories260K (float32 base, bf16 compute)")
    print(f"rel logit diff, merged onto original vs onto nf4: {rel('merged onto original', 'merged onto nf4'):.4f}")
    print(f"rel logit diff, base original vs base nf4:        {rel('base original', 'base nf4'):.4f}")
    print(f"rel logit diff, merged onto nf4 vs base nf4:      {rel('merged onto nf4', 'base nf4'):.4f}")
    print("| model | answer loss, 64 training rows | answer loss, 32 held-out rows |")
    print("|---|---|---|")
    for k, m in models.items():
        print(f"| {k} | {answer_nll(m, tok, train_rows):.4f} | {answer_nll(m, tok, held):.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/qdora_bench_export")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="100MB")
    p.add_argument("--against", action="store_true", help="compare merging onto NF4 vs onto the original base")
    p.add_argument("--steps", type=int, default=60, help="training steps of the --against run")
    args = p.parse_args()
    if args.against:
        return against_demo(args.work, args.steps)
    shape = f"{args.layers}-{args.hidden}-{args.intermediate}-{args.vocab}"
    work = os.path.join(args.work, shape)
    if not os.path.isdir(os.path.join(work, "run")):
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        subprocess.run([sys.executable, "-P", "-c", MAKE, work, str(args.layers), str(args.hidden),
                        str(args.intermediate), str(args.vocab)], check=True)
        tok = "/work/shared/data/stories260K"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(tok, name)):
                shutil.copy(os.path.join(tok, name), os.path.join(work, "base", name))
    out = os.path.join(work, "export")
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-P", "-c", CHILD, os.path.join(work, "run"), out, args.shard],
                         check=True, capture_output=True, text=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])

    from safetensors import safe_open

    base_files = [f for f in os.listdir(os.path.join(work, "base")) if f.endswith(".safetensors")]
    largest, total = 0, 0
    for name in base_files:
        with safe_open(os.path.join(work, "base", name), "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                largest, total = max(largest, 4 * n), total + 2 * n
    shards = [os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")]
    from qdora.export import parse_size

    shard = parse_size(args.shard)
    extra = stats["peak"] - stats["baseline"]
    bound = 1.5 * shard + largest
    mb = 1e6
    print(f"base {total / mb:.0f} MB bf16 ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}); "
          f"export {len(shards)} shards, largest {max(shards) / mb:.0f} MB, {stats['seconds']:.1f} s")
    print(f"baseline RSS after imports {stats['baseline'] / mb:.0f} MB; peak {stats['peak'] / mb:.0f} MB; "
          f"export adds {extra / mb:.0f} MB")
    print(f"one shard {shard / mb:.0f} MB + one layer (largest tensor in fp32) {largest / mb:.0f} MB; "
          f"target 1.5 x shard + layer = {bound / mb:.0f} MB; ratio {extra / (shard + largest):.2f} x (shard + layer) "
          f"-> {'PASS' if extra <= bound else 'FAIL'}")


if __name__ == "__main__":
    main()
