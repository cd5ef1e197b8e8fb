"""Weight-decomposition analysis of fine-tuning (DoRA paper, Liu et al. 2024, section 3.2).

The paper writes a weight as W = m V / ||V||_c with ||.||_c the norm of each column of W (d x k)
and m in R^(1 x k): one magnitude per column. Its reference code and PEFT keep one magnitude per
*output feature* of nn.Linear (lora_magnitude_vector has out_features entries, the norm is taken
over dim 1 of the (out x in) weight), so the paper's columns are the rows of torch's layout, as
in qdora.dora. Here, per weight of out rows w_n (n = 1..out):

    dM = mean_n | ||w_n^tuned|| - ||w_n^base|| |                       (eq. 3)
    dD = mean_n (1 - cos(w_n^tuned, w_n^base))                          (eq. 4)

computed in float64, 1 - cos as ||a/|a| - b/|b|||^2 / 2 (no cancellation for tiny changes). The
paper plots dD (x) against dM (y) per layer and module (its Figure 2) and reads the sign of their
correlation: negative for FT and DoRA, positive for LoRA (magnitude and direction move together).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import CONFIG, adapter_config
from .export import EXPORT_INFO, as_trained
from .model import AdapterConfig, _matches, load_model
from .nf4 import NF4Weight
from .outdir import check_new_out_dir, staged_folder
from .streaming import read_tensors, safetensors_index

_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)\.weight$")
_MARKERS = "osv^DPX*<>ph"


@dataclass(frozen=True)
class AnalyzeConfig:
    """Which models to compare and where to write the results.

    Args:
        base: the pre-trained model (Hugging Face folder with *.safetensors, read tensor by tensor;
            other models are loaded whole).
        tuned: one or more fine-tuned models of the same architecture, comma-separated (e.g.
            merged QDoRA, QLoRA and FT exports); one scatter plot each.
        out_dir: folder for analysis.csv, analysis.json and one PNG per tuned model (absent or empty).
        labels: names for the tuned models, comma-separated (default: their folder names).
        modules: only weights whose module name matches one of these patterns, comma-separated
            (e.g. q_proj,v_proj as the paper plots); default every 2-D weight inside numbered layers.
        nf4_base: compare against the base as NF4-quantized and dequantized, as the run was
            (compute dtype, blocksize and double quantization from a `qdora export` folder's
            qdora_export.json; else qdora's defaults: bf16, 64, on): use it for exports merged
            against the NF4 base (QDoRA/QLoRA), which changed W0_nf4, not the original weights.
            Weights equal to the base (as is, or as training cast it) are left out: not adapted.
    """

    base: str
    tuned: tuple[str, ...]
    out_dir: str
    labels: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    nf4_base: bool = False

    def __post_init__(self) -> None:
        for name in ("tuned", "labels", "modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(p for p in value.split(",") if p))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if not self.out_dir:
            raise ValueError("out_dir is empty; pass the folder to write, e.g. --out_dir=analysis")
        if not self.tuned:
            raise ValueError("tuned is empty; pass one or more fine-tuned model folders, comma-separated")
        if self.labels and len(self.labels) != len(self.tuned):
            raise ValueError(f"{len(self.labels)} labels for {len(self.tuned)} tuned models; give one each")
        for pattern in self.modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None


class TensorSource:
    """Random access to a model's tensors by checkpoint key: per-tensor reads from a local
    safetensors folder, else the state dict of the model loaded whole."""

    def __init__(self, name: str) -> None:
        self.files = safetensors_index(name)
        self.state = None
        if self.files is None:
            self.state = load_model(name, torch.float32).state_dict()
        self.keys = list(self.files if self.files is not None else self.state)

    def get(self, key: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[key]
        return read_tensors(self.files, [key])[key]


def decomposition_change(base: torch.Tensor, tuned: torch.Tensor, chunk_elems: int = 1 << 22) -> tuple[float, float]:
    """(dM, dD) of eqs. 3 and 4 for one (out x in) weight, one magnitude per output row, in float64
    over row chunks. A zero row has direction change 0 against a zero row, 1 against any other."""
    if base.shape != tuned.shape or base.dim() != 2:
        raise ValueError(f"weights of shape {tuple(base.shape)} and {tuple(tuned.shape)} cannot be compared")
    step = max(1, chunk_elems // base.shape[1])
    dm = dd = 0.0
    for i in range(0, base.shape[0], step):
        a, b = base[i : i + step].double(), tuned[i : i + step].double()
        na, nb = a.norm(dim=1), b.norm(dim=1)
        dm += (nb - na).abs().sum().item()
        ua = a / torch.where(na > 0, na, 1.0)[:, None]
        ub = b / torch.where(nb > 0, nb, 1.0)[:, None]
        dd += 0.5 * (ua - ub).square().sum().item()
        dd += 0.5 * ((na > 0) != (nb > 0)).sum().item()  # zero vs nonzero row: 0.5 above + 0.5 = 1
    return dm / base.shape[0], dd / base.shape[0]


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation (nan for fewer than two points or a constant series)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])


def _plot(rows: list[dict], label: str, r: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = sorted({row["module"] for row in rows})
    layers = [row["layer"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, module in enumerate(modules):
        sel = [row for row in rows if row["module"] == module]
        sc = ax.scatter([s["delta_d"] for s in sel], [s["delta_m"] for s in sel], c=[s["layer"] for s in sel],
                        cmap="viridis", vmin=min(layers), vmax=max(layers), marker=_MARKERS[i % len(_MARKERS)],
                        label=module, edgecolors="k", linewidths=0.3)
    fig.colorbar(sc, ax=ax, label="layer")
    ax.set_xlabel("ΔD (mean 1 - cos per output feature)")
    ax.set_ylabel("ΔM (mean |Δ norm| per output feature)")
    ax.set_title(f"{label}: Pearson r(ΔD, ΔM) = {r:.2f}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trained_with(path: str) -> AdapterConfig:
    """The adapter configuration of the run a `qdora export` folder was merged from (its
    qdora_export.json, or for older exports the run folder it names); qdora's defaults otherwise."""
    info_path = os.path.join(path, EXPORT_INFO)
    if not os.path.isfile(info_path):
        return AdapterConfig()
    with open(info_path) as f:
        info = json.load(f)
    if "adapter" in info:
        return adapter_config(info["adapter"])
    run_config = os.path.join(info.get("run", ""), CONFIG)
    if os.path.isfile(run_config):
        with open(run_config) as f:
            return adapter_config(json.load(f)["adapter"])
    return AdapterConfig()


def _compare(base: TensorSource, tuned: TensorSource, cfg: AnalyzeConfig, label: str,
             adapter: AdapterConfig) -> list[dict]:
    rows = []
    keys = [k for k in tuned.keys if _LAYER.search(k) and k in base.keys
            and (not cfg.modules or any(_matches(_LAYER.search(k).group(2), p) for p in cfg.modules))]
    for key in tqdm(keys, desc=f"analyze {label}", unit="tensor"):
        t = tuned.get(key)
        if t.dim() != 2 or not t.is_floating_point():
            continue
        b = base.get(key)
        if b.shape != t.shape:
            raise ValueError(f"{key} has shape {tuple(t.shape)} in {label!r} but {tuple(b.shape)} in the base; "
                             f"pass the base model it was fine-tuned from")
        if torch.equal(b.to(t.dtype), t) or torch.equal(as_trained(b, adapter).to(t.dtype), t):
            continue  # untouched by fine-tuning (not adapted): the base as is or as training cast it
        if cfg.nf4_base:
            b = NF4Weight.quantize(as_trained(b, adapter), adapter.blocksize, adapter.double_quant)
            b = b.dequantize(torch.float32)
        dm, dd = decomposition_change(b, t)
        m = _LAYER.search(key)
        rows.append({"run": label, "key": key, "layer": int(m.group(1)), "module": m.group(2),
                     "delta_m": dm, "delta_d": dd})
    return rows


def analyze(cfg: AnalyzeConfig) -> dict:
    """dM and dD per layer and module of each tuned model against the base, their Pearson
    correlation, and a Figure-2-style scatter plot per tuned model.

    Returns {label: {"pearson", "n", "rows"}}; writes analysis.csv, analysis.json and <label>.png.
    """
    check_new_out_dir(cfg.out_dir)
    base = TensorSource(cfg.base)
    labels = cfg.labels or tuple(os.path.basename(os.path.normpath(t)) for t in cfg.tuned)
    if len(set(labels)) != len(labels):
        raise ValueError(f"tuned models need distinct labels, got {labels}; pass --labels")
    results, all_rows = {}, []
    for path, label in zip(cfg.tuned, labels):
        rows = _compare(base, TensorSource(path), cfg, label, trained_with(path))
        if not rows:
            raise ValueError(f"{path!r} has no layer weight that differs from the base {cfg.base!r} "
                             f"(matching modules {cfg.modules or 'all'}); is it the right pair of models?")
        r = pearson([row["delta_d"] for row in rows], [row["delta_m"] for row in rows])
        results[label] = {"pearson": r, "n": len(rows), "rows": rows}
        all_rows += rows
    with staged_folder(cfg.out_dir, "analyze") as tmp:
        with open(os.path.join(tmp, "analysis.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
        with open(os.path.join(tmp, "analysis.json"), "w") as f:
            json.dump({"base": cfg.base, "nf4_base": cfg.nf4_base, "runs": results}, f, indent=2)
        for label, res in results.items():
            name = re.sub(r"[^\w.-]", "_", label) + ".png"
            _plot(res["rows"], label, res["pearson"], os.path.join(tmp, name))
    for label, res in results.items():
        print(f"{label}: {res['n']} weights, Pearson r(ΔD, ΔM) = {res['pearson']:.3f}")
    print(f"wrote analysis.csv, analysis.json and plots to {os.path.abspath(cfg.out_dir)}")
    return results
