"""Data loading, held-out splits, label masking, batching and the answer-only loss.

Uses the real stories260K tokenizer/model and the real GSM8K files from ../shared/data; local
files are written in tmp_path and the datasets cache is redirected there, so nothing is downloaded
and nothing is left in ~/.cache.
"""

import json
import math

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import GSM8K, STORIES, need
from qdora.data import (IGNORE_INDEX, batches, collate, encode_example, encode_prompt, encode_rows,
                        load_rows, prompt_text, split_rows)
from qdora.problems import generate_problems

ROWS = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
         "source": "synthetic", "id": i} for i in range(12)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


@pytest.fixture(scope="module")
def tok():
    from qdora.model import load_tokenizer

    return load_tokenizer(str(need(STORIES)))


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    with open(need(GSM8K / "train.jsonl"), encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(8)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _synthetic(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(n)], "answer": [f"a{i}" for i in range(n)]})


# ---------------------------------------------------------------- load_rows


def test_load_jsonl(tmp_path):
    ds = load_rows(str(_write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    assert ds.column_names == ["question", "answer"]  # extra columns dropped
    assert ds.to_list() == [{"question": r["question"], "answer": r["answer"]} for r in ROWS]


def test_load_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), str(path))
    ds = load_rows(str(path))
    assert ds.column_names == ["question", "answer"]
    assert ds.to_list() == [{"question": r["question"], "answer": r["answer"]} for r in ROWS]


def test_load_gsm8k_file():
    path = need(GSM8K / "test.jsonl")
    ds = load_rows(str(path))
    assert len(ds) == 1319
    assert ds.column_names == ["question", "answer"]
    assert ds[0]["question"].startswith("Janet")
    assert ds[0]["answer"].split("####")[-1].strip() == "18"


def test_load_builtin():
    ds = load_rows("builtin:50")
    assert len(ds) == 50 and ds.column_names == ["question", "answer"]
    assert ds.to_list() == generate_problems(50, seed=0)
    assert len(load_rows("builtin")) == 2000


@pytest.mark.parametrize("source", ["builtin:0", "builtin:-3", "builtin:x", "builtin:"])
def test_bad_builtin(source):
    if source == "builtin:":  # an empty count means the default
        assert len(load_rows(source)) == 2000
        return
    with pytest.raises(ValueError, match="builtin:N"):
        load_rows(source)


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.parquet", "no_such_folder"])
def test_missing_path_names_it(tmp_path, name):
    missing = tmp_path / name  # absolute, so never mistaken for a hub id
    with pytest.raises(FileNotFoundError) as info:
        load_rows(str(missing))
    assert str(missing) in str(info.value)


def test_missing_columns_names_the_columns_present(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"problem": "p", "solution": "s", "extra": 1}])
    with pytest.raises(ValueError) as info:
        load_rows(str(path))
    msg = str(info.value)
    assert "'question'" in msg
    for present in ("problem", "solution", "extra"):
        assert present in msg
    with pytest.raises(ValueError, match="solution"):
        load_rows(str(path), question_field="problem")  # answer column still missing


def test_field_renaming(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl",
                        [{"problem": f"p{i}", "solution": f"s{i}", "question": "decoy"} for i in range(3)])
    ds = load_rows(str(path), question_field="problem", answer_field="solution")
    assert ds.column_names == ["question", "answer"]
    assert ds.to_list() == [{"question": f"p{i}", "answer": f"s{i}"} for i in range(3)]


def test_swapped_fields(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS[:3])
    ds = load_rows(str(path), question_field="answer", answer_field="question")
    assert ds.column_names == ["question", "answer"]
    assert ds["question"] == [r["answer"] for r in ROWS[:3]]
    assert ds["answer"] == [r["question"] for r in ROWS[:3]]


def test_zero_rows_is_a_value_error(tmp_path, monkeypatch):
    """The 0-row check itself (reached here by a loader that returns an empty table)."""
    import qdora.data as data

    monkeypatch.setattr(data, "_from_path", lambda path: _synthetic(0))
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(ValueError, match="0 rows"):
        load_rows(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("content", ["", "\n"], ids=["empty", "blank-line"])
def test_empty_jsonl_file_raises_zero_rows_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="0 rows"):
        load_rows(str(path))


