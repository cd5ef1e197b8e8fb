"""The memory model against tensors measured on small real models (prepared by prepare_model)."""

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import STORIES, need
from qdora.cli import main
from qdora.dora import DoRALinear
from qdora.memory import SHIPPED, MemoryConfig, load_config, memory, predict
from qdora.model import DTYPES, AdapterConfig, prepare_model
from qdora.nf4 import NF4Weight
from qdora.loss import answer_loss

TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
B, T = 2, 48
TOL = 0.10


def measure(hf_config, adapter: AdapterConfig, checkpointing: bool) -> dict[str, int]:
    """Bytes by category on the real prepared model: tensors by kind, gradients and AdamW state after
    one step, and the unique storages autograd saves during one forward of the training loss."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).float()
    model, _ = prepare_model(model, adapter)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = dict.fromkeys(("nf4_weights", "nf4_scales", "frozen_weights", "adapters"), 0)
    owned = {}
    for m in model.modules():  # classified by what each module owns, independently of qdora.memory
        if isinstance(m, NF4Weight):
            owned[m.packed.untyped_storage().data_ptr()] = ("nf4_weights", m.packed.untyped_storage().nbytes())
            for t in (m.absmax, m.absmax2, m.code2, m.offset):
                owned[t.untyped_storage().data_ptr()] = ("nf4_scales", t.untyped_storage().nbytes())
    for t in (*model.parameters(), *model.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            trainable = t.requires_grad or any(t is b for m in model.modules() if isinstance(m, DoRALinear)
                                               for b in (m.row_scale, m.w0_sq))
            owned[st.data_ptr()] = ("adapters" if trainable else "frozen_weights", st.nbytes())
    for kind, nbytes in owned.values():
        got[kind] += nbytes

    ids = torch.randint(0, hf_config.vocab_size, (B, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute = DTYPES[adapter.compute_dtype]
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):  # as qdora.train does
            loss = answer_loss(model, batch)
    for t in kept_on_ctx(loss):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    caches = {m._norm_cache[2].untyped_storage().data_ptr() for m in model.modules()
              if isinstance(m, DoRALinear) and m._norm_cache is not None}
    got["adapters"] += sum(saved.get(p, 0) for p in caches)  # the persistent norm cache
    got["activations"] = sum(v for p, v in saved.items() if p not in owned and p not in caches)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    got["gradients"] = sum(p.grad.untyped_storage().nbytes() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    got["optimizer"] = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values())
    return got


def kept_on_ctx(loss: torch.Tensor) -> list[torch.Tensor]:
    """Tensors that autograd functions keep as ctx attributes rather than saved tensors (the
    adapter function's scaled B), found by walking the graph. Checkpointed blocks are in the graph
    too (only their saved tensors are dropped), so these stay alive under checkpointing."""
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += [v for v in vars(node).values() if isinstance(v, torch.Tensor)] if hasattr(node, "__dict__") else []
        stack += [nxt for nxt, _ in node.next_functions]
    return found


def close(pred: int, meas: int) -> bool:
    return abs(pred - meas) <= TOL * meas


CASES = [("qdora", {}), ("qlora", {}), ("ft", {}),
         ("qdora", dict(dropout=0.1, targets="q_proj,v_proj,down_proj", magnitude_only="v_proj")),
         ("qlora", dict(dropout=0.1, double_quant=False)), ("ft", dict(adapter_dtype="bfloat16")),
         ("qdora", dict(compute_dtype="float32", targets="layers.1.self_attn.q_proj,mlp.up_proj"))]


@pytest.mark.parametrize("method,options", CASES)
def test_prediction_matches_measured(method, options):
    hf_config = LlamaConfig(**TINY)
    adapter = AdapterConfig(method=method, rank=8, **options)
    got = measure(hf_config, adapter, checkpointing=False)
    got_ckpt = measure(hf_config, adapter, checkpointing=True)
    pred = predict(hf_config, adapter, seq_len=T, batch_size=B, checkpointing=False, device="cpu")
    rows = {k: (pred["gpu"][k], got[k]) for k in got if k not in ("activations", "gradients")}
    rows["gradients"] = (pred["gradients"], got["gradients"])
    rows["activations (no checkpointing)"] = (pred["activations"]["saved"], got["activations"])
    rows["total (no checkpointing)"] = tuple(map(sum, zip(*rows.values())))
    rows["activations kept under checkpointing"] = (pred["activations"]["stored"], got_ckpt["activations"])
    bad = {k: v for k, v in rows.items() if not close(*v)}
    assert not bad, f"{method}: predicted vs measured bytes off by more than {TOL:.0%}: {bad}"
    assert got["nf4_weights"] > 0 if method != "ft" else got["nf4_weights"] == 0


def test_stories260k_activations_and_weights():
    """The real tiny Llama (tied embeddings, 172-wide MLP padded to 192 in NF4)."""
    path = need(STORIES)
    hf_config = load_config(str(path))
    adapter = AdapterConfig(method="qdora", rank=4)
    got = measure(hf_config, adapter, checkpointing=False)
    pred = predict(hf_config, adapter, seq_len=T, batch_size=B, device="cpu")
    for key in ("nf4_weights", "nf4_scales", "frozen_weights", "adapters", "optimizer"):
        assert close(pred["gpu"][key], got[key]), (key, pred["gpu"][key], got[key])
    assert close(pred["gradients"], got["gradients"])
    assert close(pred["activations"]["saved"], got["activations"])


def test_a_wrong_model_fails():
    """The comparison can fail: a prediction for the wrong method or sequence misses the measurement."""
    hf_config = LlamaConfig(**TINY)
    got = measure(hf_config, AdapterConfig(method="qlora", rank=8), checkpointing=False)
    dora = predict(hf_config, AdapterConfig(method="qdora", rank=8), seq_len=T, batch_size=B)
    assert not close(dora["activations"]["saved"], got["activations"])
    short = predict(hf_config, AdapterConfig(method="qlora", rank=8), seq_len=T // 2, batch_size=B)
    assert not close(short["activations"]["saved"], got["activations"])


def test_sharding_and_offload_split():
    hf_config = load_config("llama-3-8b")
    one = predict("llama-3-8b", AdapterConfig(), world_size=1)
    two = predict(hf_config, AdapterConfig(), world_size=2, offload=True)
    assert two["gpu"]["nf4_weights"] == 0 and two["host"]["nf4_weights"] > 0
    assert abs(two["host"]["nf4_weights"] * 2 - one["gpu"]["nf4_weights"]) < 1e-3 * one["gpu"]["nf4_weights"]
    assert two["host"]["optimizer"] > 0 and two["gpu"]["optimizer"] == 0
    assert two["gpu"]["activations"] == one["gpu"]["activations"]


def test_shipped_configs_and_targets():
    assert set(SHIPPED) == {"llama-2-7b", "llama-3-8b", "mistral-7b", "llama-3-70b"}
    sizes = {}
    for name in SHIPPED:
        res = predict(load_config(name), AdapterConfig(method="qlora"), checkpointing=True)
        sizes[name] = res["trainable"]
    # LoRA rank 16 on all linear layers: published trainable counts (PEFT) are 40.0M and 41.9M
    assert sizes["llama-2-7b"] == 16 * 32 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert sizes["llama-3-8b"] == 41_943_040
    # Llama-3-8B, rank 16 on all linear layers, 2048 tokens, checkpointing, one GPU: at most 9 GiB,
    # and DoRA adds little to QLoRA
    q8 = memory(MemoryConfig("llama-3-8b"), AdapterConfig(method="qdora"))
    qlora8 = memory(MemoryConfig("llama-3-8b"), AdapterConfig(method="qlora"))
    assert q8["gpu_total_gib"] <= 9.0 and 0 < q8["gpu_total_gib"] - qlora8["gpu_total_gib"] < 0.25
    # Llama-3-70B over 2 ranks with FSDP2 and CPU offload fits two 24 GB GPUs; without offload it does not
    q70 = memory(MemoryConfig("llama-3-70b", world_size=2, offload=True))
    assert q70["gpu_total_gib"] < 20 and q70["host_all_ranks_gib"] > 2 * 16
    assert memory(MemoryConfig("llama-3-70b", world_size=2))["gpu_total_gib"] > 22.3


def test_config_errors_and_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="llama-3-8b"):
        load_config("llama-9b")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        load_config(str(tmp_path))
    with pytest.raises(ValueError, match="checkpointing"):
        MemoryConfig(checkpointing="maybe")
    with pytest.raises(ValueError, match="world_size"):
        MemoryConfig(world_size=0)
    assert main(["memory", "--config", "nope"]) == 2
    assert "shipped name" in capsys.readouterr().err
    assert main(["memory", "--config", "mistral-7b", "--method", "qlora", "--seq_len", "512",
                 "--checkpointing", "false"]) == 0
    out = capsys.readouterr().out
    assert "mistral-7b: qlora" in out and "peak per rank" in out


@pytest.mark.parametrize("method", ["qdora", "ft"])
def test_fsdp2_shards_match_prediction(method):
    """Rank 0 of 3 under qdora.distributed.shard_model (a fake process group, no communication):
    its parameters, buffers, gradients and AdamW state against the predicted per-rank bytes."""
    import torch.distributed as dist
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from qdora.distributed import local_tensor, shard_model

    hf_config, adapter, ws = LlamaConfig(**TINY), AdapterConfig(method=method, rank=8), 3
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=ws)
    try:
        model, _ = prepare_model(AutoModelForCausalLM.from_config(hf_config).float(), adapter)
        root = shard_model(model, torch.device("cpu"))
        ids = torch.randint(0, hf_config.vocab_size, (B, T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = root(answer_loss, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()
    finally:
        dist.destroy_process_group()

    def unique_bytes(tensors) -> int:
        return sum({local_tensor(t).untyped_storage().data_ptr(): local_tensor(t).untyped_storage().nbytes()
                    for t in tensors}.values())

    caches = [m._norm_cache[2] for m in model.modules() if isinstance(m, DoRALinear) and m._norm_cache]
    pred = predict(hf_config, adapter, seq_len=T, batch_size=B, world_size=ws)["gpu"]
    weights = sum(pred[k] for k in ("nf4_weights", "nf4_scales", "frozen_weights", "adapters"))
    assert weights == unique_bytes([*model.parameters(), *model.buffers(), *caches])
    assert predict(hf_config, adapter, seq_len=T, batch_size=B, world_size=ws)["gradients"] == \
        unique_bytes(p.grad for p in params)
    assert pred["optimizer"] == unique_bytes(t for s in opt.state.values() for t in s.values())
    whole = predict(hf_config, adapter, seq_len=T, batch_size=B)["gpu"]
    sharded = "adapters" if method == "ft" else "nf4_weights"  # the bulk of the weights, split over 3 ranks
    assert whole[sharded] / 3 <= pred[sharded] < whole[sharded] / 2.5


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode that are still alive, and their peak
    (CPU: what a caching allocator's `max_memory_allocated` would report, without its rounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if st.data_ptr() not in self.seen and st.nbytes():
                    self.seen.add(st.data_ptr())
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, st.data_ptr(), st.nbytes())
        return out

    def _free(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(ptr)


@pytest.mark.parametrize("method", ["qdora", "qlora", "ft"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("vocab", [256, 4096])
def test_peak_of_a_training_step(method, checkpointing, vocab):
    """The predicted peak beside weights and optimizer state (activations, logits, transient
    buffers and gradients at the peak phase) against the measured peak of live tensors over a
    second training step: within 10% for the adapters; for ft, an upper bound within 30%."""
    hf_config = LlamaConfig(**{**TINY, "vocab_size": vocab})
    adapter = AdapterConfig(method=method, rank=8)
    torch.manual_seed(0)
    model, _ = prepare_model(AutoModelForCausalLM.from_config(hf_config).float(), adapter)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, vocab, (B, 8 * T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with LiveBytes() as mem:
        for _ in range(2):  # the second step has optimizer state (counted with the weights)
            start = mem.peak = mem.live
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = answer_loss(model, batch, chunk=128)
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    measured = mem.peak - start
    pred = predict(hf_config, adapter, seq_len=8 * T, batch_size=B, checkpointing=checkpointing, loss_chunk=128,
                   device="cpu")
    predicted = sum(pred["gpu"][k] for k in ("activations", "logits", "transient", "gradients"))
    if method == "ft":
        assert measured <= predicted <= 1.3 * measured, (pred["phase"], predicted, measured)
    else:
        assert close(predicted, measured), (pred["phase"], predicted, measured)


def test_trainer_allocator_policy_keeps_then_releases_freed_memory():
    """qdora.streaming.keep_freed_memory (the CPU training loop's glibc policy): steps that allocate
    and free the same tensors keep their memory resident, so once the heap has settled (a few steps:
    how many depends on what else the process holds) they take far fewer page faults than with
    glibc's defaults (~33000 per step, every step); release_freed_memory gives the memory back.
    Each policy runs in its own child process: the policy is process-wide."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
from qdora.streaming import keep_freed_memory, release_freed_memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    ts = [torch.ones(n) for n in (16 << 20, 4 << 20, 16 << 20, 1 << 20)]
    del ts
if sys.argv[1] == "keep":
    keep_freed_memory()
base = rss()
for _ in range(6):
    step()
kept = rss() - base
f0 = faults()
for _ in range(6):
    step()
late_faults = faults() - f0
release_freed_memory()
print(kept, late_faults, rss() - base)
"""

    def run(policy: str) -> tuple[float, float, float]:
        cmd = [sys.executable, "-P", "-c", script, policy]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return tuple(map(float, out.stdout.split()))

    kept, late_faults, after = run("keep")
    _, default_faults, _ = run("default")
    if default_faults < 1000:  # huge pages (THP "always") or large base pages: nothing to compare
        pytest.skip(f"glibc's defaults took only {default_faults:.0f} page faults in 6 steps here")
    assert kept > 100, f"freed memory was not kept: {kept:.0f} MiB resident"
    assert late_faults < 0.25 * default_faults, (late_faults, default_faults)
    assert after < 50, f"release_freed_memory left {after:.0f} MiB resident"


def test_mmap_large_allocations_ends_the_training_policy():
    """Export's allocator setting after a training run in the same process: the kept-heap policy is
    off (flag, trim threshold, mmap count), so a freed large tensor leaves the resident set at once."""
    import subprocess
    import sys

    script = """
import resource, torch
from qdora.streaming import freed_memory_kept, keep_freed_memory, mmap_large_allocations
def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20
keep_freed_memory()
mmap_large_allocations()
base = rss()
t = torch.ones(64 << 20)
del t
print(int(freed_memory_kept()), rss() - base)
"""
    out = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, check=True)
    kept, resident = map(float, out.stdout.split())
    assert kept == 0
    assert resident < 16, f"a freed 256 MiB tensor left {resident:.0f} MiB resident"
