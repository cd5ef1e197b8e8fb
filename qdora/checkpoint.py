"""Checkpoints: the trainable tensors of a run and the configuration that rebuilds it (adapter
format, read by eval/export: load_run, Run, SafetensorsFile), plus, in training checkpoints,
everything `--resume` needs, and what a finished run's folder holds (written, kept_metrics).

A training checkpoint `out_dir/checkpoint-N/` holds:
    adapter.safetensors, qdora_config.json   full trainable tensors + configs (rank 0), as `adapter/`
    state/                                   torch.distributed.checkpoint (DCP) of the trainable
                                             parameters and the optimizer state, sharded per rank
                                             under FSDP2, resharded on load (any world size)
    trainer.json                             step, data position (epoch, batches consumed in it),
                                             scheduler state, counters, Python RNG state
    rng-rank{R}.safetensors                  torch CPU (and CUDA) RNG state of rank R
It is written under a temporary name by every rank and renamed by rank 0 after a barrier, so a
`checkpoint-N/` folder is always complete: a process killed at any moment (SIGKILL included) leaves
complete checkpoints and `.tmp-*` entries, which are never read and are removed by `--resume`
(`remove_stale`). Files are fsynced before the rename (durable across a power loss too).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import distributed as D
from .norm_cache import invalidate_norm_caches
from .model import AdapterConfig, load_model, load_tokenizer, prepare_model
from .outdir import TMP, publish

TENSORS, CONFIG = "adapter.safetensors", "qdora_config.json"
STATE, TRAINER = "state", "trainer.json"
ADAPTER_KINDS = ("lora_A", "lora_B", "magnitude")  # the tensors of one adapted module
# TrainConfig fields that may change on --resume: they do not change what is computed.
RESUME_FREE = frozenset({"out_dir", "resume", "eval_every", "eval_batch_size", "max_new_tokens", "merge_for_eval",
                         "save_every", "device", "trust_remote_code", "activation_checkpointing", "cpu_offload",
                         "low_memory_load", "on_nonfinite"})


def _test_pause() -> None:
    """Test hook: QDORA_TEST_SAVE_PAUSE=seconds sleeps between the parts of a write, so tests can
    kill a process in the middle of one; unset, it costs one environment lookup per part."""
    pause = os.environ.get("QDORA_TEST_SAVE_PAUSE")
    if pause:
        time.sleep(float(pause))


def remove_stale(folder: str) -> list[str]:
    """Remove the `.tmp-*` entries a killed run left in its out_dir (and the temporary prediction
    files of `qdora.evaluate.write_jsonl`); returns their names. A folder that publish had renamed
    away when the kill came before the new one took its name is restored instead."""
    names = [n for n in (os.listdir(folder) if os.path.isdir(folder) else ())
             if n.startswith(TMP) or re.fullmatch(r"predictions_.*\.jsonl\.tmp\d+", n)]
    for name in [n for n in names if n.startswith(TMP + "old-")]:
        final = os.path.join(folder, name[len(TMP + "old-"):])
        if not os.path.exists(final):  # killed between publish's two renames: put the old version back
            os.replace(os.path.join(folder, name), final)
            names.remove(name)
    for name in names:
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    return names


def save_adapter(model: torch.nn.Module, path: str, meta: dict) -> None:
    """Trainable tensors (safetensors) and the run's configuration, written to a temporary folder
    and renamed into place, so `path` is either complete or absent. Under FSDP2 every rank must
    call it (the shards are gathered); rank 0 writes."""
    tensors = gathered_trainable(model)
    if not D.is_main():
        return
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=TMP, dir=parent)
    try:
        _write_adapter(tmp, tensors, meta)
        _test_pause()
        publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_adapter(folder: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The adapter format inside a (temporary) folder: trainable tensors and the run's configuration."""
    save_file(tensors, os.path.join(folder, TENSORS))
    _test_pause()
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(meta, f, indent=2)


def gathered_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable tensors on the CPU (gathered from every rank under FSDP2: a collective)."""
    return {n: D.full_tensor(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, object]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    return {"model": model_sd, "optim": optim_sd}, options


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, path: str, meta: dict,
                    position: dict, device: torch.device) -> None:
    """Write training checkpoint `path` (see the module docstring); every rank calls it."""
    import torch.distributed.checkpoint as dcp

    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), TMP + os.path.basename(path))
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    D.barrier()
    state, _ = _dcp_state(model, opt)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=os.path.join(tmp, STATE), no_dist=D.world_size() == 1)
    _test_pause()
    save_file(_rng_state(device), os.path.join(tmp, f"rng-rank{D.rank()}.safetensors"))
    tensors = gathered_trainable(model)
    if D.is_main():
        _write_adapter(tmp, tensors, meta)
        trainer = {**position, "step": meta["step"], "scheduler": sched.state_dict(),
                   "python_rng": random.getstate(), "world_size": D.world_size()}
        with open(os.path.join(tmp, TRAINER), "w") as f:
            json.dump(trainer, f, indent=2)
        _test_pause()
    D.barrier()
    if D.is_main():
        publish(tmp, path)
    D.barrier()


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint-N folder with the largest N in `folder` (complete by construction), or None.
    Temporary `.tmp-checkpoint-N` folders of a killed run never match."""
    steps = [int(m.group(1)) for name in (os.listdir(folder) if os.path.isdir(folder) else ())
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isfile(os.path.join(folder, name, TRAINER))]
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def resume_point(resume: str, out_dir: str) -> str | None:
    """The checkpoint folder `--resume` names: "true" = the latest in out_dir (None when there is
    none yet: the run starts fresh), else a checkpoint-N folder or a run folder (its latest)."""
    if resume == "true":
        return latest_checkpoint(out_dir)
    if os.path.isfile(os.path.join(resume, TRAINER)):
        return resume
    found = latest_checkpoint(resume)
    if found is None:
        raise FileNotFoundError(f"resume={resume!r} is neither a training checkpoint (checkpoint-N with {TRAINER}) "
                                f"nor a run folder holding one; pass --resume=true or a checkpoint folder")
    return found


