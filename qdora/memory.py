"""Predicted per-rank peak memory of a QDoRA, QLoRA or full fine-tuning step, without weights.

The model is built from its config on the meta device and prepared by the real `prepare_model`
(NF4Weight.quantize of a meta weight allocates its tensors' shapes only, so NF4's padding and scale
sizes come from NF4Weight itself). Every parameter and buffer of that model
is counted by kind; FSDP2 sharding divides the parameters (dim 0, padded to a multiple of the world
size) and leaves buffers replicated, as `qdora.distributed.shard_model` does.

Activations come from qdora.activations (the tensors autograd saves in a Llama-like decoder block),
with Hugging Face non-reentrant activation checkpointing optional. tests/test_memory.py checks every
category against tensors measured on small real models.

The peak is the largest of the phases of a step: weights and optimizer state are there throughout;
activations, one loss chunk's logits, transient buffers (a dequantized weight, gradients of
activations, FSDP2 all-gathers) and weight gradients as each phase holds them. The per-category
figures are those of the peak phase. What the GPU's caching allocator adds (block rounding,
fragmentation, the CUDA context) is not modeled.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .dora import DoRALinear, LoRALinear
from .activations import activations
from .model import DTYPES, AdapterConfig, prepare_model
from .nf4 import NF4Weight

CONFIG_DIR = Path(__file__).with_name("configs")
SHIPPED = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
LLAMA_LIKE = ("llama", "mistral", "qwen2")
GiB = 2**30
# Gradients of activations alive at once in backward, beyond the saved tensors, fitted to CPU
# measurements of whole training steps (tests/test_memory.py checks the resulting peaks):
FINAL_NORM_GRADS = 4  # float32 (tokens x hidden) tensors in the final norm's backward
WSET_INTER = 1.0  # (tokens x intermediate) tensors in the compute dtype in a decoder block's backward
WSET_HIDDEN = 1.0  # float32 (tokens x hidden) tensors in a decoder block's backward
CATEGORIES = {
    "nf4_weights": "4-bit weights (packed NF4)",
    "nf4_scales": "NF4 scales (absmax, absmax2, code2)",
    "frozen_weights": "frozen non-quantized weights (embeddings, norms, head)",
    "adapters": "trainable weights (m, A, B, DoRA norm constants; all under ft)",
    "gradients": "gradients of the trainable weights",
    "optimizer": "AdamW state (exp_avg, exp_avg_sq, step)",
    "activations": "activations saved for backward",
    "logits": "logits of one loss chunk (fp32 log-softmax and gradients)",
    "transient": "transient (dequantized weight, activation grads, FSDP gathers)",
}


def _flag(name: str, value) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class MemoryConfig:
    """The model and the run whose memory is predicted (method, rank and targets: see the adapter flags).

    Args:
        config: a shipped model config (llama-2-7b, llama-3-8b, llama-3-70b, mistral-7b) or the path
            of a config.json or of a Hugging Face model folder.
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch on each rank.
        world_size: FSDP2 ranks (1 = one GPU, no sharding).
        checkpointing: activation checkpointing of every decoder block (non-reentrant).
        offload: FSDP2 CPU offload of the sharded parameters, gradients and optimizer state.
        loss_chunk: rows of logits materialized at once by the chunked loss (qdora.loss.answer_loss).
    """

    config: str = "llama-3-8b"
    seq_len: int = 2048
    batch_size: int = 1
    world_size: int = 1
    checkpointing: bool = True
    offload: bool = False
    loss_chunk: int = 1024

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "world_size", "loss_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("checkpointing", "offload"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))
        if not isinstance(self.config, str) or not self.config:
            raise ValueError(f"config must be a shipped name {SHIPPED} or a path, got {self.config!r}")


def load_config(name_or_path: str):
    """A transformers config from a shipped name, a config.json path or a model folder."""
    from transformers import AutoConfig

    path = CONFIG_DIR / f"{name_or_path}.json" if name_or_path in SHIPPED else Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model config {name_or_path!r} is neither a shipped name {SHIPPED} nor a "
                                f"config.json / model folder path")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if model_type not in LLAMA_LIKE:
        raise ValueError(f"{path}: model_type {model_type!r} is not covered; the memory model knows Llama-like "
                         f"blocks {LLAMA_LIKE}")
    return AutoConfig.for_model(model_type, **values)


def meta_model(hf_config, adapter: AdapterConfig) -> torch.nn.Module:
    """The prepared model (qdora.model.prepare_model) with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    model, _ = prepare_model(model, adapter)  # on meta, NF4Weight.quantize allocates shapes only
    return model


