"""Adapters in PEFT's format (adapter_config.json + adapter_model.safetensors): import one into
qdora's naming, write one from a run (loadable with peft.PeftModel.from_pretrained on the 4-bit
base), and write a run back as a qdora adapter folder. Safetensors only: nothing is unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from safetensors.torch import save_file

from .checkpoint import CONFIG, TENSORS, Run, SafetensorsFile
from .model import AdapterConfig

PEFT_CONFIG, PEFT_TENSORS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def read_peft(path: str, base: str | None = None) -> Run:
    """Import a PEFT LoRA or DoRA adapter (safetensors only: we never unpickle) into qdora's naming."""
    with open(os.path.join(path, PEFT_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path!r} holds a {cfg.get('peft_type')} adapter; only PEFT LoRA/DoRA can be imported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path!r} uses per-module rank_pattern/alpha_pattern, which qdora does not support")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * rank ** 0.5  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
    model = base or cfg.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"{path!r} names no base_model_name_or_path; pass --base")
    tensors = {}
    for key, t in SafetensorsFile(os.path.join(path, PEFT_TENSORS)).items():
        name = key.removeprefix(PEFT_PREFIX)
        for ours, theirs in _SUFFIX.items():
            if name.endswith("." + theirs) or name.endswith(f".{theirs}.weight"):
                module = name[: name.rindex("." + theirs.split(".")[0])]
                tensors[f"{module}.{ours}"] = t.float()
                break
        else:
            raise ValueError(f"PEFT tensor {key!r} is not a LoRA/DoRA factor (embedding adapters, "
                             f"modules_to_save and biases are not supported)")
    targets = tuple(sorted({n.rpartition(".")[0] for n in tensors}))
    adapter = AdapterConfig(method="qdora" if cfg.get("use_dora") else "qlora", rank=rank, alpha=alpha,
                            dropout=float(cfg.get("lora_dropout") or 0.0), targets=targets)
    return Run(path, adapter, model, tensors)


def write_peft(run: Run, folder: str) -> None:
    """adapter_config.json + adapter_model.safetensors in PEFT's naming, loadable with
    peft.PeftModel.from_pretrained on the 4-bit base (DoRA when the run is qdora)."""
    if run.adapter.method == "ft":
        raise ValueError(f"{run.folder!r} is a full fine-tuning run, which has no adapter; use --format merged")
    modules = run.modules()
    magnitude_only = sorted(m for m, parts in modules.items() if "lora_A" not in parts)
    if magnitude_only:
        raise ValueError(f"{len(magnitude_only)} magnitude-only modules (e.g. {magnitude_only[0]}) have no PEFT "
                         f"equivalent; use --format merged")
    tensors = {f"{PEFT_PREFIX}{m}.{_SUFFIX[kind]}": t.contiguous() for m, parts in modules.items()
               for kind, t in parts.items()}
    save_file(tensors, os.path.join(folder, PEFT_TENSORS), metadata={"format": "pt"})
    a = run.adapter
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": run.base, "r": a.rank,
              "lora_alpha": a.alpha, "lora_dropout": a.dropout, "target_modules": sorted(modules),
              "use_dora": a.method == "qdora", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}}
    with open(os.path.join(folder, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def write_qdora(run: Run, folder: str) -> None:
    """A qdora adapter folder (what `qdora train` saves), e.g. from an imported PEFT adapter: load_run,
    `qdora eval` and `qdora export` take it."""
    from .train import TrainConfig

    save_file({k: t.contiguous() for k, t in run.tensors.items()}, os.path.join(folder, TENSORS))
    meta = {"step": run.step, "train": asdict(TrainConfig(model=run.base)), "adapter": asdict(run.adapter),
            "imported_from": os.path.abspath(run.folder)}
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
