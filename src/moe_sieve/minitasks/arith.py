"""The GSM8K-shaped arithmetic word problems, and their LLM-Adapters math twin."""

from __future__ import annotations

import random

from .common import (
    CONTAINERS,
    DAYS,
    OBJECTS,
    Row,
    person,
)


def _n(count: int, noun: str) -> str:
    """``count noun`` with the noun singular for one ("1 apple"); every object noun is a regular plural."""
    return f"{count} {noun[:-1] if count == 1 else noun}"


def arith_problem(rng: random.Random) -> Row:
    """One short word problem; the answer writes every equation out, then ``#### N`` as GSM8K does."""
    name, pron, _ = person(rng)
    other, _, _ = person(rng, exclude=name)
    obj = rng.choice(OBJECTS)
    cont = rng.choice(CONTAINERS)
    kind = rng.choice(("add", "add_days", "sub", "compare", "mul", "add_sub", "mul_add", "mul_sub", "add_add"))
    a, b, c = rng.randint(1, 60), rng.randint(1, 60), rng.randint(1, 60)
    m, k = rng.randint(2, 9), rng.randint(2, 12)
    if kind == "add":
        r = a + b
        q = f"{name} has {_n(a, obj)} and buys {b} more. How many {obj} does {name} have now?"
        s = f"{name} has {a} + {b} = {_n(r, obj)} now."
    elif kind == "add_days":
        d1, d2 = rng.sample(DAYS, 2)
        r = a + b
        q = f"{name} collected {_n(a, obj)} on {d1} and {_n(b, obj)} on {d2}. "
        q += f"How many {obj} did {pron} collect in total?"
        s = f"In total {pron} collected {a} + {b} = {_n(r, obj)}."
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        r = a - b
        q = f"{name} has {_n(a, obj)} and gives {b} of them to {other}. How many {obj} does {name} have left?"
        s = f"{name} has {a} - {b} = {_n(r, obj)} left."
    elif kind == "compare":
        a, b = max(a, b), min(a, b)
        r = a - b
        q = f"{name} has {_n(a, obj)} and {other} has {_n(b, obj)}. How many more {obj} does {name} have than {other}?"
        s = f"{name} has {a} - {b} = {_n(r, 'more ' + obj)} than {other}."
    elif kind == "mul":
        r = m * k
        q = f"{name} has {m} {cont} with {k} {obj} in each. How many {obj} does {name} have?"
        s = f"{name} has {m} * {k} = {_n(r, obj)}."
    elif kind == "add_sub":
        t = a + b
        c = rng.randint(1, min(60, t))
        r = t - c
        q = (
            f"{name} has {_n(a, obj)}. {pron.capitalize()} buys {b} more and then gives {c} to {other}. "
            f"How many {obj} does {name} have now?"
        )
        s = f"After buying, {name} has {a} + {b} = {_n(t, obj)}. "
        s += f"After giving {c} away, {pron} has {t} - {c} = {_n(r, obj)}."
    elif kind == "mul_add":
        t = m * k
        r = t + c
        q = (
            f"{name} already has {_n(c, obj)} and buys {m} {cont} with {k} {obj} in each. "
            f"How many {obj} does {name} have now?"
        )
        s = f"{name} buys {m} * {k} = {_n(t, obj)}. With the {c} {pron} had, that is {t} + {c} = {_n(r, obj)}."
    elif kind == "mul_sub":
        t = m * k
        c = rng.randint(1, min(60, t))
        r = t - c
        q = (
            f"{name} has {m} {cont} with {k} {obj} in each. {pron.capitalize()} gives {_n(c, obj)} to {other}. "
            f"How many {obj} does {name} have left?"
        )
        s = f"{name} starts with {m} * {k} = {_n(t, obj)}. After giving {c} away, {t} - {c} = {_n(r, obj)} left over."
    else:
        d1, d2, d3 = rng.sample(DAYS, 3)
        t = a + b
        r = t + c
        q = f"{name} found {_n(a, obj)} on {d1}, {b} on {d2} and {c} on {d3}. "
        q += f"How many {obj} did {pron} find altogether?"
        s = f"On the first two days {pron} found {a} + {b} = {_n(t, obj)}. "
        s += f"Adding the third day, {t} + {c} = {_n(r, obj)}."
    return {"question": q, "answer": f"{s}\n#### {r}"}


LLM_ADAPTERS_MATH = "llm-adapters-math"


def llm_adapters_math_row(row: Row) -> Row:
    """An arithmetic problem as a Math50K / math test-set row: the worked answer ends in "The answer is N." (the
    form LLM-Adapters' rationales take, whose last number its evaluate.py reads) and ``answer`` is N."""
    steps, _, result = str(row["answer"]).rpartition("\n#### ")
    return {"instruction": row["question"], "input": "", "output": f"{steps} The answer is {result}.", "answer": result}
