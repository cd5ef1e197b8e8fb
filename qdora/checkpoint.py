"""Adapter checkpoints: the trainable tensors of a run and the configuration that rebuilds it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import distributed as D
from .model import AdapterConfig, load_model, load_tokenizer, prepare_model

TENSORS, CONFIG = "adapter.safetensors", "qdora_config.json"


def save_adapter(model: torch.nn.Module, path: str, meta: dict) -> None:
    """Trainable tensors (safetensors) and the run's configuration, written to a temporary folder
    and renamed into place, so `path` is either complete or absent. Under FSDP2 every rank must
    call it (the shards are gathered); rank 0 writes."""
    tensors = {n: D.full_tensor(p.detach()).contiguous().cpu() for n, p in model.named_parameters()
               if p.requires_grad}
    if not D.is_main():
        return
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, TENSORS))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_adapter(path: str) -> str:
    """The adapter folder of a run: `path` itself or `path/adapter`."""
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, CONFIG)):
            return candidate
    raise FileNotFoundError(f"{path!r} holds no qdora adapter ({CONFIG}); pass a `qdora train` output folder")


def load_run(path: str, device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Rebuild a trained model from a run folder: base model, same preparation, trained tensors.

    Returns (model, tokenizer, meta) where meta is the saved configuration.
    """
    folder = find_adapter(path)
    with open(os.path.join(folder, CONFIG)) as f:
        meta = json.load(f)
    try:
        tensors = load_file(os.path.join(folder, TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"adapter tensors in {folder!r} cannot be read ({exc}); the checkpoint is corrupt") from None
    adapter = AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["adapter"].items()})
    model_name = meta["train"]["model"]
    model, _ = prepare_model(load_model(model_name, torch.float32, trust_remote_code), adapter)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"adapter in {folder!r} does not fit model {model_name!r} with method "
                         f"{adapter.method} (missing {missing}, unexpected {extra})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}; was it trained on another model?")
            params[name].copy_(value)
    return model.to(device), load_tokenizer(model_name, trust_remote_code), meta
