"""Our QDoRA against PEFT's DoRA on bitsandbytes 4-bit layers holding the very same NF4 bytes.

Both run in train mode: in eval mode bnb.nn.Linear4bit repacks its bytes in place on AVX512-BF16
CPUs (then PEFT's DoRA dequantizes garbage). Tolerances: fp32 compute, relative Frobenius error
below 1e-5 between the two, and each within 1e-5 of the fp64 formula. In bf16 PEFT rounds the
dequantized weight, the norm and the LoRA product through bf16, so there both are checked against
the fp32 model (2e-2) rather than against each other bit for bit.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from qdora.model import AdapterConfig, adapter_layers, prepare_model

RANK, ALPHA = 8, 16.0
CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def build_pair(dtype):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(CFG).float()
    ours, _ = prepare_model(dense, AdapterConfig(rank=RANK, alpha=ALPHA, compute_dtype="float32",
                                                 adapter_dtype="float32"))
    with torch.no_grad():
        for layer in adapter_layers(ours).values():
            layer.lora_B.normal_(0, 0.05)
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(CFG).float()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()}, strict=False)
    for name, layer in adapter_layers(ours).items():
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, layer.weight.to_linear4bit(dtype))
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapter_layers(ours)})
    theirs = get_peft_model(theirs, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                               target_modules=targets, use_dora=True))
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    ours.to(dtype), theirs.to(dtype)
    return ours.train(), theirs.train()


def grads(model, key):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and key in n}


@pytest.mark.parametrize("dtype", [torch.float32])
def test_logits_and_adapter_gradients_match_peft(dtype):
    ours, theirs = build_pair(dtype)
    ids = torch.randint(0, 96, (2, 12))
    lo, lt = ours(ids).logits, theirs(ids).logits
    rel = ((lo - lt).norm() / lt.norm()).item()
    assert rel < 1e-5
    lo.square().mean().backward()
    lt.square().mean().backward()
    ours_g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, g in ours_g.items():
        module, _, pname = name.rpartition(".")
        peft_name = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                     "magnitude": "lora_magnitude_vector.default.weight"}[pname]
        gt = theirs.base_model.model.get_submodule(module).get_parameter(peft_name).grad
        assert ((g - gt).norm() / gt.norm()).item() < 1e-4, name


def test_bf16_both_near_fp32_reference():
    """The fp32 model is the reference here: test_dora shows it within 1e-5 of the fp64 formula."""
    ref, _ = build_pair(torch.float32)
    ours, theirs = build_pair(torch.bfloat16)
    for layer in adapter_layers(ours).values():
        assert layer.w0_sq.dtype == torch.float32 and layer.weight.code2.dtype == torch.float32
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        exact = ref(ids).logits.double()
        for model in (ours, theirs):
            got = model(ids).logits.double()
            assert ((got - exact).norm() / exact.norm()).item() < 2e-2
