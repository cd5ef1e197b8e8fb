"""qdora export: merged checkpoints against the adapter model, PEFT export/import, bad input.

Tolerances: with float32 compute and a float32 export the merged model's logits are within 1e-5
(relative Frobenius) of the unmerged adapter model's (only summation order differs). A bf16 export
is checked tensor by tensor: each merged weight is exactly the float32 merged_weight() of the
loaded run rounded once to bf16, which also proves the NF4 base was rebuilt bit for bit.
"""

import hashlib
import json
import os
from dataclasses import asdict

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import qdora.export as E
from conftest import STORIES, need
from qdora.checkpoint import load_run, save_adapter
from qdora.cli import main
from qdora.model import AdapterConfig, adapter_layers, load_model, prepare_model
from qdora.nf4 import NF4Weight
from qdora.train import TrainConfig

FP32 = dict(compute_dtype="float32", adapter_dtype="float32")
# Every in_features a multiple of 64, so bitsandbytes' Linear4bit can hold our NF4 bytes (PEFT tests).
TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with stories260K's tokenizer."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(1)
    # bf16 on disk: casting to float32 or bf16 before quantizing then gives the same NF4 bytes
    AutoModelForCausalLM.from_config(TINY).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(need(STORIES)).save_pretrained(path)
    return str(path)


def make_run(base: str, folder, cfg: AdapterConfig, steps: int = 2):
    """A run folder like `qdora train` writes: random nonzero adapters, then a few AdamW steps.
    Returns (run folder, the trained model)."""
    model, _ = prepare_model(load_model(base, torch.float32), cfg)
    nf4_before = {n: m.packed.clone() for n, m in model.named_modules() if isinstance(m, NF4Weight)}
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if layer.rank:
                layer.lora_B.normal_(0, 0.05)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 512, (2, 12))
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.compute_dtype == "bfloat16"):
            model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, m in model.named_modules():  # training never touches the 4-bit base
        if isinstance(m, NF4Weight):
            assert torch.equal(m.packed, nf4_before[n])
    os.makedirs(folder, exist_ok=True)
    save_adapter(model, os.path.join(folder, "adapter"), {"step": steps, "train": asdict(TrainConfig(model=base)),
                                                         "adapter": asdict(cfg)})
    return str(folder), model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def digests(folder) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.endswith(".safetensors") or n.endswith(".json")
            and n != "qdora_export.json"}


CASES = {"qdora": AdapterConfig(rank=4, alpha=8.0, **FP32),
         "qlora": AdapterConfig(method="qlora", rank=4, alpha=8.0, **FP32),
         "magnitude_only": AdapterConfig(rank=4, alpha=8.0, magnitude_only=("v_proj", "down_proj"), **FP32),
         "ft": AdapterConfig(method="ft", **FP32)}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_merged_logits_match_adapter_model(tmp_path, case):
    run, model = make_run(str(need(STORIES)), tmp_path / "run", CASES[case])
    E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "out"), dtype="float32", max_shard_size="300KB"))
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "model-00001-of-00004.safetensors" in files
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(files)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert rel(merged(ids).logits, model.eval()(ids).logits) < 1e-5


