"""Question/answer data for math fine-tuning: loading, held-out splits, prompts, tokens, batches.

Rows always have exactly the columns `question` and `answer` (Orca-Math's and GSM8K's names).
Loading is done by `datasets` (json/parquet/arrow builders, load_from_disk, the hub); the
training examples are (input_ids, labels) pairs with the loss on the answer tokens only.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch

from .problems import generate_problems

BUILTIN = "builtin"
BUILTIN_ROWS = 2000
BUILTIN_SEED = 0
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
# Answer.AI's Orca-Math protocol: shuffle with seed 42, hold out the last 5,000 rows, score the first 500.
PRESETS = {"answerai-orca": {"seed": 42, "held_out": 5000, "scored": 500}}
INSTRUCTION = "Solve the problem and give the final answer after '####'."
IGNORE_INDEX = -100


def _from_builtin(source: str) -> datasets.Dataset:
    _, _, count = source.partition(":")
    try:
        n = int(count) if count else BUILTIN_ROWS
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"bad data source {source!r}; write builtin or builtin:N with N a positive integer")
    return datasets.Dataset.from_list(generate_problems(n, seed=BUILTIN_SEED))


def _builder_for(path: Path) -> str:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"cannot read {str(path)!r}: unknown extension {path.suffix!r}; "
                         f"use one of {sorted(BUILDERS)} or a save_to_disk folder")
    return builder


def _first_split(loaded, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{source!r} has splits {sorted(loaded)} and none is named train; "
                     f"point at the one file or folder you want")


@contextmanager
def _quiet_datasets():
    """No progress bar or log line from `datasets` while it reads a local file: the read takes
    seconds, and a failure is reported as our own one-line error (its log line would repeat it)."""
    bars, level = datasets.is_progress_bar_enabled(), datasets.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _json_problem(path: Path) -> str | None:
    """Where a .json/.jsonl file stops being valid: its first bad line, or None if every line parses."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start})"
    if text.lstrip().startswith("["):  # one JSON document, not JSON Lines
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"is not valid JSON (line {exc.lineno}: {exc.msg})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg})"
    return None


def _from_path(path: Path) -> datasets.Dataset:
    try:
        with _quiet_datasets():
            return _read_path(path)
    except (StopIteration, IndexError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        if isinstance(exc, (StopIteration, IndexError)) or "corresponds to no data" in str(exc):
            raise ValueError(f"{str(path)!r} has 0 rows; point at a non-empty data set") from None
        if not isinstance(exc, datasets.exceptions.DatasetGenerationError):
            raise
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in BUILDERS)
        for file in files:
            problem = _json_problem(file) if BUILDERS.get(file.suffix.lower()) == "json" else None
            if problem:
                raise ValueError(f"data file {str(file)!r} {problem}; fix or remove that line") from None
        cause = exc.__cause__ or exc
        raise ValueError(f"cannot read data {str(path)!r} ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
                         f"the file is corrupt or not in the format its extension says") from None


def _read_path(path: Path) -> datasets.Dataset:
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"data file {str(path)!r} is empty (0 rows); point at a non-empty file")
        return datasets.load_dataset(_builder_for(path), data_files=str(path), split="train")
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return _first_split(datasets.load_from_disk(str(path)), str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise FileNotFoundError(f"folder {str(path)!r} holds no {sorted(BUILDERS)} files and is not a "
                                f"save_to_disk folder; point at a data file or folder")
    files = [p for p in files if p.stat().st_size > 0]
    if not files:
        raise ValueError(f"every data file in folder {str(path)!r} is empty (0 rows); add rows")
    builders = {_builder_for(p) for p in files}
    if len(builders) > 1:
        raise ValueError(f"folder {str(path)!r} mixes file formats {sorted(builders)}; keep one format per folder")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in BUILDERS


def _from_hub(source: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as exc:  # offline, unknown id, no train split: one line that says what to do
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load data {source!r} (not a local path; from the hub: {first}); "
                                f"pass builtin, a .jsonl/.json/.parquet/.arrow file or folder, or a reachable hub id") from None


def load_rows(source: str, question_field: str = "question", answer_field: str = "answer") -> datasets.Dataset:
    """Rows with exactly the columns question and answer from `source`.

    `source` is "builtin" (2000 generated problems, seed 0) or "builtin:N", a local
    .jsonl/.json/.parquet/.arrow file or a folder of them (or of save_to_disk output), or else a
    hub id loaded with datasets.load_dataset(source, split="train"). `question_field` and
    `answer_field` name the source's columns (renamed to question and answer).
    """
    if question_field == answer_field:
        raise ValueError(f"question_field and answer_field are both {question_field!r}; name two different columns")
    if source == BUILTIN or source.startswith(BUILTIN + ":"):
        ds = _from_builtin(source)
    else:
        path = Path(os.path.expanduser(source))
        if path.exists():
            ds = _from_path(path)
        elif _looks_local(source):
            raise FileNotFoundError(f"data path {source!r} does not exist; check the path or use builtin")
        else:
            ds = _from_hub(source)
    missing = [c for c in (question_field, answer_field) if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source!r} has no column {missing[0]!r}; its columns are {ds.column_names}; "
                         f"pass question_field/answer_field to name the right ones")
    ds = ds.select_columns([question_field, answer_field])
    renames = {old: new for old, new in ((question_field, "question"), (answer_field, "answer")) if old != new}
    ds = ds.rename_columns(renames) if renames else ds
    if len(ds) == 0:
        raise ValueError(f"{source!r} has 0 rows; point at a non-empty data set")
    return _as_text(ds, source, {"question": question_field, "answer": answer_field})


