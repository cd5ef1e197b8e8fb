"""QDoRA: DoRA fine-tuning on a 4-bit NF4 frozen base (QLoRA and full fine-tuning as baselines)."""

import os as _os

# The Triton kernels live in the top-level kernels/ folder (no __init__.py: a PyPI package named
# `kernels` exists and bitsandbytes and transformers import it, so ours must not answer to that name).
# A wheel maps the folder to qdora.kernels (pyproject's package-dir); in a source checkout, including
# an editable install, setuptools cannot map a folder without __init__.py, so qdora's search path
# also looks in the checkout root for it (pypa/setuptools#4248).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "dora_norm.py")) and _root not in __path__:
    __path__.append(_root)

from .dora import DoRALinear, LoRALinear
from .model import AdapterConfig, load_model, load_tokenizer, prepare_model
from .nf4 import NF4Weight, nf4_linear

__all__ = ["AdapterConfig", "DoRALinear", "LoRALinear", "NF4Weight", "load_model", "load_tokenizer",
           "nf4_linear", "prepare_model"]
__version__ = "0.1.0"
