"""QDoRA vs QLoRA vs full fine-tuning on the same model, data, seed, steps and schedule."""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from .data import load_rows, split_rows
from .model import METHODS, AdapterConfig, resolve_model
from .outdir import prepare_out_dir
from .train import DEFAULT_LR, TrainConfig

# Flags of TrainConfig/AdapterConfig that compare sets per method itself.
PER_METHOD = ("out_dir", "method", "lr")
ERROR = "qdora: error: "  # how cli.main starts the one line it prints for a bad input


@dataclass(frozen=True)
class CompareConfig:
    """Which methods to compare and at which learning rates.

    Args:
        methods: comma-separated subset of qdora, qlora, ft.
        qdora_lr: peak learning rate for QDoRA (default 1e-3).
        qlora_lr: peak learning rate for QLoRA (default 1e-3).
        ft_lr: peak learning rate for full fine-tuning (default 3e-5).
        ft_nf4: also score the fully fine-tuned model quantized to NF4 afterwards ("FT then NF4").
        out_dir: folder for one run per method, compare.md and compare.png (must be empty or absent).
    """

    methods: tuple[str, ...] = METHODS
    qdora_lr: float = DEFAULT_LR["qdora"]
    qlora_lr: float = DEFAULT_LR["qlora"]
    ft_lr: float = DEFAULT_LR["ft"]
    ft_nf4: bool = True
    out_dir: str = "runs/compare"

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, str):
            methods = tuple(m for m in methods.split(",") if m)
        object.__setattr__(self, "methods", tuple(methods))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods {list(self.methods)} must be a non-empty subset of {METHODS}")
        for m in METHODS:
            lr = getattr(self, f"{m}_lr")
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
                raise ValueError(f"{m}_lr must be a number in (0, 1), got {lr!r}")
        if not isinstance(self.ft_nf4, bool):
            raise ValueError(f"ft_nf4 must be true or false, got {self.ft_nf4!r}")


def _flags(*configs) -> list[str]:
    """Command-line flags for every field that differs from its default."""
    out = []
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in PER_METHOD or value == f.default:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            out.append(f"--{f.name}={value}")
    return out


def _run(args: list[str], what: str) -> None:
    """`qdora ARGS` in a fresh interpreter (an argument list, no shell). -P keeps a source checkout's
    kernels/ folder from shadowing the PyPI `kernels` package that bitsandbytes imports. Its stderr
    (progress bars) passes through live; its one error line becomes this command's error."""
    proc = subprocess.Popen([sys.executable, "-P", "-m", "qdora.cli", *args], stderr=subprocess.PIPE)
    error = _relay(proc.stderr, sys.stderr)
    if proc.wait():
        raise RuntimeError(f"{what} failed: {error}" if error else
                           f"{what} failed (exit {proc.returncode}); its output is above")


def _relay(src: BinaryIO, dst: TextIO) -> str | None:
    """Copy `src` to `dst` as it arrives, except a line starting with ERROR, whose text is returned."""
    decode, pending, error = codecs.getincrementaldecoder("utf-8")("replace").decode, "", None
    while True:
        chunk = src.read1(1 << 16)
        *lines, pending = (pending + decode(chunk, final=not chunk)).split("\n")
        if not chunk:
            lines.append(pending)  # the last piece, with no newline after it
        for n, line in enumerate(lines):
            before, found, message = line.partition(ERROR)
            error = message.strip() if found else error
            dst.write(before + ("\n" if (before or not found) and (chunk or n < len(lines) - 1) else ""))
        if not chunk:
            dst.flush()
            return error
        # Hold back only what may be the start of an error line: tqdm's carriage-return updates
        # carry no newline and must show as they come.
        keep = pending.find(ERROR)
        if keep < 0:
            keep = next((i for i in range(max(0, len(pending) - len(ERROR) + 1), len(pending))
                         if ERROR.startswith(pending[i:])), len(pending))
        dst.write(pending[:keep])
        dst.flush()
        pending = pending[keep:]


def _curves(run_dir: str) -> tuple[list, list, list]:
    steps, losses, evals = [], [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps.append(r["step"])
                losses.append(r["loss"])
            elif "eval_accuracy" in r:
                evals.append((r["step"], r["eval_accuracy"]))
    return steps, losses, evals


def compare(cc: CompareConfig, tc: TrainConfig, ac: AdapterConfig) -> dict:
    """Train each method in its own process (so peak memory is its own), score FT then NF4, and
    write compare.md (table) and compare.png (loss and held-out accuracy curves)."""
    resolve_model(tc.model)  # bad model paths and data fail here, before any process starts
    split_rows(load_rows(tc.data), tc.eval_rows, tc.seed, tc.preset)
    prepare_out_dir(cc.out_dir, hint="pass a new folder or remove it")  # compare cannot resume
    shared = _flags(tc, ac)
    rows = {}
    for method in cc.methods:
        run_dir = os.path.join(cc.out_dir, method)
        lr = getattr(cc, f"{method}_lr")
        print(f"== {method} (lr {lr}) -> {run_dir}", flush=True)
        _run(["train", f"--out_dir={run_dir}", f"--method={method}", f"--lr={lr}", *shared], f"training {method}")
        with open(os.path.join(run_dir, "summary.json")) as f:
            rows[method] = json.load(f)
    if cc.ft_nf4 and "ft" in cc.methods:
        print("== FT then NF4", flush=True)
        out = os.path.join(cc.out_dir, "ft", "predictions_eval_nf4.jsonl")
        _run(["eval", f"--run={os.path.join(cc.out_dir, 'ft')}", "--nf4=True", f"--out={out}",
              f"--max_new_tokens={tc.max_new_tokens}", f"--batch_size={tc.eval_batch_size}"], "FT then NF4")
        with open(out) as f:
            flags = [json.loads(line)["correct"] for line in f]
        rows["ft then nf4"] = dict(rows["ft"], accuracy_after=sum(flags) / len(flags))
    table = _table(rows, tc)
    with open(os.path.join(cc.out_dir, "compare.md"), "w") as f:
        f.write(table)
    _plot(cc, rows)
    print(table)
    print(f"wrote {os.path.abspath(cc.out_dir)}/compare.md and compare.png")
    return rows


def _table(rows: dict, tc: TrainConfig) -> str:
    lines = [f"model `{tc.model}`, data `{tc.data}`, {tc.steps} steps x {tc.batch_size * tc.grad_accum} examples, "
             f"seed {tc.seed}, held-out exact match on {tc.eval_rows} problems\n",
             "| method | lr | exact match before | exact match after | final loss | trainable params | "
             "train time (s) | peak memory (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['lr']:g} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | "
                     f"{r['final_loss']:.4f} | {r['trainable_parameters']:,} | {r['train_seconds']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(cc: CompareConfig, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method in cc.methods:
        steps, losses, evals = _curves(os.path.join(cc.out_dir, method))
        ax_loss.plot(steps, losses, label=method, alpha=0.85)
        ax_acc.plot([s for s, _ in evals], [a for _, a in evals], marker="o", label=method)
    if "ft then nf4" in rows:
        last = max(s for s, _ in _curves(os.path.join(cc.out_dir, "ft"))[2])
        ax_acc.scatter([last], [rows["ft then nf4"]["accuracy_after"]], marker="x", s=80, color="black",
                       label="ft then nf4", zorder=3)
    ax_loss.set(xlabel="step", ylabel="training loss (answer tokens)", title="loss")
    ax_acc.set(xlabel="step", ylabel="held-out exact match", title="accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cc.out_dir, "compare.png"), dpi=120)
    plt.close(fig)