def test_empty_saved_dataset_raises_zero_rows_error(tmp_path):
    _synthetic(0).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="0 rows"):
        load_rows(str(tmp_path / "saved"))


def test_same_field_for_question_and_answer_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", ROWS[:3])
    with pytest.raises(ValueError, match="both 'question'"):
        load_rows(str(path), question_field="question", answer_field="question")


# ---------------------------------------------------------------- split_rows


def test_split_sizes_disjoint_deterministic():
    ds = _synthetic(100)
    train, held = split_rows(ds, eval_rows=10, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert not set(train["question"]) & set(held["question"])
    assert sorted(list(train["question"]) + list(held["question"])) == sorted(ds["question"])
    assert {r["question"][1:] for r in held} == {r["answer"][1:] for r in held}  # rows stay whole
    again = split_rows(ds, eval_rows=10, seed=3)
    assert again[0]["question"] == train["question"] and again[1]["question"] == held["question"]
    other = split_rows(ds, eval_rows=10, seed=4)
    assert other[1]["question"] != held["question"]


def test_split_zero_eval_rows():
    train, held = split_rows(_synthetic(20), eval_rows=0, seed=0)
    assert len(train) == 20 and len(held) == 0


@pytest.mark.parametrize("eval_rows", [20, 21, -1, 2.5])
def test_split_bad_eval_rows(eval_rows):
    with pytest.raises(ValueError, match="eval_rows"):
        split_rows(_synthetic(20), eval_rows=eval_rows, seed=0)


def test_answerai_orca_preset():
    ds = _synthetic(6000)
    train, scored = split_rows(ds, eval_rows=7, seed=123, preset="answerai-orca")
    assert (len(train), len(scored)) == (1000, 500)
    assert not set(train["question"]) & set(scored["question"])
    # Deterministic, and independent of eval_rows and seed.
    train2, scored2 = split_rows(ds, eval_rows=40, seed=0, preset="answerai-orca")
    assert train2["question"] == train["question"] and scored2["question"] == scored["question"]
    # Answer.AI's protocol: shuffle with seed 42, the last 5,000 are held out, the first 500 of them scored.
    shuffled = ds.shuffle(seed=42)["question"]
    assert train["question"] == shuffled[:1000]
    assert scored["question"] == shuffled[1000:1500]
    assert train["question"] != ds["question"][:1000]  # it really is shuffled


def test_preset_errors():
    with pytest.raises(ValueError, match="5000"):
        split_rows(_synthetic(5000), eval_rows=0, seed=0, preset="answerai-orca")
    with pytest.raises(ValueError, match="unknown split preset"):
        split_rows(_synthetic(6000), eval_rows=0, seed=0, preset="orca")


# ---------------------------------------------------------------- label masking


def test_encode_example_masks_exactly_the_prompt(tok, gsm8k_rows):
    assert tok.chat_template is None  # stories260K uses the plain Question/Answer template
    for row in gsm8k_rows:
        ids, labels = encode_example(tok, row["question"], row["answer"])
        text = prompt_text(tok, row["question"])
        assert text == f"Question: {row['question'].strip()}\nAnswer:"
        prompt = tok(text)["input_ids"]  # independent tokenization, bos added
        n = len(prompt)
        assert prompt[0] == tok.bos_token_id and encode_prompt(tok, text) == prompt
        assert len(ids) == len(labels) > n
        assert ids[:n] == prompt
        assert labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:]
        assert IGNORE_INDEX not in labels[n:]
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert tok.decode(ids[n:-1]).strip() == row["answer"].strip()


def test_encode_example_needs_an_eos(tok):
    from copy import deepcopy

    broken = deepcopy(tok)
    broken.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        encode_example(broken, "q", "a")


