"""qdora analyze: dM and dD (DoRA paper eqs. 3-4) on synthetic weights with known changes, against
a direct float64 computation (1 - cos written the naive way); Pearson r against numpy; outputs."""

import csv
import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import STORIES, need
from qdora.analyze import AnalyzeConfig, analyze, decomposition_change, pearson
from qdora.checkpoint import save_adapter
from qdora.cli import main
from qdora.export import ExportConfig, as_trained, export
from qdora.model import AdapterConfig, adapter_layers, load_model, prepare_model
from qdora.nf4 import NF4Weight
from qdora.train import TrainConfig

LAYERS, MODULES = 3, {"self_attn.q_proj": (32, 48), "self_attn.v_proj": (16, 48), "mlp.down_proj": (48, 40)}


def direct(base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float]:
    """Eqs. 3 and 4 per output row (torch's rows = the paper's columns), naive float64."""
    a, b = base.double(), tuned.double()
    dm = (b.norm(dim=1) - a.norm(dim=1)).abs().mean().item()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return dm, (1 - cos).mean().item()


def save(folder, tensors):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return str(folder)


@pytest.fixture()
def models(tmp_path):
    """A base and three tuned models: rows rescaled only, rows rotated only (norms kept), both."""
    g = torch.Generator().manual_seed(0)
    base, scaled, rotated, general = {}, {}, {}, {}
    for i in range(LAYERS):
        for name, (out, inp) in MODULES.items():
            key = f"model.layers.{i}.{name}.weight"
            w = torch.randn(out, inp, generator=g, dtype=torch.float64)
            base[key] = w
            scaled[key] = w * torch.empty(out, 1, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
            q, _ = torch.linalg.qr(torch.eye(inp, dtype=torch.float64)
                                   + 0.1 * (i + 1) * torch.randn(inp, inp, generator=g, dtype=torch.float64))
            rotated[key] = w @ q  # an orthogonal map of each row: norms unchanged, directions turned
            general[key] = w * (1 + 0.2 * torch.randn(out, 1, generator=g, dtype=torch.float64)) \
                + 0.3 * torch.randn(out, inp, generator=g, dtype=torch.float64)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(48, dtype=torch.float64)
    base["model.embed_tokens.weight"] = torch.randn(10, 48, generator=g, dtype=torch.float64)
    out = {}
    for label, tuned in (("base", base), ("scaled", scaled), ("rotated", rotated), ("general", general)):
        full = {**base, **tuned}
        out[label] = save(tmp_path / label, {k: v.float() for k, v in full.items()})
        out[label + "_tensors"] = {k: v.float() for k, v in full.items()}
    return out


def test_known_changes_against_direct_float64(models, tmp_path):
    res = analyze(AnalyzeConfig(base=models["base"], tuned=(models["scaled"], models["rotated"], models["general"]),
                                out_dir=str(tmp_path / "out")))
    assert set(res) == {"scaled", "rotated", "general"}
    for label, r in res.items():
        assert r["n"] == LAYERS * len(MODULES)  # norms, embeddings and unchanged weights left out
        for row in r["rows"]:
            want = direct(models["base_tensors"][row["key"]], models[label + "_tensors"][row["key"]])
            assert math.isclose(row["delta_m"], want[0], rel_tol=1e-9, abs_tol=1e-12), row
            assert math.isclose(row["delta_d"], want[1], rel_tol=1e-6, abs_tol=1e-12), row
    assert all(row["delta_d"] < 1e-12 and row["delta_m"] > 0.1 for row in res["scaled"]["rows"])
    assert all(row["delta_m"] < 1e-5 and row["delta_d"] > 1e-3 for row in res["rotated"]["rows"])
    for r in res.values():
        x, y = [row["delta_d"] for row in r["rows"]], [row["delta_m"] for row in r["rows"]]
        assert math.isclose(r["pearson"], np.corrcoef(x, y)[0, 1], rel_tol=1e-9)
        xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        assert math.isclose(r["pearson"], torch.corrcoef(torch.stack([xt, yt]))[0, 1].item(), rel_tol=1e-9)
    out = tmp_path / "out"
    for label in res:
        png = (out / f"{label}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    rows = list(csv.DictReader(open(out / "analysis.csv")))
    assert len(rows) == 3 * LAYERS * len(MODULES) and {r["run"] for r in rows} == set(res)
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["runs"]["general"]["pearson"] == pytest.approx(res["general"]["pearson"])


def test_tiny_direction_changes_keep_precision():
    """1 - cos of ~1e-13 is resolved to ~1e-9 relative; the reference is 2 sin^2(theta / 2) with theta
    from atan2(|perpendicular part|, cos), which has no cancellation for small angles."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g, dtype=torch.float64)
    tuned = w + 1e-6 * torch.randn(8, 64, generator=g, dtype=torch.float64)
    dm, dd = decomposition_change(w, tuned)
    ua, ub = w / w.norm(dim=1, keepdim=True), tuned / tuned.norm(dim=1, keepdim=True)
    cos = (ua * ub).sum(1)
    theta = torch.atan2((ub - cos[:, None] * ua).norm(dim=1), cos)
    exact = (2 * torch.sin(theta / 2) ** 2).mean().item()
    assert 0 < exact < 1e-11 and math.isclose(dd, exact, rel_tol=1e-8)
    zero = torch.zeros(2, 4)
    one = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0]])
    assert decomposition_change(zero, zero) == (0.0, 0.0) and decomposition_change(zero, one) == (0.5, 0.5)


def test_pearson_degenerate():
    assert math.isnan(pearson([1.0], [2.0])) and math.isnan(pearson([1.0, 1.0], [1.0, 2.0]))
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.1]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.1])[0, 1])


def test_cli_modules_filter_and_bad_input(models, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["analyze", f"--base={models['base']}", f"--tuned={models['general']}", f"--out_dir={out}",
                 "--modules=q_proj,v_proj", "--labels=dora"]) == 0
    rows = list(csv.DictReader(open(out / "analysis.csv")))
    assert len(rows) == 2 * LAYERS and {r["module"] for r in rows} == {"self_attn.q_proj", "self_attn.v_proj"}
    other = save(tmp_path / "other", {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4)})
    cases = [([f"--tuned={tmp_path / 'nope'}"], "does not exist"),
             ([f"--tuned={other}"], "pass the base model it was fine-tuned from"),
             ([f"--tuned={models['base']}"], "has no layer weight that differs"),
             ([f"--tuned={models['general']}", "--labels=a,b"], "2 labels for 1 tuned"),
             ([f"--tuned={models['general']}", f"--out_dir={out}"], "is not an empty folder")]
    for argv, message in cases:
        full = ["analyze", f"--base={models['base']}", *argv]
        if not any(a.startswith("--out_dir") for a in argv):
            full.append(f"--out_dir={tmp_path / 'bad'}")
        assert main(full) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("qdora: error:") and message in err, (argv, err)
    assert not (tmp_path / "bad").exists()


def test_nf4_base_of_a_restricted_export_reports_only_adapted_weights(tmp_path):
    """Review S10: a merged export of a run adapting q_proj only (blocksize 128, no double
    quantization) against stories260K's float32 base. --nf4_base must leave out the weights the
    run did not adapt (exported as a plain cast, not NF4) and quantize the adapted ones as that run
    did (its configuration read from the export's qdora_export.json), not with qdora's defaults."""
    base = str(need(STORIES))
    cfg = AdapterConfig(rank=4, alpha=8.0, targets=("q_proj",), blocksize=128, double_quant=False)
    torch.manual_seed(0)
    model, _ = prepare_model(load_model(base, torch.float32), cfg)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
    (tmp_path / "run").mkdir()
    save_adapter(model, str(tmp_path / "run" / "adapter"),
                 {"step": 1, "train": asdict(TrainConfig(model=base)), "adapter": asdict(cfg)})
    export(ExportConfig(run=str(tmp_path / "run"), out_dir=str(tmp_path / "merged")))
    res = analyze(AnalyzeConfig(base=base, tuned=(str(tmp_path / "merged"),), out_dir=str(tmp_path / "out"),
                                nf4_base=True))
    rows = res["merged"]["rows"]
    q_proj = sorted(n + ".weight" for n in adapter_layers(model))
    assert sorted(row["key"] for row in rows) == q_proj  # nothing the run left unadapted
    shard = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(shard.values()) == {"model-00001-of-00001.safetensors"}
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as fb, \
            safe_open(str(tmp_path / "merged" / "model-00001-of-00001.safetensors"), "pt") as ft:
        for row in rows:
            w0 = NF4Weight.quantize(as_trained(fb.get_tensor(row["key"]), cfg), 128, False).dequantize(torch.float32)
            want = decomposition_change(w0, ft.get_tensor(row["key"]))
            assert row["delta_m"] == pytest.approx(want[0], rel=1e-12) and row["delta_d"] == pytest.approx(
                want[1], rel=1e-12), row["key"]