def test_bf16_export_is_merged_weight_rounded_once_and_deterministic(tmp_path, monkeypatch):
    """Default bf16 compute on stories260K's float32 checkpoint (so the cast before quantizing
    matters); the streamed export equals load_run's merged weights and the loaded-model path's
    bytes, and exporting twice gives identical files."""
    cfg = AdapterConfig(rank=4, alpha=8.0, magnitude_only=("k_proj",))
    run, _ = make_run(str(need(STORIES)), tmp_path / "run", cfg)
    E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "a")))
    E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "b")))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    monkeypatch.setattr(E, "safetensors_index", lambda name: None)  # force the load_model path
    E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "c")))
    assert digests(tmp_path / "a") == digests(tmp_path / "c")
    model, _, _ = load_run(run)
    layers = adapter_layers(model)
    files = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    for name, layer in layers.items():
        with safe_open(str(tmp_path / "a" / files[name + ".weight"]), "pt") as f:
            got = f.get_tensor(name + ".weight")
        assert got.dtype == torch.bfloat16 and torch.equal(got, layer.merged_weight().to(torch.bfloat16)), name
    with safe_open(str(tmp_path / "a" / files["model.norm.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), model.model.norm.weight.to(torch.bfloat16))


def test_merged_export_generates_in_plain_transformers(tmp_path):
    run, _ = make_run(str(need(STORIES)), tmp_path / "run", AdapterConfig(rank=4, alpha=8.0))
    assert main(["export", f"--run={run}", f"--out_dir={tmp_path / 'out'}"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def bnb_base_like(model, dtype=torch.float32):
    """A plain transformers model whose adapted linears are bnb Linear4bit layers holding our NF4 bytes."""
    theirs = AutoModelForCausalLM.from_config(TINY).float()
    theirs.load_state_dict({k: v for k, v in model.state_dict().items() if k in theirs.state_dict()}, strict=False)
    for name, layer in adapter_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, layer.weight.to_linear4bit(dtype))
    return theirs


@pytest.mark.parametrize("method", ["qdora", "qlora"])
def test_peft_export_loads_in_peft_and_matches(tiny_base, tmp_path, method):
    run, model = make_run(tiny_base, tmp_path / "run", AdapterConfig(method=method, rank=4, alpha=8.0, **FP32))
    E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "peft"), format="peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "qdora") and config["r"] == 4 and config["peft_type"] == "LORA"
    # train mode: bnb's eval-mode forward repacks the bytes on AVX512-BF16 CPUs (see nf4.py)
    theirs = PeftModel.from_pretrained(bnb_base_like(model), str(tmp_path / "peft")).train()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert rel(theirs(ids).logits, model.train()(ids).logits) < 1e-5


def test_peft_dora_adapter_imports_and_merges(tiny_base, tmp_path):
    """A PEFT DoRA adapter with random nonzero factors and magnitudes, on a 4-bit base holding
    the bytes our preparation makes: merging it and converting it both reproduce PEFT's logits."""
    ours, _ = prepare_model(load_model(tiny_base, torch.float32), AdapterConfig(rank=4, alpha=8.0, **FP32))
    peft = get_peft_model(bnb_base_like(ours), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          use_dora=True))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "magnitude" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    peft.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        want = peft.train()(ids).logits
    common = dict(run=str(tmp_path / "peft"), base=tiny_base)
    E.export(E.ExportConfig(out_dir=str(tmp_path / "merged"), dtype="float32", **common))
    E.export(E.ExportConfig(out_dir=str(tmp_path / "ours"), format="qdora", **common))
    meta = json.loads((tmp_path / "ours" / "qdora_config.json").read_text())
    assert meta["adapter"]["method"] == "qdora" and meta["adapter"]["rank"] == 4
    # the imported run trains in bf16 by default; compare in float32
    meta["adapter"].update(FP32)
    (tmp_path / "ours" / "qdora_config.json").write_text(json.dumps(meta))
    model, _, _ = load_run(str(tmp_path / "ours"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert rel(model.train()(ids).logits, want) < 1e-5
    with torch.no_grad():
        assert rel(merged(ids).logits, want) < 1e-5


def test_against_original_equals_nf4_when_base_is_nf4_exact(tiny_base, tmp_path):
    """On a base whose weights are already NF4 values, merging onto the original and onto the
    dequantized NF4 base is the same computation; on an ordinary base they differ."""
    cfg = AdapterConfig(rank=4, alpha=8.0, double_quant=False, **FP32)
    exact = tmp_path / "exact"
    model = load_model(tiny_base, torch.float32)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear) and layer is not model.get_output_embeddings():
                layer.weight.copy_(NF4Weight.quantize(layer.weight, 64, False).dequantize())
    model.save_pretrained(exact)
    run, _ = make_run(str(exact), tmp_path / "run", cfg)
    for against in ("nf4", "original"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / against), dtype="float32", against=against))
    merged = {a: AutoModelForCausalLM.from_pretrained(tmp_path / a, dtype=torch.float32) for a in ("nf4", "original")}
    for (name, p), q in zip(merged["nf4"].named_parameters(), merged["original"].parameters()):
        assert rel(q, p) < 1e-6, name
    run2, _ = make_run(tiny_base, tmp_path / "run2", cfg)
    E.export(E.ExportConfig(run=run2, out_dir=str(tmp_path / "o2"), dtype="float32", against="original"))
    E.export(E.ExportConfig(run=run2, out_dir=str(tmp_path / "n2"), dtype="float32"))
    assert digests(tmp_path / "o2") != digests(tmp_path / "n2")


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory):
    return make_run(str(need(STORIES)), tmp_path_factory.mktemp("srun"), AdapterConfig(rank=4, alpha=8.0))[0]


