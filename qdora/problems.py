"""Seeded template generator of grade-school math word problems (the offline default data set).

Every problem is a short story with small integers and one or two arithmetic steps (shopping,
sharing, ages, rates, temperatures, collections). The answer is a one- or two-line worked solution
ending with a GSM8K-style line `#### N`, so the same scorer handles it, GSM8K and Orca-Math.
Nothing is downloaded: the data is a pure function of (n, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NAMES = (("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"),
         ("Farid", "he"), ("Grace", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jack", "he"),
         ("Kira", "she"), ("Liam", "he"), ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"),
         ("Pedro", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Tom", "he"))
GOODS = ("pencil", "notebook", "apple", "sandwich", "ticket", "book", "toy car", "cupcake",
         "bottle of juice", "pack of stickers")
THINGS = ("marbles", "stickers", "cookies", "stamps", "shells", "cards", "beads", "candies")
CITIES = ("Oslo", "Denver", "Kyiv", "Toronto", "Moscow", "Helsinki", "Calgary", "Chicago")
VEHICLES = ("car", "bus", "train", "truck")


@dataclass(frozen=True)
class Problem:
    """One generated problem: the template's name, the numbers it drew, the text and the value."""

    kind: str
    numbers: dict[str, int] = field(hash=False)
    question: str
    answer: str
    value: int


def _plural(noun: str) -> str:
    if noun.startswith(("bottle of", "pack of")):
        head, _, rest = noun.partition(" of ")
        return f"{head}s of {rest}"
    return noun + "s"


def _people(rng: random.Random, k: int) -> list[tuple[str, str]]:
    return rng.sample(NAMES, k)


def _shopping(rng: random.Random) -> Problem:
    (name, _), item = _people(rng, 1)[0], rng.choice(GOODS)
    a, p = rng.randint(2, 9), rng.randint(2, 12)
    v = a * p
    q = f"{name} buys {a} {_plural(item)} for ${p} each. How many dollars does {name} spend?"
    return Problem("shopping", {"a": a, "p": p}, q, f"{name} spends {a} * {p} = {v} dollars.\n#### {v}", v)


def _change(rng: random.Random) -> Problem:
    (name, he), item = _people(rng, 1)[0], rng.choice(GOODS)
    a, p = rng.randint(2, 6), rng.randint(2, 9)
    m = a * p + rng.randint(1, 20)
    v = m - a * p
    q = (f"{name} has ${m}. {he.capitalize()} buys {a} {_plural(item)} that cost ${p} each. "
         f"How many dollars does {name} have left?")
    s = f"The {_plural(item)} cost {a} * {p} = {a * p} dollars.\n{name} has {m} - {a * p} = {v} dollars left.\n#### {v}"
    return Problem("change", {"m": m, "a": a, "p": p}, q, s, v)


def _two_items(rng: random.Random) -> Problem:
    (name, _), (item1, item2) = _people(rng, 1)[0], rng.sample(GOODS, 2)
    a, p, b, c = rng.randint(2, 5), rng.randint(2, 9), rng.randint(2, 5), rng.randint(2, 9)
    v = a * p + b * c
    q = (f"{name} buys {a} {_plural(item1)} at ${p} each and {b} {_plural(item2)} at ${c} each. "
         f"How many dollars does {name} spend in total?")
    s = f"{a} * {p} = {a * p} and {b} * {c} = {b * c}.\nIn total {a * p} + {b * c} = {v} dollars.\n#### {v}"
    return Problem("two_items", {"a": a, "p": p, "b": b, "c": c}, q, s, v)


def _sharing(rng: random.Random) -> Problem:
    (name, _), things = _people(rng, 1)[0], rng.choice(THINGS)
    k, each = rng.randint(2, 8), rng.randint(2, 12)
    t = k * each
    q = (f"{name} has {t} {things} and shares them equally among {k} friends. "
         f"How many {things} does each friend get?")
    return Problem("sharing", {"t": t, "k": k}, q, f"Each friend gets {t} / {k} = {each} {things}.\n#### {each}", each)