def check_resumable(path: str, train_cfg, adapter_cfg) -> dict:
    """The checkpoint's saved configuration, after checking that every field that changes the
    computation equals the current run's; raises a one-line ValueError naming the first that differs."""
    with open(os.path.join(path, CONFIG)) as f:
        meta = json.load(f)
    now = json.loads(json.dumps({"train": asdict(train_cfg), "adapter": asdict(adapter_cfg)}))
    for section in ("train", "adapter"):
        for name, value in now[section].items():
            if section == "train" and name in RESUME_FREE:
                continue
            saved = meta[section].get(name)
            if saved != value:
                raise ValueError(f"cannot resume from {path!r}: {name} was {saved!r} there but is {value!r} now; "
                                 f"pass --{name}={saved!r} or start a new out_dir")
    return meta


def load_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, path: str,
                    device: torch.device) -> dict:
    """Restore trainable parameters, optimizer, scheduler and RNG from checkpoint `path` (every rank
    calls it); returns trainer.json (step, data position, counters)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with open(os.path.join(path, TRAINER)) as f:
        trainer = json.load(f)
    state, options = _dcp_state(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        D.load_state(state, os.path.join(path, STATE))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    invalidate_norm_caches()
    sched.load_state_dict(trainer["scheduler"])
    version, internal, gauss = trainer["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    rng_file = os.path.join(path, f"rng-rank{D.rank()}.safetensors")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than were saved
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    return trainer


@dataclass
class Run:
    """A trained adapter in qdora's naming: `tensors` maps `module.lora_A|lora_B|magnitude` (or, for
    ft, every trained parameter) to its tensor; `base` is the model it was trained on."""

    folder: str
    adapter: AdapterConfig
    base: str
    tensors: Mapping[str, torch.Tensor]
    step: int = 0

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Adapted module name -> {lora_A, lora_B, magnitude} present for it (qdora/qlora only)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in self.tensors.items():
            module, _, kind = name.rpartition(".")
            if kind not in ADAPTER_KINDS:
                raise ValueError(f"adapter tensor {name!r} is not a LoRA/DoRA tensor; is {self.folder!r} a "
                                 f"{self.adapter.method} run?")
            out.setdefault(module, {})[kind] = t
        return out


class SafetensorsFile(Mapping):
    """The tensors of one safetensors file, each read when asked for: an ft run's adapter file
    holds the whole model in float32, which an export should not hold at once."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is missing; the adapter folder is incomplete")
        self.path = path
        try:
            with safe_open(path, "pt") as f:
                self._keys = list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"adapter tensors {path!r} cannot be read ({exc}); the checkpoint is corrupt") from None
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def adapter_config(saved: dict) -> AdapterConfig:
    """The AdapterConfig a run saved (JSON lists back to tuples)."""
    return AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


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
    adapter = adapter_config(meta["adapter"])
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


def written(out_dir: str) -> str:
    """Where a finished run's files are, one line each."""
    out = os.path.abspath(out_dir)
    names = os.listdir(out)
    steps = sorted(int(n[11:]) for n in names if n.startswith("checkpoint-") and n[11:].isdigit())
    preds = [n for n in names if n.startswith("predictions_") and n.endswith(".jsonl")]
    rows = [("adapter/", "trained tensors + config (qdora eval/export --run=...)")]
    if steps:
        rows.append(("checkpoint-N/", f"{len(steps)} for --resume (steps {steps[0]}..{steps[-1]})"))
    rows.append(("metrics.jsonl", "loss, lr, grad norm, tokens/s, memory per step; evaluations"))
    if preds:
        rows.append(("predictions_step*.jsonl", f"held-out answers ({len(preds)} files)"))
    rows.append(("summary.json", "exact match before/after, final loss, time, memory"))
    return "\n".join([f"wrote {out}/"] + [f"  {name:<24} {what}" for name, what in rows])


def kept_metrics(path: str, step: int) -> list[dict]:
    """The records of a resumed run's metrics.jsonl up to its checkpoint's step (later steps are
    trained again)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                pass
    return [r for r in records if "step" in r and r["step"] <= step]
