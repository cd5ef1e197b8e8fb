"""Exact-match evaluation of the final answer of math word problems (GSM8K, Orca-Math, builtin).

extract_answer pulls the final number out of a model output or a gold solution; answers_match
compares two of them numerically; generate does batched greedy decoding with the KV cache; evaluate
ties them together and writes every prediction to a JSONL file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from tqdm import tqdm

from .data import encode_prompt, prompt_text

# A number: optional sign (not when glued to a word or digit, as in "16-3"), digits with an
# optional decimal part or a leading-dot decimal, optionally a fraction "3/4".
_NUM = r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?"
_NUM_RE = re.compile(_NUM)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:approximately\s*|about\s*)?(" + _NUM + ")", re.I)


def _clean(text: str) -> str:
    """Unify the spellings of numbers: unicode minus, $ signs, thousands commas, LaTeX fractions."""
    text = text.replace("\u2212", "-").replace("$", "").replace("\\!", "")
    text = _THOUSANDS_RE.sub("", text)
    return _FRAC_RE.sub(r"\1/\2", text)


def normalize_number(num: str) -> str:
    """Canonical text of one number: no leading zeros, no trailing decimal zeros (2.50 -> 2.5,
    3.0 -> 3), no "-0"; fractions stay fractions ("3/4")."""
    sign, body = ("-", num[1:]) if num.startswith("-") else ("", num)
    if "/" in body:
        top, bottom = body.split("/", 1)
        body = f"{normalize_number(top)}/{normalize_number(bottom)}"
        return sign + body
    whole, _, frac = body.partition(".")
    frac = frac.rstrip("0")
    body = str(int(whole or "0")) + ("." + frac if frac else "")
    return body if body == "0" else sign + body


def _first_number(text: str) -> str | None:
    match = _NUM_RE.search(text)
    return normalize_number(match.group()) if match else None


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer of a model output or gold solution, normalized, or None.

    Looks, in order, for the text after the last `####`, the last `\\boxed{...}`, the last
    "answer is N", and otherwise takes the last number in the text. Commas, $ and units are
    dropped, negatives kept, fractions kept as "3/4" (answers_match treats 3/4 == 0.75).
    """
    if not text:
        return None
    text = _clean(text)
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    boxed = _BOXED_RE.findall(text)
    if boxed:
        found = _first_number(boxed[-1])
        if found is not None:
            return found
    answer_is = _ANSWER_IS_RE.findall(text)
    if answer_is:
        return normalize_number(answer_is[-1])
    numbers = _NUM_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _as_fraction(value: str) -> Fraction | None:
    try:
        return Fraction(_clean(value).strip().rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when two extracted answers are the same number (1250 == 1,250, 0.75 == 3/4, 3 == 3.0)."""
    if pred is None or gold is None:
        return False
    a, b = _as_fraction(pred), _as_fraction(gold)
    if a is None or b is None:
        return normalize_text(pred) == normalize_text(gold)
    return a == b


def normalize_text(value: str) -> str:
    return _clean(value).strip().rstrip(".").lower()


def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` (new text only), batched with left padding and the KV cache.

    Prompts are tokenized exactly as data.encode_example tokenizes them for training, so the model
    is scored on the distribution it was trained on.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
            ids = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            # The budget as max_length (prompts are left-padded to one length): many models' generation
            # configs set max_length, and max_new_tokens beside it makes transformers warn on every call.
            out = model.generate(**enc, max_length=enc["input_ids"].shape[1] + max_new_tokens, do_sample=False,
                                 top_p=None, top_k=None, temperature=None, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate(model: nn.Module, tokenizer, rows, max_new_tokens: int = 64, batch_size: int = 16,
             out_path: str | None = None) -> dict:
    """Exact match of the final answer on `rows` (a Dataset with question and answer columns).

    Runs in eval mode under no_grad (each module's train/eval mode is restored afterwards) and, if
    `out_path` is given, writes one JSON line per row with question, gold, prediction, extracted
    prediction and correct (written to a temporary name, then renamed, so a crash leaves no half file).
    """
    if len(rows) == 0:
        raise ValueError("evaluate got 0 rows; pass a non-empty held-out set (check eval_rows)")
    questions, golds = list(rows["question"]), list(rows["answer"])
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            texts = generate(model, tokenizer, [prompt_text(tokenizer, q) for q in questions],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    finally:
        for m, training in modes.items():
            m.training = training
    records = []
    for question, gold, text in zip(questions, golds, texts):
        pred, want = extract_answer(text), extract_answer(gold)
        records.append({"question": question, "gold": gold, "gold_answer": want, "prediction": text,
                        "extracted": pred, "correct": answers_match(pred, want)})
    correct = sum(r["correct"] for r in records)
    if out_path is not None:
        write_jsonl(records, out_path)
    return {"accuracy": correct / len(records), "correct": correct, "n": len(records)}


def write_jsonl(records: list[dict], path: str) -> None:
    """Write `records` as JSON lines atomically (temporary file in the same folder, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class EvalConfig:
    """Score a trained run on held-out problems.

    Args:
        run: a `qdora train` output folder (or its adapter/ folder).
        data: data source to score; default the run's own data and held-out split.
        eval_rows: held-out rows; default the run's.
        preset: split preset (answerai-orca); default the run's.
        nf4: quantize the run's dense weights to NF4 before scoring (the "FT then NF4" baseline;
            only for method=ft runs).
        max_new_tokens: generation budget per answer.
        batch_size: prompts per generation batch.
        out: predictions JSONL path; default RUN/predictions_eval.jsonl (or _nf4).
        device: auto (CUDA when available), cpu or cuda.
    """

    run: str
    data: str | None = None
    eval_rows: int | None = None
    preset: str | None = None
    nf4: bool = False
    max_new_tokens: int = 64
    batch_size: int = 20
    out: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        from .data import PRESETS

        if not os.path.isdir(self.run):
            raise FileNotFoundError(f"run folder {self.run!r} does not exist; pass a `qdora train` output folder")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_rows is not None and (not isinstance(self.eval_rows, int) or self.eval_rows < 1):
            raise ValueError(f"eval_rows must be a positive integer, got {self.eval_rows!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown split preset {self.preset!r}; choose one of {sorted(PRESETS)} or leave it out")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible; use --device cpu")
        if self.out is not None:
            folder = os.path.dirname(os.path.abspath(self.out))
            if os.path.isdir(self.out):
                raise ValueError(f"out {self.out!r} is a folder; pass a file path such as {self.out}/predictions.jsonl")
            parent = folder
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise ValueError(f"out {self.out!r} cannot be written ({parent!r} is not a writable folder); "
                                 f"pass another path")


def quantize_dense(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   targets: tuple[str, ...] = ("all-linear",)) -> None:
    """Round every target linear weight of a dense model through NF4 in place (FT then NF4)."""
    from .model import find_targets
    from .nf4 import NF4Weight

    with torch.no_grad():
        for name in find_targets(model, targets):
            w = model.get_submodule(name).weight
            w.copy_(NF4Weight.quantize(w, blocksize, double_quant).dequantize(w.dtype))


def read_run_config(run: str) -> dict:
    """The saved configuration of a run ({"step", "train", "adapter"}), with a clear error when it is
    not valid JSON or lacks a section."""
    from .checkpoint import CONFIG, find_adapter

    path = os.path.join(find_adapter(run), CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path!r} is not valid JSON ({exc}); the checkpoint is corrupt: train the run again "
                         f"or restore the file") from None
    missing = [k for k in ("train", "adapter") if not isinstance(meta, dict) or not isinstance(meta.get(k), dict)]
    if missing:
        raise ValueError(f"{path!r} has no {missing[0]!r} section; it was not written by `qdora train`")
    return meta


def eval_run(cfg: EvalConfig) -> dict:
    """Exact match of a trained run (merged for speed) on its held-out problems or on `cfg.data`."""
    from .checkpoint import load_run
    from .data import load_rows, split_rows
    from .model import DTYPES, merged
    from .train import resolve_device

    device = resolve_device(cfg.device)
    # Everything that can be checked without the model is checked first: the run's configuration,
    # --nf4 against its method, the data and the split.
    meta = read_run_config(cfg.run)
    train_cfg, adapter = meta["train"], meta["adapter"]
    if cfg.nf4 and adapter["method"] != "ft":
        raise ValueError(f"--nf4 quantizes a fully fine-tuned model; this run used method={adapter['method']} "
                         f"(leave --nf4 out, or pass a method=ft run)")
    rows = load_rows(cfg.data or train_cfg["data"])
    eval_rows = cfg.eval_rows if cfg.eval_rows is not None else train_cfg["eval_rows"]
    preset = cfg.preset if cfg.preset is not None else train_cfg["preset"]
    _, held_out = split_rows(rows, eval_rows, train_cfg["seed"], preset)
    if len(held_out) == 0:
        raise ValueError(f"run {cfg.run!r} held out no rows (eval_rows=0); pass --eval_rows=N")
    model, tokenizer, meta = load_run(cfg.run, device)
    if cfg.nf4:
        quantize_dense(model, adapter["blocksize"], adapter["double_quant"], tuple(adapter["targets"]))
    out = cfg.out or os.path.join(cfg.run, f"predictions_eval{'_nf4' if cfg.nf4 else ''}.jsonl")
    compute = DTYPES[adapter["compute_dtype"]]
    with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32), merged(model, compute):
        result = evaluate(model, tokenizer, held_out, cfg.max_new_tokens, cfg.batch_size, out)
    print(f"exact match {result['correct']}/{result['n']} = {result['accuracy']:.3f}; predictions in {out}")
    return result
