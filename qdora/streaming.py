"""Low-memory loading: build the model on the meta device, then stream a safetensors checkpoint
tensor by tensor, quantizing each target layer as it arrives.

Peak host memory stays near the 4-bit model plus one layer in float32 (not the whole dense model),
and under FSDP2 each decoder block is sharded as soon as it is complete, so a rank keeps only its
shard. Every tensor goes through exactly the casts of `load_model(..., float32)` followed by
`prepare_model` (checkpoint dtype -> float32 -> compute dtype), and each target layer is prepared
by `prepare_model` itself, in the same order, so the NF4 bytes, adapter initializations and DoRA
magnitudes are bit-identical to the ordinary load. Applies to local Hugging Face folders with
*.safetensors weights and to qdora/qlora; anything else returns None and the caller loads normally.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .model import (DTYPES, AdapterConfig, Summary, _matches, count_base_parameters, find_targets, prepare_model,
                    resolve_model)
from .nf4 import NF4Weight


def safetensors_index(name_or_path: str) -> dict[str, str] | None:
    """{tensor name: file} of a local safetensors folder, or None (GGUF, .bin, hub id)."""
    path, extra = resolve_model(name_or_path)
    if extra or not os.path.isdir(path):
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = {k: os.path.realpath(os.path.join(path, v)) for k, v in json.load(f)["weight_map"].items()}
        root = os.path.realpath(path) + os.sep
        for name, file in files.items():
            if not file.startswith(root):
                raise ValueError(f"{index!r} maps {name} to {file!r}, outside the model folder; "
                                 f"the index is corrupt or hostile: fix or remove it")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update({k: file for k in f.keys()})
    return out


def read_tensors(index: dict[str, str], names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors by name from a safetensors_index, each file opened (memory-mapped) only while its
    tensors are copied out (cast to `dtype` when given, before the next is read), so the mapped
    pages of the whole checkpoint never stay resident together."""
    from safetensors import safe_open

    out, by_file = {}, {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                out[k] = t if dtype is None else t.to(dtype)
    return out


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .distributed import decoder_blocks

    ids = {id(b) for b in decoder_blocks(model)}
    return [(n, m) for n, m in model.named_modules() if id(m) in ids]


def load_prepared(name_or_path: str, cfg: AdapterConfig, seed: int, trust_remote_code: bool = False,
                  on_block: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, Summary] | None:
    """The model `prepare_model(load_model(name_or_path, float32), cfg)` gives (with the global RNG
    seeded with `seed` just before the first adapter), built by streaming; None when streaming does
    not apply. `on_block(block)` is called on each decoder block as soon as it is complete."""
    from safetensors import SafetensorError

    if cfg.method not in ("qdora", "qlora"):
        return None
    try:
        index = safetensors_index(name_or_path)
        return None if index is None else _stream(name_or_path, index, cfg, seed, trust_remote_code, on_block)
    except SafetensorError as exc:  # the same message as load_model's
        raise ValueError(f"the weights of model {name_or_path!r} cannot be read ({exc}); the safetensors file is "
                         f"corrupt or truncated: download or copy the model again") from None


def _stream(name_or_path: str, index: dict[str, str], cfg: AdapterConfig, seed: int, trust_remote_code: bool,
            on_block: Callable[[nn.Module], None] | None) -> tuple[nn.Module, Summary] | None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path, _ = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    compute = DTYPES[cfg.compute_dtype]
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does (tied input/output embeddings share one Parameter)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        # from_config skips it, and some models list their end-of-turn token only there (Llama-3-Instruct).
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # from_pretrained's mode; the adapter layers prepare_model adds start in train mode there too
    targets = find_targets(model, cfg.targets, cfg.magnitude_only)
    in_targets = {f"{n}.{leaf}" for n in targets for leaf in ("weight", "bias")}
    aliases: dict[int, list[tuple[nn.Module, str, str]]] = {}  # every name of each non-target parameter
    for full, p in model.named_parameters(remove_duplicate=False):
        if full in in_targets:
            continue
        owner, _, leaf = full.rpartition(".")
        aliases.setdefault(id(p), []).append((model.get_submodule(owner), leaf, full))
    stored = {id_: [full for _, _, full in uses if full in index] for id_, uses in aliases.items()}
    if any(not names for names in stored.values()):
        return None  # a parameter under another name than in the checkpoint: let from_pretrained map it
    for module in model.modules():  # prepare_model's model.to(compute) casts the buffers too
        for k, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[k] = b.to(compute)
    blocks, done = _blocks(model), set()

    def fill(prefix: str) -> None:
        """Load every still-empty parameter under `prefix` (all of them for prefix "")."""
        todo = [(id_, uses) for id_, uses in aliases.items()
                if any(full.startswith(prefix) for _, _, full in uses) and uses[0][0]._parameters[uses[0][1]].is_meta]
        for id_, uses in todo:  # one at a time: an embedding matrix in float32 is a big layer
            t = read_tensors(index, stored[id_][:1], torch.float32)[stored[id_][0]]
            p = nn.Parameter(t.to(compute), requires_grad=False)
            del t
            for module, leaf, _ in uses:
                module._parameters[leaf] = p
            trim_heap()

    def finish_blocks_before(name: str | None) -> None:
        for prefix, block in blocks:
            if prefix in done:
                continue
            if name is not None and (name.startswith(prefix + ".") or not _before(prefix, name)):
                return
            fill(prefix + ".")
            done.add(prefix)
            if on_block is not None:
                on_block(block)

    torch.manual_seed(seed)
    for name in tqdm(targets, desc="load + quantize to NF4", unit="layer", leave=False):
        finish_blocks_before(name)
        parent_name, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        keys = [name + ".weight"] + ([name + ".bias"] if linear.bias is not None else [])
        tensors = read_tensors(index, keys, torch.float32)  # what load_model(..., float32) holds
        holder = layer_holder(name, linear.in_features, linear.out_features, tensors)
        mag = (name,) if any(_matches(name, p) for p in cfg.magnitude_only) else ()
        holder, _ = prepare_model(holder, replace(cfg, targets=(name,), magnitude_only=mag))
        setattr(model.get_submodule(parent_name), child, holder.get_submodule(name))
        del holder, tensors
        trim_heap()
    finish_blocks_before(None)
    fill("")
    summary = Summary(adapted=targets)
    summary.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.total = count_base_parameters(model)
    summary.base_bytes = sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Weight))
    return model, summary


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
GLIBC_MMAP_MAX, GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # and their defaults