def test_bad_input_one_line_errors(stories_run, tiny_base, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        ([f"--run={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"], "does not exist"),
        ([f"--run={stories_run}", f"--out_dir={full}"], "is not an empty folder"),
        ([f"--run={stories_run}", f"--out_dir={afile / 'o'}"], "pass a writable out_dir"),
        ([f"--run={stories_run}", f"--out_dir={tmp_path / 'o'}", "--base=/no/such/model"], "does not exist"),
        ([f"--run={stories_run}", f"--out_dir={tmp_path / 'o'}", f"--base={tiny_base}"], "pass the --base"),
        ([f"--run={stories_run}", f"--out_dir={tmp_path / 'o'}", "--max_shard_size=lots"], "is not a size"),
        ([f"--run={stories_run}", f"--out_dir={tmp_path / 'o'}", "--dtype=int8"], "is not one of"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
        assert err.startswith("qdora: error:") and message in err, (argv, err)
    assert not (tmp_path / "o").exists() and (full / "keep").read_text() == "x"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_export_refuses_magnitude_only_and_ft(tiny_base, tmp_path):
    run, _ = make_run(tiny_base, tmp_path / "m", AdapterConfig(rank=4, magnitude_only=("v_proj",), **FP32), steps=0)
    with pytest.raises(ValueError, match="magnitude-only modules .* have no PEFT equivalent"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p"), format="peft"))
    run, _ = make_run(tiny_base, tmp_path / "f", AdapterConfig(method="ft", **FP32), steps=0)
    with pytest.raises(ValueError, match="full fine-tuning run"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p"), format="peft"))
    with pytest.raises(ValueError, match="pass the --base"):  # ft tensors of another model
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p"), base=str(need(STORIES))))
    with pytest.raises(ValueError, match="does not apply to the full fine-tuning run"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p"), against="original"))
    assert not (tmp_path / "p").exists()
    run, _ = make_run(tiny_base, tmp_path / "d", AdapterConfig(rank=4, **FP32), steps=0)
    meta = json.loads((tmp_path / "d" / "adapter" / "qdora_config.json").read_text())
    meta["adapter"]["method"] = "qlora"  # a QDoRA checkpoint labelled as another method
    (tmp_path / "d" / "adapter" / "qdora_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="magnitude tensor, which a qlora layer does not have"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p")))
    (tmp_path / "d" / "adapter" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="the checkpoint is corrupt"):
        E.export(E.ExportConfig(run=run, out_dir=str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()


def test_interrupted_export_leaves_nothing(stories_run, tmp_path, monkeypatch):
    calls = []

    def flaky_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        original(self)

    original = E.ShardWriter.flush
    monkeypatch.setattr(E.ShardWriter, "flush", flaky_flush)
    with pytest.raises(RuntimeError, match="disk full"):
        E.export(E.ExportConfig(run=stories_run, out_dir=str(tmp_path / "out"), max_shard_size="200KB"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("against", ["nf4", "original"])
def test_merge_weight_matches_fp64_formula_with_a_zero_row(against):
    """m * V / ||V||_row with V = W0 + s B A in float64 (W0 from bitsandbytes' dequantize, or the
    original weight); a row of V that is all zeros merges to zeros, never NaN."""
    from qdora.export import merge_weight
    from qdora.nf4 import NF4Weight

    torch.manual_seed(0)
    w = torch.randn(6, 70)
    w[3] = 0
    adapter = AdapterConfig(rank=2, alpha=4.0, compute_dtype="float32")
    B = torch.randn(6, 2)
    B[3] = 0
    parts = {"lora_A": torch.randn(2, 70), "lora_B": B, "magnitude": torch.rand(6) + 0.5}
    got = merge_weight(w, parts, adapter, against)
    w0 = NF4Weight.quantize(w).dequantize(torch.float32) if against == "nf4" else w
    v = w0.double() + 2.0 * parts["lora_B"].double() @ parts["lora_A"].double()
    norm = v.norm(dim=1, keepdim=True)
    want = torch.where(norm > 0, parts["magnitude"].double()[:, None] * v / norm.clamp_min(1e-300), 0.0)
    assert torch.isfinite(got).all() and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
