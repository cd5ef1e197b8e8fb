"""Ship a trained run: a dequantized merged Hugging Face checkpoint, or the adapter in PEFT's format.

Merged export streams the base checkpoint tensor by tensor (when the base is a local folder of
*.safetensors): each adapted weight is rebuilt exactly as training saw it (base tensor -> float32
-> compute dtype -> NF4Weight.quantize, as load_model + prepare_model do, then dequantized), merged
in float32 by the same DoRALinear / LoRALinear code the model runs (merged_weight), and cast once
to the export dtype; it is never re-quantized. Shards are written as they fill, so peak host memory
is about one shard plus one layer's float32 working set. Other bases (the default GGUF model, hub
ids) are loaded whole with load_model and their state dict is iterated: not streaming.
Everything is written to a temporary folder next to out_dir and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import CONFIG, TENSORS, Run, SafetensorsFile, adapter_config, find_adapter
from .dora import LoRALinear
from .model import DTYPES, AdapterConfig, load_model, prepare_model, resolve_model
from .outdir import check_new_out_dir, staged_folder
from .peft_format import PEFT_CONFIG, read_peft, write_peft, write_qdora
from .streaming import layer_holder, mmap_large_allocations, read_tensors, safetensors_index

FORMATS = ("merged", "peft", "qdora")
AGAINST = ("nf4", "original")
INDEX = "model.safetensors.index.json"  # what we write
EXPORT_INFO = "qdora_export.json"  # the run, base and ExportConfig an export came from
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from 2GB / 500MB / 1GiB / a plain integer (decimal units, as Hugging Face uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size {text!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class ExportConfig:
    """What to export and where.

    Args:
        run: a `qdora train` output folder (or its adapter/ or checkpoint-N/ folder), or a PEFT
            LoRA/DoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: folder to write (absent or empty); filled in a temporary folder, renamed when complete.
        format: merged (dense Hugging Face checkpoint), peft (the adapter in PEFT's format) or
            qdora (a PEFT adapter converted to a qdora adapter folder, to train on or merge).
        dtype: dtype of the merged weights: bfloat16, float16 or float32 (merged in float32, cast once).
        against: nf4 merges onto the dequantized NF4 base the adapter was trained on (the model
            you evaluated); original merges the same adapter onto the high-precision base weights.
        base: base model folder or hub id; default: the model recorded in the run.
        max_shard_size: largest safetensors shard of a merged export, e.g. 2GB, 500MB, 1GiB.
        trust_remote_code: allow model code from the hub (off unless you trust the model).
    """

    run: str
    out_dir: str
    format: str = "merged"
    dtype: str = "bfloat16"
    against: str = "nf4"
    base: str | None = None
    max_shard_size: str = "2GB"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {FORMATS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.against not in AGAINST:
            raise ValueError(f"against {self.against!r} is not one of {AGAINST}")
        if self.against != "nf4" and self.format != "merged":
            raise ValueError(f"against={self.against!r} applies to --format=merged only; drop it for "
                             f"--format={self.format}")
        parse_size(self.max_shard_size)
        if not self.out_dir:
            raise ValueError("out_dir is empty; pass the folder to write, e.g. --out_dir=merged")
        if not os.path.exists(self.run):
            raise FileNotFoundError(f"run {self.run!r} does not exist; pass a `qdora train` output folder "
                                    f"or a PEFT adapter folder")


def read_run(path: str, base: str | None = None) -> Run:
    """A qdora run folder or a PEFT adapter folder, as a Run (PEFT keys mapped to ours)."""
    if os.path.isfile(os.path.join(path, PEFT_CONFIG)):
        return read_peft(path, base)
    folder = find_adapter(path)
    with open(os.path.join(folder, CONFIG)) as f:
        meta = json.load(f)
    adapter = adapter_config(meta["adapter"])
    return Run(folder, adapter, base or meta["train"]["model"], SafetensorsFile(os.path.join(folder, TENSORS)),
               meta.get("step", 0))


# ------------------------------------------------------------------------------- base tensors


def _stream(files: dict[str, str]):
    """(key, tensor) one at a time; the file is opened per tensor so no mapping of the whole
    checkpoint stays resident."""
    for key in sorted(files, key=lambda k: (files[k], k)):
        yield key, read_tensors(files, [key])[key]


def base_tensors(base: str, trust_remote_code: bool):
    """(keys, iterator of (key, tensor), config source) for the base model: streamed from a local
    safetensors folder, else from the state dict of the whole loaded model (not streaming)."""
    files = safetensors_index(base)
    if files is not None:
        return list(files), _stream(files), None
    return base_tensors_loaded(base, trust_remote_code)


def base_tensors_loaded(base: str, trust_remote_code: bool):
    """base_tensors through load_model, whatever the base's format (module names as keys; tied
    weights once, under their first name, as Hugging Face saves them)."""
    model = load_model(base, torch.float32, trust_remote_code)
    seen, state = set(), {}
    for key, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[key] = t
    return list(state), iter(state.items()), model


# ----------------------------------------------------------------------------------- merging


def as_trained(t: torch.Tensor, adapter: AdapterConfig) -> torch.Tensor:
    """A base tensor as training held it: load_model reads float32, prepare_model casts to the
    compute dtype (before NF4 quantization for adapted weights). One cast, no float32 copy, when
    that is the same rounding (from float32, or already in the compute dtype)."""
    if not t.is_floating_point():
        return t
    compute = DTYPES[adapter.compute_dtype]
    return t.to(compute) if t.dtype in (torch.float32, compute) else t.to(torch.float32).to(compute)


def adapted_layer(weight: torch.Tensor, parts: dict[str, torch.Tensor], adapter: AdapterConfig) -> LoRALinear:
    """One DoRALinear/LoRALinear built by prepare_model itself (same casts, NF4 quantization and
    method branch as training) on the base `weight`, holding the trained factors in `parts`."""
    name = "layer"
    holder = layer_holder(name, weight.shape[1], weight.shape[0], {name + ".weight": weight.float()})
    magnitude_only = (name,) if adapter.method == "qdora" and "lora_A" not in parts else ()
    holder, _ = prepare_model(holder, replace(adapter, targets=(name,), magnitude_only=magnitude_only))
    layer = holder.get_submodule(name)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for kind, t in parts.items():
            if kind not in params:
                raise ValueError(f"adapter has a {kind} tensor, which a {adapter.method} layer does not have; the "
                                 f"run's {CONFIG} and {TENSORS} disagree (another method's checkpoint?)")
            params[kind].copy_(t)
    return layer


def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], adapter: AdapterConfig,
                 against: str = "nf4") -> torch.Tensor:
    """The dense float32 weight of one adapted module: m * V / ||V||_row (DoRA) or V (LoRA) with
    V = W0 + s B@A, W0 the dequantized NF4 base (against=nf4) or the original `weight`."""
    layer = adapted_layer(weight, parts, adapter)
    return layer.merged_weight(None if against == "nf4" else weight)


def _check_shapes(key: str, weight: torch.Tensor, parts: dict[str, torch.Tensor], base: str) -> None:
    out, inp = weight.shape
    want = {"lora_A": (parts.get("lora_A", torch.empty(0, inp)).shape[0], inp),
            "lora_B": (out, parts.get("lora_B", torch.empty(0, 0)).shape[-1]), "magnitude": (out,)}
    for kind, t in parts.items():
        if tuple(t.shape) != want[kind]:
            raise ValueError(f"adapter tensor {key[:-7]}.{kind} has shape {tuple(t.shape)} but base {base!r} "
                             f"has {key} of shape {tuple(weight.shape)}; pass the --base the run was trained on")


class ShardWriter:
    """Buffers tensors and writes a safetensors shard each time the next tensor would overflow
    max_bytes; close() names them model-0000i-of-0000n.safetensors and writes the index."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[list[str]] = []

    def make_room(self, nbytes: int) -> None:
        """Write the buffer out now if a tensor of `nbytes` will not fit (called before that tensor
        is computed, so the full buffer and the tensor's working set never coexist)."""
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.make_room(nbytes)
        self.buffer[key] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        self.shards.append(list(self.buffer))
        save_file(self.buffer, os.path.join(self.folder, f"shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self.flush()
        n, weight_map = len(self.shards), {}
        for i, keys in enumerate(self.shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.folder, f"shard-{i}"), os.path.join(self.folder, name))
            weight_map.update({k: name for k in keys})
        with open(os.path.join(self.folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)


def _write_merged(run: Run, cfg: ExportConfig, tmp: str) -> None:
    keys, tensors, model = base_tensors(run.base, cfg.trust_remote_code)
    ft = run.adapter.method == "ft"
    modules = {} if ft else {m + ".weight": parts for m, parts in run.modules().items()}
    wanted = set(run.tensors) if ft else set(modules)
    missing = sorted(wanted - set(keys))
    if missing and model is None:  # checkpoint keys named unlike modules: ask transformers to load it
        keys, tensors, model = base_tensors_loaded(run.base, cfg.trust_remote_code)
        missing = sorted(wanted - set(keys))
    if missing:
        raise ValueError(f"base {run.base!r} has no {missing[:3]} ({len(missing)} missing) that the "
                         f"{run.adapter.method} run {run.folder!r} adapted; pass the --base it was trained on")
    dtype = DTYPES[cfg.dtype]
    mmap_large_allocations()
    writer = ShardWriter(tmp, parse_size(cfg.max_shard_size))
    for key, t in tqdm(tensors, total=len(keys), desc="export", unit="tensor"):
        writer.make_room(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()))
        if key in modules:
            _check_shapes(key, t, modules[key], run.base)
            out = merge_weight(t, modules[key], run.adapter, cfg.against).to(dtype)
            if dtype == torch.float16 and not torch.isfinite(out).all():
                raise ValueError(f"merged {key} overflows float16; export with --dtype=bfloat16 or float32")
        elif ft and key in run.tensors:
            out = run.tensors[key]
            if out.shape != t.shape:
                raise ValueError(f"ft tensor {key} has shape {tuple(out.shape)} but base {run.base!r} "
                                 f"has {tuple(t.shape)}; pass the --base the run was trained on")
            out = out.to(dtype)
        elif t.is_floating_point():
            out = (t if cfg.against == "original" or ft else as_trained(t, run.adapter)).to(dtype)
        else:
            out = t
        writer.add(key, out)
        del t, out
    writer.close()
    _write_configs(run.base, model, dtype, cfg.trust_remote_code, tmp)


def _write_configs(base: str, model, dtype: torch.dtype, trust_remote_code: bool, folder: str) -> None:
    """config.json (dtype set to the export's), generation_config.json and the tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path, extra = resolve_model(base)
    config = model.config if model is not None else AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, **extra)
    config.dtype = dtype
    config.save_pretrained(folder)
    try:
        gen = GenerationConfig.from_pretrained(path, **extra)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(folder)
    try:
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra).save_pretrained(folder)
    except (OSError, ValueError) as exc:
        tqdm.write(f"warning: base {base!r} has no loadable tokenizer ({str(exc).splitlines()[0]}); none exported")


def export(cfg: ExportConfig) -> dict:
    """Write a merged Hugging Face checkpoint, a PEFT adapter or a qdora adapter from a trained run.

    Returns {"out_dir", "format", "files"}. The output appears under cfg.out_dir only when complete.
    """
    check_new_out_dir(cfg.out_dir)
    run = read_run(cfg.run, cfg.base)
    if cfg.against != "nf4" and run.adapter.method == "ft":
        raise ValueError(f"against={cfg.against!r} does not apply to the full fine-tuning run {run.folder!r}: "
                         f"it trained the weights themselves, exported as they are; drop --against")
    if cfg.format == "merged":
        resolve_model(run.base)  # a missing base fails here, before any work
    with staged_folder(cfg.out_dir, "export") as tmp:
        {"merged": _write_merged, "peft": lambda r, _, t: write_peft(r, t),
         "qdora": lambda r, _, t: write_qdora(r, t)}[cfg.format](run, cfg, tmp)
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump({"run": os.path.abspath(run.folder), "base": run.base, "method": run.adapter.method,
                       "step": run.step, **asdict(cfg), "adapter": asdict(run.adapter)}, f, indent=2)
    files = sorted(os.listdir(cfg.out_dir))
    print(f"wrote {cfg.format} export of {run.folder} ({len(files)} files) to {os.path.abspath(cfg.out_dir)}")
    return {"out_dir": os.path.abspath(cfg.out_dir), "format": cfg.format, "files": files}