def _glibc(function: str, *args: int) -> None:
    """Call one of glibc's malloc tuning functions; a no-op with another C library."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc): without it, the float32 temporaries of
    successive layers fragment the heap and the resident size grows by about a layer per layer."""
    _glibc("malloc_trim", 0)


def mmap_large_allocations() -> None:
    """Ask glibc to serve allocations of 1 MiB and more by mmap, so each freed layer-sized
    temporary goes back to the OS at once. By default glibc raises its mmap threshold after such
    frees (up to 32 MiB) and keeps later blocks in a heap that only grows, so streaming hundreds
    of layers would ratchet the resident size up. Process-wide; ends keep_freed_memory's policy."""
    release_freed_memory()
    _glibc("mallopt", M_MMAP_MAX, GLIBC_MMAP_MAX)
    _glibc("mallopt", M_MMAP_THRESHOLD, 1 << 20)


_kept = False  # keep_freed_memory is in effect


def keep_freed_memory() -> None:
    """For training on the CPU: serve every allocation from glibc's heap and keep what is
    freed there (no mmap per large tensor, no trimming below 1 GiB of free heap). Every step
    allocates the same tensors again, and memory given back to the system would be page-faulted in
    again each time: on the 4-layer Llama of benchmarks/bench_layer.py that is 1.3 million page
    faults per 20 steps and about 16% of the step time (the default run trains about 10% faster). The
    resident peak then follows how the heap fragments: there QDoRA's is 0.98 to 1.22 times QLoRA's
    over runs, against 1.01 to 1.11 with glibc's defaults. Process-wide until release_freed_memory;
    a no-op with another C library."""
    global _kept
    _glibc("mallopt", M_MMAP_MAX, 0)
    _glibc("mallopt", M_TRIM_THRESHOLD, 1 << 30)
    _kept = True


def release_freed_memory() -> None:
    """Undo keep_freed_memory (nothing to undo if it is not in effect): glibc's default mmap count
    and trim threshold (its mmap threshold stays where it is instead of adapting, as after any
    mallopt), and give free heap back now."""
    global _kept
    if not _kept:
        return
    _glibc("mallopt", M_MMAP_MAX, GLIBC_MMAP_MAX)
    _glibc("mallopt", M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
    trim_heap()
    _kept = False


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory's policy is in effect."""
    return _kept


def _before(prefix: str, name: str) -> bool:
    """Whether module `prefix` comes before module `name` in the model (numbers compared as numbers)."""
    key = lambda s: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in s.split(".")]  # noqa: E731
    return key(prefix) < key(name)


def layer_holder(name: str, in_f: int, out_f: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree holding only the linear `name` (same dotted path, so every target pattern
    matches it as it matches in the full model) with the checkpoint's tensors."""
    root = nn.Module()
    parent = root
    parts = name.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    linear = nn.Linear(in_f, out_f, bias=name + ".bias" in tensors, device="meta")
    linear.weight = nn.Parameter(tensors[name + ".weight"])
    if linear.bias is not None:
        linear.bias = nn.Parameter(tensors[name + ".bias"])
    parent.add_module(parts[-1], linear)
    return root