def test_collate_pads_with_ignored_labels_and_zero_attention():
    examples = [([1, 5, 6, 7], [-100, -100, 6, 7]), ([1, 8], [-100, 8]), ([1, 9, 9], [-100, -100, 9])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0], [1, 9, 9, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100], [-100, -100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_of_real_examples_mask_padding(tok, gsm8k_rows):
    examples = [encode_example(tok, r["question"], r["answer"]) for r in gsm8k_rows]
    pad = tok.pad_token_id
    seen = 0
    for batch in batches(examples, batch_size=3, pad_id=pad, seed=0):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            match = [e for e in examples if e[0] == ids[:n].tolist()]
            assert len(match) == 1
            assert labels[:n].tolist() == match[0][1]
            assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
            assert labels[n:].eq(IGNORE_INDEX).all()
            assert ids[n:].eq(pad).all()
            seen += 1
    assert seen == len(examples)


# ---------------------------------------------------------------- batches


def _examples(n: int) -> list[tuple[list[int], list[int]]]:
    """Example i starts with the marker 1000 + i and has a length between 2 and 14."""
    return [([1000 + i] + [7] * (1 + (i * 5) % 13), [-100] + [7] * (1 + (i * 5) % 13)) for i in range(n)]


def _order(epoch_batches) -> list[list[int]]:
    return [[int(x) - 1000 for x in b["input_ids"][:, 0]] for b in epoch_batches]


@pytest.mark.parametrize("bucket", [True, False])
def test_batches_cover_each_example_once_and_are_deterministic(bucket):
    ex = _examples(23)
    e0 = _order(batches(ex, 4, pad_id=0, seed=5, epoch=0, bucket=bucket))
    assert _order(batches(ex, 4, pad_id=0, seed=5, epoch=0, bucket=bucket)) == e0
    assert sorted(i for b in e0 for i in b) == list(range(23))
    assert sorted(len(b) for b in e0) == [3] + [4] * 5
    for epoch in (1, 2):
        other = _order(batches(ex, 4, pad_id=0, seed=5, epoch=epoch, bucket=bucket))
        assert sorted(i for b in other for i in b) == list(range(23))
        assert other != e0
    assert _order(batches(ex, 4, pad_id=0, seed=6, epoch=0, bucket=bucket)) != e0


def test_bucketed_batches_are_contiguous_length_ranges():
    ex = _examples(23)  # fewer than 50 batches: one chunk, sorted by length
    ranges = sorted((min(len(ex[i][0]) for i in b), max(len(ex[i][0]) for i in b))
                    for b in _order(batches(ex, 4, pad_id=0, seed=1, bucket=True)))
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert hi <= lo, ranges


def test_batches_single_example_and_bad_size():
    assert _order(batches(_examples(1), 8, pad_id=0, seed=0)) == [[0]]
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(_examples(3), 0, pad_id=0, seed=0))


# ---------------------------------------------------------------- encode_rows


def test_encode_rows_skips_and_counts_long_rows(tok):
    rows = [{"question": "What is 1 plus 1?", "answer": "#### 2"},
            {"question": "What is 2 plus 2? " * 20, "answer": "#### 4"},
            {"question": "What is 3 plus 3?", "answer": "3 + 3 = 6 " * 30 + "\n#### 6"},
            {"question": "What is 4 plus 4?", "answer": "#### 8"}]
    lengths = [len(encode_example(tok, r["question"], r["answer"])[0]) for r in rows]
    limit = max(lengths[0], lengths[3])
    assert limit < min(lengths[1], lengths[2])
    ds = datasets.Dataset.from_list(rows)
    examples, skipped = encode_rows(ds, tok, max_length=limit)
    assert skipped == 2
    assert examples == [encode_example(tok, r["question"], r["answer"]) for r in (rows[0], rows[3])]
    examples, skipped = encode_rows(ds, tok, max_length=max(lengths))  # the limit is inclusive
    assert skipped == 0 and len(examples) == 4
    with pytest.raises(ValueError, match="max_length"):
        encode_rows(ds, tok, max_length=min(lengths) - 1)
    with pytest.raises(ValueError, match="at least 2"):
        encode_rows(ds, tok, max_length=1)


# ---------------------------------------------------------------- the answer-only loss


@pytest.fixture(scope="module")
def model():
    from qdora.model import load_model

    return load_model(str(need(STORIES)), dtype=torch.float32).eval()


def _manual_loss(model, batch, labels):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.sum()


