"""Model preparation on tiny Llama, Mistral, Qwen2 and Gemma configs and on the real stories260K."""

import copy

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config)

from conftest import STORIES, need
from qdora.dora import DoRALinear, LoRALinear
from qdora.model import AdapterConfig, load_model, prepare_model, trainable_state_dict
from qdora.nf4 import NF4Weight

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": LlamaConfig(**TINY),
    "mistral": MistralConfig(**TINY, sliding_window=None),
    "qwen2": Qwen2Config(**TINY),  # q/k/v carry biases
    "gemma": GemmaConfig(**TINY, head_dim=16),
}
FP32 = dict(compute_dtype="float32", adapter_dtype="float32")


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]).float()


def nf4_base(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """The same model with every target weight replaced by its dequantized NF4 version."""
    base = copy.deepcopy(model)
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Linear) and mod is not base.get_output_embeddings():
            w = NF4Weight.quantize(mod.weight.data, cfg.blocksize, cfg.double_quant).dequantize()
            mod.weight.data.copy_(w)
    return base


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("method", ["qdora", "qlora", "ft"])
def test_prepare_every_family(family, method):
    model = tiny(family)
    cfg = AdapterConfig(method=method, rank=4, alpha=8.0, **FP32)
    ids = torch.randint(0, 128, (2, 9))
    base = nf4_base(model, cfg)
    model, summary = prepare_model(model, cfg)
    assert len(summary.adapted) == 2 * 7  # q k v o gate up down per block, head excluded
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if method == "ft":
        assert not layers and summary.trainable == summary.total
    else:
        assert len(layers) == 14 and all(isinstance(m, DoRALinear) == (method == "qdora") for m in layers)
        expected = sum(4 * (m.in_features + m.out_features) + (m.out_features if method == "qdora" else 0)
                       for m in layers)
        assert summary.trainable == expected
        # Init parity: B = 0 (and m = ||W0||) so logits equal the NF4 base model's logits.
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_stories260k_real_model():
    model = load_model(str(need(STORIES)), dtype=torch.float32)
    cfg = AdapterConfig(rank=8, alpha=16.0, **FP32)
    base = nf4_base(model, cfg)
    model, summary = prepare_model(model, cfg)
    assert len(summary.adapted) == 5 * 7
    down = model.model.layers[0].mlp.down_proj
    assert down.in_features == 172 and down.weight.in_pad == 192  # 172 is no multiple of 64
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert len(trainable_state_dict(model)) == 35 * 3


def test_target_patterns_and_magnitude_only():
    model = tiny("llama")
    cfg = AdapterConfig(targets=("q_proj", "v_proj", r"model\.layers\.1\.mlp\.down_proj"),
                        magnitude_only=("v_proj",), **FP32)
    model, summary = prepare_model(model, cfg)
    assert summary.adapted == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                               "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                               "model.layers.1.mlp.down_proj"]
    assert model.model.layers[0].self_attn.v_proj.rank == 0
    assert model.model.layers[0].self_attn.q_proj.rank == 16
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": -3}, "rank must be a positive integer, got -3"),
    ({"alpha": 0}, "alpha must be positive, got 0"),
    ({"alpha": -1.0}, "alpha must be positive"),
    ({"method": "lora"}, "unknown method 'lora'"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"targets": ("(",)}, "not a valid regular expression"),
    ({"magnitude_only": ("v_proj",), "method": "qlora"}, "magnitude_only needs method=qdora"),
    ({"compute_dtype": "float8"}, "compute_dtype 'float8'"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AdapterConfig(**kwargs)


def test_unknown_target_pattern_names_it():
    with pytest.raises(ValueError, match=r"target pattern 'qkv_proj' matches no linear layer; this model has \["):
        prepare_model(tiny("llama"), AdapterConfig(targets=("qkv_proj",)))


def test_model_without_linear_layers():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match="has no linear layers to adapt"):
        prepare_model(Head(), AdapterConfig())


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))