def _sharing_left(rng: random.Random) -> Problem:
    (name, he), things = _people(rng, 1)[0], rng.choice(THINGS)
    k, each, e = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    t = k * each + e
    q = (f"{name} has {t} {things}. {he.capitalize()} keeps {e} and shares the rest equally among "
         f"{k} friends. How many {things} does each friend get?")
    s = f"{name} shares {t} - {e} = {t - e} {things}.\nEach friend gets {t - e} / {k} = {each}.\n#### {each}"
    return Problem("sharing_left", {"t": t, "e": e, "k": k}, q, s, each)


def _ages(rng: random.Random) -> Problem:
    (n1, _), (n2, _) = _people(rng, 2)
    a, b, c = rng.randint(5, 40), rng.randint(2, 15), rng.randint(2, 10)
    v = a + b + c
    q = f"{n1} is {a} years old. {n2} is {b} years older than {n1}. How old will {n2} be in {c} years?"
    s = f"{n2} is {a} + {b} = {a + b} years old now.\nIn {c} years {n2} will be {a + b} + {c} = {v}.\n#### {v}"
    return Problem("ages", {"a": a, "b": b, "c": c}, q, s, v)


def _rate(rng: random.Random) -> Problem:
    (name, _), vehicle = _people(rng, 1)[0], rng.choice(VEHICLES)
    s, h = 5 * rng.randint(4, 14), rng.randint(2, 6)
    v = s * h
    q = f"{name} drives a {vehicle} at {s} miles per hour for {h} hours. How many miles does {name} travel?"
    return Problem("rate", {"s": s, "h": h}, q, f"{name} travels {s} * {h} = {v} miles.\n#### {v}", v)


def _wages(rng: random.Random) -> Problem:
    (name, he) = _people(rng, 1)[0]
    r, h, d = rng.randint(10, 25), rng.randint(4, 8), rng.randint(5, 12)
    v = r * h * d
    q = (f"{name} earns ${r} per hour and works {h} hours a day. "
         f"How many dollars does {he} earn in {d} days?")
    s = f"{name} earns {r} * {h} = {r * h} dollars a day.\nIn {d} days {he} earns {r * h} * {d} = {v} dollars.\n#### {v}"
    return Problem("wages", {"r": r, "h": h, "d": d}, q, s, v)


def _temperature(rng: random.Random) -> Problem:
    city = rng.choice(CITIES)
    t, d = rng.randint(-5, 12), rng.randint(3, 20)
    v = t - d
    q = (f"In {city} the temperature was {t} degrees at noon. By midnight it had dropped by {d} degrees. "
         f"What was the temperature at midnight?")
    return Problem("temperature", {"t": t, "d": d}, q, f"The temperature was {t} - {d} = {v} degrees.\n#### {v}", v)


def _collection(rng: random.Random) -> Problem:
    (name, he), things = _people(rng, 1)[0], rng.choice(THINGS)
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    v = a + b - c
    q = (f"{name} has {a} {things}. {he.capitalize()} gets {b} more and then gives away {c}. "
         f"How many {things} does {name} have now?")
    s = f"{name} has {a} + {b} = {a + b} {things}.\nAfter giving away {c}, {he} has {a + b} - {c} = {v}.\n#### {v}"
    return Problem("collection", {"a": a, "b": b, "c": c}, q, s, v)


TEMPLATES = {f.__name__.lstrip("_"): f for f in (
    _shopping, _change, _two_items, _sharing, _sharing_left, _ages, _rate, _wages, _temperature, _collection)}


def sample_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct problems (distinct question texts), the templates drawn uniformly; deterministic for `seed`."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"number of problems must be a non-negative integer, got {n!r}")
    rng = random.Random(seed)
    kinds = sorted(TEMPLATES)
    seen, out = set(), []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        problem = TEMPLATES[rng.choice(kinds)](rng)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    if len(out) < n:
        raise ValueError(f"could only generate {len(out)} distinct problems of the {n} asked; ask for fewer")
    return out


def generate_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct math word problems as rows {"question", "answer"}; the answer is a short worked
    solution ending with `#### N` (GSM8K style). Deterministic for `seed`; different seeds give
    different (possibly overlapping) problem sets, so hold out by splitting one call's output."""
    return [{"question": p.question, "answer": p.answer} for p in sample_problems(n, seed)]