def _usable(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_text(ds: datasets.Dataset, source: str, names: dict[str, str]) -> datasets.Dataset:
    """`ds` with every question and answer as non-empty text: numbers (an answer column of ints)
    become text; an empty, null, NaN/Inf or non-scalar value is an error naming its row."""
    columns = {name: list(ds[name]) for name in names}
    for name, values in columns.items():
        for row, value in enumerate(values):
            if not _usable(value):
                what = f"no {names[name]} (null, NaN or missing)" if value is None else f"{names[name]}={value!r}"
                raise ValueError(f"{source!r} row {row + 1} has {what}; every row needs a non-empty text (or finite "
                                 f"number) {names[name]}: fix or remove that row")
    if all(isinstance(v, str) for values in columns.values() for v in values):
        return ds
    return datasets.Dataset.from_dict({name: [v if isinstance(v, str) else str(v) for v in values]
                                       for name, values in columns.items()})


def split_rows(ds: datasets.Dataset, eval_rows: int, seed: int,
               preset: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held_out): shuffle with `seed` and hold out the last `eval_rows` rows.

    preset "answerai-orca" ignores eval_rows and seed and follows Answer.AI's Orca-Math protocol:
    shuffle with seed 42, hold out the last 5,000 rows, return the first 500 of them as held_out
    (the other 4,500 are neither trained on nor scored).
    """
    n = len(ds)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown split preset {preset!r}; choose one of {sorted(PRESETS)} or none")
        p = PRESETS[preset]
        if n <= p["held_out"]:
            raise ValueError(f"preset {preset!r} holds out {p['held_out']} rows but the data has only {n}; "
                             f"use the full data set or no preset")
        shuffled = ds.shuffle(seed=p["seed"])
        return (shuffled.select(range(n - p["held_out"])),
                shuffled.select(range(n - p["held_out"], n - p["held_out"] + p["scored"])))
    if not isinstance(eval_rows, int) or eval_rows < 0 or eval_rows >= n:
        raise ValueError(f"eval_rows={eval_rows!r} must be an integer in [0, {n}) for a data set of {n} rows; "
                         f"lower eval_rows or use more data")
    shuffled = ds.shuffle(seed=seed)
    return shuffled.select(range(n - eval_rows)), shuffled.select(range(n - eval_rows, n)) if eval_rows else ds.select([])


def prompt_messages(question: str) -> list[dict[str, str]]:
    """The chat messages of a prompt: one user turn with the question and a fixed instruction."""
    return [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]


def prompt_text(tokenizer, question: str) -> str:
    """The prompt text for `question`: the tokenizer's chat template (with the assistant turn
    opened) when it has one, else the plain "Question: ...\\nAnswer:" template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages(question), tokenize=False, add_generation_prompt=True)
    return f"Question: {question.strip()}\nAnswer:"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt text; the tokenizer's special tokens (bos) are added unless the text
    (a rendered chat template) already starts with the bos token. Training and generation both use it."""
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row: prompt tokens then answer tokens then eos; labels are
    IGNORE_INDEX (-100) on the prompt so the loss is on the answer (and eos) only."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; set tokenizer.eos_token")
    prompt = encode_prompt(tokenizer, prompt_text(tokenizer, question))
    target = tokenizer(" " + answer.strip() if not getattr(tokenizer, "chat_template", None) else answer.strip(),
                       add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def encode_rows(ds: datasets.Dataset, tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Encoded examples of every row no longer than `max_length` tokens, and how many were skipped."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**9 and max_length > limit:  # huge values mean "no limit known"
        raise ValueError(f"max_length={max_length} is beyond the model's {limit} tokens (its tokenizer's "
                         f"model_max_length); pass --max_length={limit} or less")
    examples, skipped, longest = [], 0, 0
    for question, answer in zip(ds["question"], ds["answer"]):
        ids, labels = encode_example(tokenizer, question, answer)
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            skipped += 1
        else:
            examples.append((ids, labels))
    if not examples:
        raise ValueError(f"all {len(ds)} rows are longer than max_length={max_length} tokens "
                         f"(longest {longest}); raise max_length")
    return examples, skipped


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into input_ids, labels (-100 on padding), attention_mask."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int,
            epoch: int = 0, bucket: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of padded batches covering every example exactly once (the last batch may be short).

    Shuffled by (seed, epoch); with `bucket`, examples are sorted by length within chunks of 50
    batches (less padding) and the batch order is shuffled again. Deterministic for (seed, epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")  # not seed + epoch: (0, 1) and (1, 0) must differ
    order = list(range(len(examples)))
    rng.shuffle(order)
    if bucket:
        chunk = 50 * batch_size
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: len(examples[i][0]))]
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if bucket:
        rng.shuffle(groups)
    for group in groups:
        yield collate([examples[i] for i in group], pad_id)


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (contiguous; equal shares, since batch_size is a multiple
    of the world size). Only the short last batch of an epoch can leave a rank without rows: it gets
    the first row with every label ignored, contributing nothing to the loss but still running
    forward and backward with the others."""
    if world == 1:
        return batch
    rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), world)[rank]
    if rows.numel():
        return {k: v[rows] for k, v in batch.items()}
    out = {k: v[:1] for k, v in batch.items()}
    out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
    return out


def global_batches(examples, batch_size: int, pad_id: int, seed: int, epoch: int = 0, consumed: int = 0):
    """Endless (epoch, batches consumed in that epoch, batch) from a data position, identical on
    every rank: the order depends only on (seed, epoch)."""
    while True:
        for i, b in enumerate(batches(examples, batch_size, pad_id, seed, epoch)):
            if i >= consumed:
                yield epoch, i + 1, b
        epoch, consumed = epoch + 1, 0
