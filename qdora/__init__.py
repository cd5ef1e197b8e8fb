"""QDoRA: DoRA fine-tuning on a 4-bit NF4 frozen base (QLoRA and full fine-tuning as baselines)."""

from .dora import DoRALinear, LoRALinear
from .model import AdapterConfig, load_model, load_tokenizer, prepare_model
from .nf4 import NF4Weight, nf4_linear

__all__ = ["AdapterConfig", "DoRALinear", "LoRALinear", "NF4Weight", "load_model", "load_tokenizer",
           "nf4_linear", "prepare_model"]
__version__ = "0.1.0"
