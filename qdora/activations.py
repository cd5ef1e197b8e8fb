"""Activation memory of a training step, without running it: an enumeration of the tensors autograd
saves in a Llama-like decoder block (transformers' Llama/Mistral/Qwen2 code, SDPA attention, our
LoRALinear/DoRALinear) and around the blocks (final norm, chunked answer loss), deduplicated by the
storage they live in, with and without Hugging Face non-reentrant activation checkpointing.
qdora.memory combines these figures with the weights, optimizer state and transient buffers."""

from __future__ import annotations

from .model import DTYPES, AdapterConfig


class _Saved:
    """Bytes of saved tensors keyed by the storage they live in (each storage counted once)."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def add(self, key: str, nbytes: int) -> str:
        self.items.setdefault(key, nbytes)
        return key

    def total(self) -> int:
        return sum(self.items.values())


def _layer_dims(cfg) -> dict[str, tuple[int, int]]:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, (cfg.num_key_value_heads or cfg.num_attention_heads) * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def _block(s: _Saved, i: int, cfg, adapter: AdapterConfig, adapted: dict[tuple[int, str], int], n: int, seq: int,
           res_rg: bool, device: str, recompute: bool = False) -> bool:
    """Add the tensors decoder block i saves (n tokens, sequences of seq); returns whether its
    output requires grad. A checkpoint's recompute keeps only the saved tensors (its graph, with
    the tensors held on its nodes, is dropped)."""
    ft = adapter.method == "ft"
    c = DTYPES[adapter.compute_dtype].itemsize
    rs = DTYPES[adapter.adapter_dtype].itemsize if ft else c  # residual stream (= model weights) dtype
    autocast = c != 4
    drop = adapter.dropout > 0
    dims = _layer_dims(cfg)
    h, nh = cfg.hidden_size, cfg.num_attention_heads

    def norm(name: str, x_rg: bool) -> tuple[str, int]:
        """RMSNorm: x.float() and rsqrt saved when x needs grad; a float32 normalized copy when the weight trains."""
        if x_rg:
            s.add(f"res{i}" if rs == 4 and name == "ln1" else f"{i}.{name}.f32", 4 * n * h)
            s.add(f"{i}.{name}.rsqrt", 4 * n)
            if ft:
                s.add(f"{i}.{name}.normed", rs * n * h)
        return f"{i}.{name}.out", (rs if ft else c)

    def linear(name: str, x: str, x_size: int, x_rg: bool) -> bool:
        fin, fout = dims[name]
        key = f"{i}.{name}"
        if ft:  # nn.Linear under autocast: bf16 copies of input and weight
            s.add(f"{key}.xcast" if autocast and x_size != c else x, c * n * fin)
            if x_rg and autocast and rs != c:
                s.add(f"{key}.wcast", c * fin * fout)
            return True
        if (i, name) not in adapted:
            return x_rg  # frozen linear: saves only its weight, which is a parameter
        r, xd = adapted[i, name], x
        if drop and r:
            xd = s.add(f"{key}.xdrop", c * n * fin)
            if x_rg:  # CUDA's fused dropout keeps a bool mask; the CPU path a scaled mask in the input dtype
                s.add(f"{key}.mask", (1 if device == "cuda" else c) * n * fin)
        # qdora.adapter_function.AdapterFunction saves x, x_d, A x, A in the compute dtype (a copy
        # when the adapters are stored in another dtype) and keeps s B (diag(g) s B) in the compute
        # dtype; QDoRA also saves the output and g (A, B, m, the bias and the cached norm persist)
        s.add(x, c * n * fin)
        s.add(xd, c * n * fin)
        if r:
            s.add(f"{key}.ax", c * n * r)
            if x_rg and DTYPES[adapter.adapter_dtype] != DTYPES[adapter.compute_dtype]:
                s.add(f"{key}.Ac", c * r * fin)  # only for the input gradient
            if not recompute:
                s.add(f"{key}.Bs", c * fout * r)
        if adapter.method == "qdora":
            s.add(f"{key}.out", c * n * fout)
            s.add(f"{key}.g", 4 * fout)
        return True

    hd, q, kv = dims["q_proj"][1] // nh, dims["q_proj"][1], dims["k_proj"][1]
    x, xs = norm("ln1", res_rg)
    q_rg, k_rg, v_rg = (linear(p, x, xs, res_rg) for p in ("q_proj", "k_proj", "v_proj"))
    if q_rg or k_rg:
        s.add("rope.cos", rs * seq * hd)  # shared by every block
        s.add("rope.sin", rs * seq * hd)
    attn_rg = q_rg or k_rg or v_rg
    if attn_rg:  # SDPA (flash): q and k after RoPE, v, output, log-sum-exp
        for name, size in (("q", c * n * q), ("k", c * n * kv), ("v", c * n * kv), ("attn", c * n * q),
                           ("lse", 4 * n * nh)):
            s.add(f"{i}.sdpa.{name}", size)
    o_rg = linear("o_proj", f"{i}.sdpa.attn", c, attn_rg)
    mid_rg = res_rg or o_rg
    x, xs = norm("ln2", mid_rg)
    gate_rg, up_rg = (linear(p, x, xs, mid_rg) for p in ("gate_proj", "up_proj"))
    inter = dims["gate_proj"][1]
    if gate_rg:
        s.add(f"{i}.gate_proj.out", c * n * inter)  # SiLU's input
    if up_rg:
        s.add(f"{i}.silu", c * n * inter)
    if gate_rg:
        s.add(f"{i}.up_proj.out", c * n * inter)
    down_rg = linear("down_proj", f"{i}.prod", c, gate_rg or up_rg)
    return mid_rg or down_rg


def activations(cfg, adapter: AdapterConfig, adapted: dict[tuple[int, str], int], batch_size: int, seq_len: int,
                device: str = "cuda") -> dict[str, int]:
    """Saved-tensor bytes: `saved` without checkpointing; with it, `stored` (block inputs and what
    lies outside the blocks, kept all along) and `block` (one block's activations, recomputed in
    backward)."""
    ft = adapter.method == "ft"
    c = DTYPES[adapter.compute_dtype].itemsize
    rs = DTYPES[adapter.adapter_dtype].itemsize if ft else c
    h, n, rows = cfg.hidden_size, batch_size * seq_len, batch_size * (seq_len - 1)

    def outside(s: _Saved, res_rg: bool) -> None:
        if ft:
            s.add("ids", 8 * n)  # the embedding's indices
        if res_rg:  # final norm (its input is the last block's output)
            s.add(f"{cfg.num_hidden_layers}.final.f32" if rs != 4 else f"res{cfg.num_hidden_layers}", 4 * n * h)
            s.add("final.rsqrt", 4 * n)
            if ft:
                s.add("final.normed", rs * n * h)
        # answer_loss: the answer-token mask, the gathered hidden rows and their targets
        s.add("loss.keep", rows)
        s.add("loss.hidden", (rs if ft else c) * rows * h)
        s.add("loss.targets", 8 * rows)

    full = _Saved()
    rg = ft
    for i in range(cfg.num_hidden_layers):
        rg = _block(full, i, cfg, adapter, adapted, n, seq_len, rg, device)
    outside(full, rg)

    stored = _Saved()
    for i in range(cfg.num_hidden_layers):
        stored.add(f"res{i}", rs * n * h)  # checkpoint inputs
    dims = _layer_dims(cfg)
    for (i, name), r in adapted.items():  # the adapter function's s B lives on its graph node, not recomputed
        if r and not ft:
            stored.add(f"{i}.{name}.Bs", DTYPES[adapter.compute_dtype].itemsize * dims[name][1] * r)
    outside(stored, True)
    block = 0
    for i in range(cfg.num_hidden_layers):
        one = _Saved()
        _block(one, i, cfg, adapter, adapted, n, seq_len, True, device, recompute=True)
        block = max(block, one.total())
    tail = _Saved()
    outside(tail, True)
    return {"saved": full.total(), "stored": stored.total(), "block": block, "outside": tail.total()}
