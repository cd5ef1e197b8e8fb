"""Answer extraction and matching on real GSM8K solutions and Orca-style free text, and evaluate()
end to end on the real stories260K model."""

import json
from decimal import Decimal
from fractions import Fraction

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qdora.evaluate as ev
from conftest import GSM8K, STORIES, need
from qdora.data import prompt_text
from qdora.evaluate import answers_match, evaluate, extract_answer, generate, normalize_number

RECORD_KEYS = {"question", "gold", "gold_answer", "prediction", "extracted", "correct"}


def _gsm8k(split: str, limit: int | None = None) -> list[dict]:
    with open(need(GSM8K / f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit]


def _final(answer: str) -> str:
    """The text after GSM8K's `####`, normalized independently of qdora: commas dropped, as an int."""
    text = answer.split("####")[-1].strip().replace(",", "")
    return str(int(text))  # every GSM8K final answer is an integer


# ---------------------------------------------------------------- extract_answer on real GSM8K


@pytest.mark.parametrize("split,limit,count", [("test", None, 1319), ("train", 2000, 2000)])
def test_extract_answer_on_gsm8k(split, limit, count):
    rows = _gsm8k(split, limit)
    assert len(rows) == count
    wrong = [(r["answer"].split("####")[-1], extract_answer(r["answer"]))
             for r in rows if extract_answer(r["answer"]) != _final(r["answer"])]
    assert not wrong, f"{len(wrong)} of {count} {split} rows mis-extracted, e.g. {wrong[:5]}"


def test_gsm8k_finals_include_commas_and_negatives():
    """The real data exercises thousands separators and negative answers (so the test above does too)."""
    finals = [r["answer"].split("####")[-1].strip() for r in _gsm8k("test")]
    assert sum("," in f for f in finals) >= 10
    assert sum(f.startswith("-") for f in finals) >= 1


# ---------------------------------------------------------------- Orca-style free text

@pytest.mark.parametrize("text,expected", [
    ("Adding the two amounts, so the answer is $1,250.", "1250"),
    ("First 7 - 10 = -3. The result is -3.", "-3"),
    ("Thus the fraction is \\boxed{3/4}", "3/4"),
    ("Thus \\boxed{\\frac{3}{4}} of the cake.", "3/4"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("She spent $7.50, so she has 2.50 dollars left", "2.5"),
    ("x = 12 apples", "12"),
    ("#### 1,000", "1000"),
    ("He had 3 boxes of 4.\n#### 12", "12"),
    ("#### -5", "-5"),
    ("The answer is: 42", "42"),
    ("The answer is approximately 3.14 meters.", "3.14"),
    ("The final answer is 5 apples, not the 7 pears.", "5"),  # "answer is N" beats the last number
    ("The boxed one wins: \\boxed{8} even though 9 comes later", "8"),
    ("It costs $0.50.", "0.5"),
    ("The total is 1,000,000 dollars.", "1000000"),
    ("The total is 5,000.50 dollars.", "5000.5"),
    ("16-3=13", "13"),  # a minus glued to a digit is subtraction, not a sign
    ("The temperature is \u22125 degrees", "-5"),  # unicode minus
    ("It is 50% of the price.", "50"),
    ("Half is .5", "0.5"),
    ("no digits at all", None),
    ("", None),
    (None, None),
])
def test_extract_answer_free_text(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("num,expected", [
    ("2.50", "2.5"), ("3.0", "3"), ("007", "7"), ("-0", "0"), ("-0.0", "0"), (".5", "0.5"),
    ("-.5", "-0.5"), ("1250", "1250"), ("-3", "-3"), ("6/8", "6/8"), ("-3/4", "-3/4"),
])
def test_normalize_number(num, expected):
    assert normalize_number(num) == expected


@pytest.mark.parametrize("pred,gold,same", [
    ("3/4", "0.75", True),
    ("0.75", "3/4", True),
    ("6/8", "3/4", True),
    ("1/2", "0.5", True),
    ("-3/4", "-0.75", True),
    ("1,250", "1250", True),
    ("1250", "1,250", True),
    ("3", "3.0", True),
    ("2.50", "2.5", True),
    ("12.", "12", True),
    ("-3", "3", False),
    ("1/3", "0.333", False),
    ("100", "1000", False),
    ("12", "120", False),
    (None, "3", False),
    ("3", None, False),
    (None, None, False),
])
def test_answers_match(pred, gold, same):
    assert answers_match(pred, gold) is same


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=-10**9, max_value=10**9))
def test_extract_integer_with_thousands_separators(n):
    assert extract_answer(f"So the total is {n:,} dollars.") == str(n)
    assert extract_answer(f"Steps 2 + 3 = 5.\n#### {n:,}") == str(n)


@settings(max_examples=200, deadline=None)
@given(p=st.integers(min_value=-10**6, max_value=10**6),
       q=st.sampled_from([1, 2, 4, 5, 8, 10, 16, 20, 25, 40, 125]))
def test_fraction_matches_its_exact_decimal(p, q):
    decimal = format(Decimal(p) / Decimal(q), "f")
    assert Fraction(decimal) == Fraction(p, q)  # the oracle itself
    assert answers_match(f"{p}/{q}", decimal)
    assert answers_match(decimal, f"{p}/{q}")
    assert not answers_match(f"{p}/{q}", format(Decimal(p + 1) / Decimal(q), "f"))


# ---------------------------------------------------------------- evaluate() end to end


@pytest.fixture(scope="module")
def stories():
    from qdora.model import load_model, load_tokenizer

    need(STORIES)
    return load_model(str(STORIES), dtype=torch.float32), load_tokenizer(str(STORIES))


@pytest.fixture(scope="module")
def three_rows() -> datasets.Dataset:
    return datasets.Dataset.from_list(_gsm8k("test", 3))


def _modes(model) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_evaluate_real_model_writes_records_and_restores_modes(stories, three_rows, tmp_path):
    model, tok = stories
    model.train()
    model.model.layers[0].eval()  # a mixed state, restored module by module
    before, side = _modes(model), tok.padding_side
    params = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "preds" / "p.jsonl"  # the folder does not exist yet

    result = evaluate(model, tok, three_rows, max_new_tokens=8, batch_size=2, out_path=str(out))

    assert _modes(model) == before
    assert model.training and not model.model.layers[0].training
    assert tok.padding_side == side
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.jsonl"]  # no temporary file left behind

    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for rec, row in zip(records, three_rows):
        assert set(rec) == RECORD_KEYS
        assert rec["question"] == row["question"] and rec["gold"] == row["answer"]
        assert rec["gold_answer"] == _final(row["answer"])
        assert isinstance(rec["prediction"], str)
        assert rec["extracted"] == extract_answer(rec["prediction"])
        assert rec["correct"] is answers_match(rec["extracted"], rec["gold_answer"])
    assert [r["gold_answer"] for r in records] == ["18", "3", "70000"]

    assert set(result) == {"accuracy", "correct", "n"}
    assert result["n"] == 3
    assert result["correct"] == sum(r["correct"] for r in records)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(result["correct"] / 3)


def test_batched_generation_equals_one_prompt_at_a_time(stories, three_rows):
    """Left padding must not change greedy completions (prompts here differ in length)."""
    model, tok = stories
    model.eval()
    prompts = [prompt_text(tok, q) for q in three_rows["question"]]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert len(batched) == 3
    assert batched == single


def test_evaluate_scores_controlled_predictions(stories, three_rows, monkeypatch, tmp_path):
    """With the model's output fixed, accuracy and the 'correct' flags are exactly right."""
    model, tok = stories
    texts = ["She makes 9 * 2 = $18.\n#### 18", "The answer is 4 bolts.", "He made a profit of $70,000."]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: list(texts))
    out = tmp_path / "p.jsonl"
    result = evaluate(model, tok, three_rows, out_path=str(out))
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["extracted"] for r in records] == ["18", "4", "70000"]
    assert [r["correct"] for r in records] == [True, False, True]
    assert result == {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3}


def test_evaluate_restores_modes_when_generation_fails(stories, three_rows, monkeypatch):
    model, _ = stories
    tok = stories[1]
    model.train()

    def boom(*args, **kwargs):
        assert not model.training  # generation runs in eval mode
        raise RuntimeError("generation failed")

    monkeypatch.setattr(ev, "generate", boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        evaluate(model, tok, three_rows)
    assert all(m.training for m in model.modules())


def test_evaluate_rejects_zero_rows(stories, three_rows):
    model, tok = stories
    with pytest.raises(ValueError, match="0 rows"):
        evaluate(model, tok, three_rows.select([]))