def _nbytes(t: torch.Tensor, world_size: int = 1) -> int:
    """Bytes of this rank's FSDP2 shard: dim 0 padded to a multiple of the world size."""
    if t.dim() == 0 or world_size == 1:
        return t.numel() * t.element_size()
    return math.ceil(t.shape[0] / world_size) * (t.numel() // t.shape[0]) * t.element_size()


def tensor_kinds(model: torch.nn.Module) -> dict[str, list[tuple[torch.Tensor, bool]]]:
    """Every parameter and buffer (tied ones once) by category, with True for FSDP-sharded
    parameters and False for replicated buffers."""
    kinds: dict[str, list] = {"nf4_weights": [], "nf4_scales": [], "frozen_weights": [], "adapters": []}
    seen = set()
    nf4 = {id(m.packed): "nf4_weights" for m in model.modules() if isinstance(m, NF4Weight)}
    for m in model.modules():
        if isinstance(m, NF4Weight):
            nf4.update({id(t): "nf4_scales" for t in (m.absmax, m.absmax2, m.code2, m.offset)})
        if isinstance(m, DoRALinear):
            nf4.update({id(m.row_scale): "adapters", id(m.w0_sq): "adapters"})
    for sharded, tensors in ((True, model.parameters()), (False, model.buffers())):
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            kind = nf4.get(id(t)) or ("adapters" if t.requires_grad else "frozen_weights")
            kinds[kind].append((t, sharded))
    return kinds


def predict(hf_config, adapter: AdapterConfig, seq_len: int = 2048, batch_size: int = 1, world_size: int = 1,
            checkpointing: bool = True, offload: bool = False, loss_chunk: int = 1024, device: str = "cuda") -> dict:
    """Per-rank memory in bytes by category at the predicted peak, on the GPU and (offload) the host.

    The step is split into phases (forward, loss backward, final-norm backward, decoder-block
    backward); weights and optimizer state are present throughout, the rest per phase, and the peak
    is the largest phase. Returns {"gpu": {category: bytes}, "host": {...}, "gpu_total",
    "host_total" (per rank), "host_all_ranks", "phase", "phases": {phase: GPU bytes},
    "activations": {saved, stored, block, outside}, "gradients" (all of them, this rank's shards),
    "trainable": parameter count}.
    `hf_config` is a transformers config or anything `load_config` takes (a shipped name, a path).
    `device` only matters for dropout masks (bool on CUDA, compute dtype on CPU).
    """
    if adapter.method == "qdora" and adapter.norm_mode != "detached":
        raise ValueError(f"norm_mode={adapter.norm_mode!r} is not modelled (its backward keeps other tensors); "
                         f"drop --norm_mode for the default 'detached', or read peak_memory_mb from a short qdora train")
    from .distributed import decoder_blocks

    if isinstance(hf_config, (str, os.PathLike)):
        hf_config = load_config(str(hf_config))
    model = meta_model(hf_config, adapter)
    ws, fsdp = world_size, world_size > 1 or offload
    gpu, host = dict.fromkeys(CATEGORIES, 0), dict.fromkeys(CATEGORIES, 0)
    kinds = tensor_kinds(model)
    for kind, tensors in kinds.items():
        for t, sharded in tensors:
            (host if sharded and offload else gpu)[kind] += _nbytes(t, ws if sharded else 1)
    trainable = [t for t, _ in kinds["adapters"] if t.requires_grad]
    blocks = decoder_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    grads = sum(_nbytes(t, ws) for t in trainable)
    head_grads = sum(_nbytes(t, ws) for t in trainable if id(t) not in in_blocks)  # ft: head, norm, embeddings
    (host if offload else gpu)["optimizer"] = sum(2 * _nbytes(t, ws) + 4 for t in trainable)  # 2 moments, step
    host["gradients"] = grads if offload else 0
    gpu["adapters"] += sum(4 * m.out_features for m in model.modules() if isinstance(m, DoRALinear))

    adapted = {}  # (block index, projection name) -> rank, from the prepared model
    for name, module in model.named_modules():
        found = re.search(r"\.(\d+)\.(?:.*\.)?(\w+)$", name)
        if isinstance(module, LoRALinear) and found:
            adapted[int(found.group(1)), found.group(2)] = module.rank
    acts = activations(hf_config, adapter, adapted, batch_size, seq_len, device)

    c = DTYPES[adapter.compute_dtype].itemsize
    n, rows, h = batch_size * seq_len, min(loss_chunk, batch_size * (seq_len - 1)), hf_config.hidden_size
    logits = rows * hf_config.vocab_size
    kept = acts["stored"] if checkpointing else acts["saved"]
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    # one NF4 weight dequantized in the compute dtype, with its float32 block scales
    deq = max((c * m.out_features * m.weight.in_pad + 4 * m.weight.absmax.numel() for m in layers), default=0)
    cache = 0
    if adapter.method == "ft" and checkpointing and c != DTYPES[adapter.adapter_dtype].itemsize:
        # autocast's cache of bf16 weight copies, alive until the forward's autocast region ends
        cache = sum(c * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    g_head, g_all = (0, 0) if offload else (head_grads, grads)
    phases = {
        "forward (loss chunk)": dict(activations=kept, logits=8 * logits, transient=deq + cache, gradients=0),
        "backward (loss chunk)": dict(activations=kept, logits=12 * logits, transient=0, gradients=g_head),
        "backward (final norm)": dict(activations=kept, logits=0, transient=FINAL_NORM_GRADS * 4 * n * h,
                                      gradients=g_head),
        "backward (decoder block)": dict(activations=kept - acts["outside"] + (acts["block"] if checkpointing else 0),
                                         logits=0, transient=deq + WSET_INTER * c * n * hf_config.intermediate_size
                                         + WSET_HIDDEN * 4 * n * h, gradients=g_all),
        "optimizer step": dict(activations=0, logits=0, transient=0, gradients=g_all),
    }
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    gpu.update(phases[phase])
    if fsdp:  # the root (embeddings, final norm, head) stays gathered all step (FSDP2 keeps the root
        # unsharded after forward); the current and the prefetched block, gathered, each with its
        # all-gather input (this rank's shard); one block's unsharded float32 gradients before their
        # reduce-scatter
        root = sum(_nbytes(p) for p in model.parameters() if id(p) not in in_blocks)
        block = max(sum(_nbytes(p) for p in b.parameters()) for b in blocks)
        shard = max(sum(_nbytes(p, ws) for p in b.parameters()) for b in blocks)
        block_grads = max(sum(4 * p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)
        gpu["transient"] += root + 2 * (block + shard) + block_grads
    result = {"gpu": gpu, "host": host, "gpu_total": sum(gpu.values()), "host_total": sum(host.values()),
              "phase": phase, "phases": {k: sum(v.values()) for k, v in phases.items()}, "activations": acts,
              "gradients": grads, "trainable": sum(t.numel() for t in trainable)}
    result["host_all_ranks"] = result["host_total"] * ws
    return result


def format_table(result: dict, title: str) -> str:
    """The breakdown as a plain-text table in GiB."""
    lines = [title, f"{'category, at the peak phase':<66} {'GPU GiB':>9} {'host GiB':>9}"]
    for key, label in CATEGORIES.items():
        lines.append(f"{label:<66} {result['gpu'][key] / GiB:>9.3f} {result['host'][key] / GiB:>9.3f}")
    lines.append(f"{'peak per rank (' + result['phase'] + ')':<66} {result['gpu_total'] / GiB:>9.3f} "
                 f"{result['host_total'] / GiB:>9.3f}")
    static = result["gpu_total"] - result["phases"][result["phase"]]
    lines.append("GPU GiB by phase: " + ", ".join(f"{k} {(static + v) / GiB:.2f}" for k, v in result["phases"].items()))
    return "\n".join(lines)


def memory(cfg: MemoryConfig, adapter: AdapterConfig = AdapterConfig()) -> dict:
    """Print and return the predicted per-rank memory of one training step (GiB per category)."""
    hf_config = load_config(cfg.config)
    result = predict(hf_config, adapter, cfg.seq_len, cfg.batch_size, cfg.world_size, cfg.checkpointing,
                     cfg.offload, cfg.loss_chunk)
    title = (f"{cfg.config}: {adapter.method} rank {adapter.rank}, targets {','.join(adapter.targets)}, "
             f"{cfg.batch_size} x {cfg.seq_len} tokens, world size {cfg.world_size}, checkpointing "
             f"{cfg.checkpointing}, offload {cfg.offload}")
    print(format_table(result, title))
    if cfg.world_size > 1 and cfg.offload:
        print(f"host RAM for all {cfg.world_size} ranks: {result['host_all_ranks'] / GiB:.2f} GiB")
    return {"gpu_gib": {k: v / GiB for k, v in result["gpu"].items()},
            "host_gib": {k: v / GiB for k, v in result["host"].items()},
            "gpu_total_gib": result["gpu_total"] / GiB, "host_total_gib": result["host_total"] / GiB,
            "host_all_ranks_gib": result["host_all_ranks"] / GiB, "phase": result["phase"]}