def test_answer_loss_counts_only_answer_tokens(model, tok, gsm8k_rows):
    from qdora.loss import answer_loss

    examples = [encode_example(tok, r["question"], r["answer"]) for r in gsm8k_rows[:3]]
    assert len({len(e[0]) for e in examples}) == 3  # different lengths: the batch has padding
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        loss = answer_loss(model, batch)
        assert loss.item() > 0 and math.isfinite(loss.item())
        assert loss.item() == pytest.approx(_manual_loss(model, batch, batch["labels"]).item(), rel=1e-5)

        # Padding neither contributes nor leaks: the batch loss is the sum of the unpadded losses.
        alone = sum(answer_loss(model, collate([e], tok.pad_token_id)).item() for e in examples)
        assert loss.item() == pytest.approx(alone, rel=1e-4)

        # What sits in the padded positions does not matter.
        noisy = {k: v.clone() for k, v in batch.items()}
        pad = batch["attention_mask"] == 0
        noisy["input_ids"][pad] = torch.randint(3, 500, (int(pad.sum()),))
        assert answer_loss(model, noisy).item() == pytest.approx(loss.item(), rel=1e-5)

        # Un-masking the prompt (labels = inputs) adds exactly the prompt-token cross-entropy.
        full = {**batch, "labels": torch.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)}
        prompt_only = torch.where(batch["labels"] == IGNORE_INDEX, full["labels"], IGNORE_INDEX)
        extra = _manual_loss(model, batch, prompt_only).item()
        assert extra > 0
        assert answer_loss(model, full).item() == pytest.approx(loss.item() + extra, rel=1e-5)

        # Changing an answer target does change the loss (the test can see the answer tokens).
        changed = {**batch, "labels": batch["labels"].clone()}
        row, col = 0, len(examples[0][0]) - 2
        changed["labels"][row, col] = (changed["labels"][row, col] + 1) % 512
        assert answer_loss(model, changed).item() != pytest.approx(loss.item(), rel=1e-6)


def test_prompt_and_pad_predictions_get_no_gradient(model, tok, gsm8k_rows):
    """The loss does not depend on what the model predicts at prompt or pad positions: the gradient
    of the final hidden states there is exactly zero (their prediction targets are ignored)."""
    from qdora.loss import answer_loss

    examples = [encode_example(tok, r["question"], r["answer"]) for r in gsm8k_rows[3:5]]
    batch = collate(examples, tok.pad_token_id)
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.model.norm.register_forward_hook(keep)
    try:
        answer_loss(model, batch).backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    grad = captured["h"].grad.abs().sum(-1)  # (batch, seq)
    # Position t predicts labels[t + 1]; it is trained on iff that label is not ignored.
    trained = torch.zeros_like(batch["labels"], dtype=torch.bool)
    trained[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert grad[~trained].eq(0).all()
    assert grad[trained].gt(0).all()
    for (ids, labels), row in zip(examples, trained):
        first = labels.index(next(x for x in labels if x != IGNORE_INDEX))
        assert row.nonzero().flatten().tolist() == list(range(first - 1, len(ids) - 1))


# ---------------------------------------------------------------- chat-template prompts

# SmolLM2's own tokenizer takes ~12 s to build from its GGUF file (over the 10 s test budget), so the
# chat path is tested on the stories260K tokenizer given a ChatML-like template that starts with bos.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_encode_example_with_a_chat_template_masks_exactly_the_prompt(gsm8k_rows):
    from qdora.data import prompt_messages
    from qdora.model import load_tokenizer

    chat = load_tokenizer(str(need(STORIES)))  # its own copy: the module's `tok` stays template-free
    chat.chat_template = CHAT_TEMPLATE
    for row in gsm8k_rows:
        text = prompt_text(chat, row["question"])
        assert text == chat.apply_chat_template(prompt_messages(row["question"]), tokenize=False,
                                                add_generation_prompt=True)
        assert row["question"].strip() in text and text.endswith("<|assistant|>\n")
        prompt = chat(text, add_special_tokens=False)["input_ids"]  # the template already has bos
        assert encode_prompt(chat, text) == prompt and prompt.count(chat.bos_token_id) == 1
        ids, labels = encode_example(chat, row["question"], row["answer"])
        n = len(prompt)
        assert ids[:n] == prompt and labels[:n] == [IGNORE_INDEX] * n
        assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
        assert ids[-1] == chat.eos_token_id
        assert chat.decode(ids[n:-1]) == row["answer"].strip()
