"""Seeded generator of the mini tasks (GSM8K-, Spider- and HellaSwag-shaped) and of the pretraining corpus.
The arithmetic task is also written in the LLM-Adapters math format (``llm-adapters-math/{split}.json``), so
``train --data math50k:DIR`` and ``eval --data math-gsm8k:DIR`` run on it.

Nothing can be downloaded here, so the repo ships a small OLMoE-architecture model pretrained on :func:`corpus`
documents and fine-tuned on the three mini tasks. The corpus mixes four domains (arithmetic, SQL, everyday
scenes, prose + Python) so that different domains route to different experts, which is what MoE-Sieve profiles.
The task formats themselves ("Question: ... Answer: ... #### N") are kept out of the corpus, and held-out
(validation/test) task items never appear in it, so fine-tuning has something left to teach.

Every domain draws from its own ``random.Random`` derived from the seed, so changing one domain's generator leaves
the others' files unchanged, and one seed always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .facts import facts_splits

GENERATOR_VERSION = 1
SPLITS = ("train", "validation", "test")

DEFAULT_SIZES: dict[str, int] = {
    "arith_train": 2000,
    "arith_validation": 200,
    "arith_test": 200,
    "spider_train": 600,
    "spider_validation": 100,
    "spider_test": 100,
    "hellaswag_train": 1000,
    "hellaswag_validation": 200,
    "hellaswag_test": 200,
    "corpus_train_docs": 34000,
    "corpus_validation_docs": 0,  # 0: 2% of corpus_train_docs
    "facts_n": 400,  # facts/: made-up facts (train x2 templates, test recall, paraphrase); sized in docs/study.md
}
SMALL_SIZES: dict[str, int] = {
    "arith_train": 40,
    "arith_validation": 10,
    "arith_test": 10,
    "spider_train": 40,
    "spider_validation": 10,
    "spider_test": 10,
    "hellaswag_train": 20,
    "hellaswag_validation": 8,
    "hellaswag_test": 8,
    "corpus_train_docs": 400,
    "corpus_validation_docs": 20,
    "facts_n": 24,
}

Row = dict[str, Any]


def _rng(seed: int, domain: str) -> random.Random:
    """One generator per domain; string seeds are hashed with SHA-512, so they are stable across runs."""
    return random.Random(f"moe-sieve/minitasks/v{GENERATOR_VERSION}/{domain}/{seed}")


# --- shared vocabulary ----------------------------------------------------------------------------------------

NAMES: tuple[tuple[str, str], ...] = (
    ("Ada", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Ella", "she"), ("Finn", "he"),
    ("Gina", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"), ("Kira", "she"), ("Leo", "he"),
    ("Maya", "she"), ("Noah", "he"), ("Olive", "she"), ("Pablo", "he"), ("Quinn", "she"), ("Ravi", "he"),
    ("Sara", "she"), ("Tom", "he"), ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Xavier", "he"),
    ("Yara", "she"), ("Zane", "he"), ("Lina", "she"), ("Omar", "he"), ("Nora", "she"), ("Eli", "he"),
    ("Mila", "she"), ("Sam", "he"), ("Rosa", "she"), ("Igor", "he"), ("Tara", "she"), ("Milo", "he"),
    ("Hana", "she"), ("Kofi", "he"), ("Lucy", "she"), ("Arjun", "he"),
)  # fmt: skip
SURNAMES = (
    "Reed", "Stone", "Park", "Lopez", "Khan", "Nolan", "Berg", "Costa", "Silva", "Moreau", "Young", "Hale",
    "Frost", "Quill", "Ward", "Bishop", "Chen", "Diaz", "Evans", "Fox", "Grant", "Hayes", "Iver", "Joss",
)  # fmt: skip
OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "stamps", "coins", "cards",
    "balloons", "crayons", "beads", "buttons", "oranges", "eggs", "flowers", "rocks", "candles", "toy cars",
    "cupcakes", "erasers", "muffins", "feathers",
)  # fmt: skip
CONTAINERS = ("boxes", "bags", "packs", "baskets", "jars", "trays", "bowls", "crates")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_word(n: int) -> str:
    """English words for 0..999, so the corpus ties digits to the words a word problem may use."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_word covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + ("" if rest == 0 else " and " + number_word(rest))


def _person(rng: random.Random, exclude: str = "") -> tuple[str, str, str]:
    """(name, subject pronoun, possessive) so that scenes and problems refer to one person consistently."""
    while True:
        name, pron = rng.choice(NAMES)
        if name != exclude:
            return name, pron, "her" if pron == "she" else "his"


# --- arithmetic (GSM8K-shaped) ----------------------------------------------------------------------------------


def _n(count: int, noun: str) -> str:
    """``count noun`` with the noun singular for one ("1 apple"); every object noun is a regular plural."""
    return f"{count} {noun[:-1] if count == 1 else noun}"


def _arith_problem(rng: random.Random) -> Row:
    """One short word problem; the answer writes every equation out, then ``#### N`` as GSM8K does."""
    name, pron, _ = _person(rng)
    other, _, _ = _person(rng, exclude=name)
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


# --- Spider-shaped text-to-SQL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    """A column and how it is filled and talked about: ``kind`` is pk, label, cat, num or fk."""

    name: str
    kind: str
    phrase: str = ""
    values: tuple[Any, ...] = ()  # cat: choices; num: (low, high); label: pool name; fk: (parent table,)


@dataclass(frozen=True)
class Table:
    """A toy table; ``label`` names the column a question asks for ("names", "titles", "ids")."""

    name: str
    singular: str
    plural: str
    rows: tuple[int, int]
    label: str
    label_phrase: str
    cols: tuple[Col, ...]

    def of_kind(self, kind: str) -> list[Col]:
        return [c for c in self.cols if c.kind == kind]

    @property
    def pk(self) -> str:
        return self.of_kind("pk")[0].name


@dataclass(frozen=True)
class Database:
    db_id: str
    tables: tuple[Table, ...]

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def foreign_keys(self) -> list[tuple[Table, Col, Table]]:
        return [(t, c, self.table(c.values[0])) for t in self.tables for c in t.of_kind("fk")]


CITIES = ("Springfield", "Riverton", "Lakeside", "Hillview", "Oakdale", "Brookfield", "Maple Bay")
DATABASES: tuple[Database, ...] = (
    Database(
        "school",
        (
            Table("teachers", "teacher", "teachers", (6, 9), "name", "name", (
                Col("teacher_id", "pk"),
                Col("name", "label", "name", ("people",)),
                Col("subject", "cat", "subject", ("Math", "Science", "History", "Art", "Music", "English")),
                Col("age", "num", "age", (25, 64)),
            )),
            Table("students", "student", "students", (16, 26), "name", "name", (
                Col("student_id", "pk"),
                Col("name", "label", "name", ("people",)),
                Col("grade", "num", "grade", (9, 12)),
                Col("age", "num", "age", (14, 18)),
                Col("hometown", "cat", "hometown", CITIES),
                Col("teacher_id", "fk", "teacher", ("teachers",)),
            )),
        ),
    ),
    Database(
        "shop",
        (
            Table("customers", "customer", "customers", (8, 14), "name", "name", (
                Col("customer_id", "pk"),
                Col("name", "label", "name", ("people",)),
                Col("city", "cat", "city", CITIES),
                Col("age", "num", "age", (18, 70)),
            )),
            Table("products", "product", "products", (10, 16), "name", "name", (
                Col("product_id", "pk"),
                Col("name", "label", "name", ("products",)),
                Col("category", "cat", "category", ("Kitchen", "Garden", "Toys", "Books", "Sports")),
                Col("price", "num", "price", (2, 90)),
                Col("stock", "num", "stock", (0, 50)),
            )),
            Table("orders", "order", "orders", (20, 30), "order_id", "id", (
                Col("order_id", "pk"),
                Col("customer_id", "fk", "customer", ("customers",)),
                Col("product_id", "fk", "product", ("products",)),
                Col("quantity", "num", "quantity", (1, 9)),
                Col("status", "cat", "status", ("shipped", "pending", "delivered")),
            )),
        ),
    ),
    Database(
        "library",
        (
            Table("authors", "author", "authors", (6, 10), "name", "name", (
                Col("author_id", "pk"),
                Col("name", "label", "name", ("people",)),
                Col("country", "cat", "country", ("France", "Japan", "Brazil", "Canada", "Kenya", "India")),
                Col("birth_year", "num", "birth year", (1920, 1995)),
            )),
            Table("books", "book", "books", (16, 26), "title", "title", (
                Col("book_id", "pk"),
                Col("title", "label", "title", ("titles",)),
                Col("genre", "cat", "genre", ("mystery", "fantasy", "history", "poetry", "science")),
                Col("pages", "num", "number of pages", (80, 600)),
                Col("year", "num", "publication year", (1950, 2020)),
                Col("author_id", "fk", "author", ("authors",)),
            )),
        ),
    ),
    Database(
        "zoo",
        (
            Table("keepers", "keeper", "keepers", (4, 7), "name", "name", (
                Col("keeper_id", "pk"),
                Col("name", "label", "name", ("people",)),
                Col("shift", "cat", "shift", ("morning", "evening", "night")),
                Col("age", "num", "age", (20, 60)),
            )),
            Table("enclosures", "enclosure", "enclosures", (4, 7), "name", "name", (
                Col("enclosure_id", "pk"),
                Col("name", "label", "name", ("places",)),
                Col("habitat", "cat", "habitat", ("savanna", "forest", "desert", "water", "mountain")),
                Col("area", "num", "area", (50, 900)),
            )),
            Table("animals", "animal", "animals", (16, 26), "name", "name", (
                Col("animal_id", "pk"),
                Col("name", "label", "name", ("pets",)),
                Col("species", "cat", "species", ("lion", "zebra", "giraffe", "penguin", "otter", "camel", "tiger")),
                Col("age", "num", "age", (1, 30)),
                Col("weight", "num", "weight", (5, 900)),
                Col("keeper_id", "fk", "keeper", ("keepers",)),
                Col("enclosure_id", "fk", "enclosure", ("enclosures",)),
            )),
        ),
    ),
)  # fmt: skip

_LABEL_POOLS: dict[str, Callable[[], list[str]]] = {
    "people": lambda: [f"{n} {s}" for n, _ in NAMES for s in SURNAMES],
    "products": lambda: [
        f"{a} {b}"
        for a in ("Red", "Blue", "Green", "Tiny", "Big", "Golden", "Silver", "Wooden")
        for b in ("Mug", "Lamp", "Rake", "Ball", "Kite", "Puzzle", "Notebook", "Pan", "Shovel", "Racket")
    ],
    "titles": lambda: [
        f"The {a} {b}"
        for a in ("Silent", "Hidden", "Last", "Golden", "Broken", "Lost", "Bright", "Quiet", "Secret", "Wild")
        for b in ("River", "Garden", "Tower", "Letter", "Forest", "Island", "Clock", "Bridge", "Harbor", "Map")
    ],
    "places": lambda: [
        f"{a} {b}" for a in ("North", "South", "East", "West", "Sunny") for b in ("Meadow", "Pond", "Rocks")
    ],
    "pets": lambda: [
        "Luna",
        "Max",
        "Bella",
        "Rocky",
        "Daisy",
        "Oscar",
        "Coco",
        "Simba",
        "Nala",
        "Ziggy",
        "Pepper",
        "Bruno",
        "Kiwi",
        "Mango",
        "Shadow",
        "Sunny",
        "Tiki",
        "Apollo",
        "Juno",
        "Biscuit",
        "Clover",
        "Dusty",
        "Echo",
        "Fern",
        "Ginger",
        "Hazel",
        "Indie",
        "Jasper",
        "Koda",
        "Lulu",
    ],  # fmt: skip
}


def _fill_database(rng: random.Random, db: Database) -> dict[str, list[Row]]:
    """Seeded rows for every table; parents come first in ``db.tables``, so foreign keys always resolve."""
    data: dict[str, list[Row]] = {}
    for table in db.tables:
        n = rng.randint(*table.rows)
        labels = {c.name: rng.sample(_LABEL_POOLS[c.values[0]](), n) for c in table.of_kind("label")}
        rows = []
        for i in range(n):
            row: Row = {}
            for col in table.cols:
                if col.kind == "pk":
                    row[col.name] = i + 1
                elif col.kind == "label":
                    row[col.name] = labels[col.name][i]
                elif col.kind == "cat":
                    row[col.name] = rng.choice(col.values)
                elif col.kind == "num":
                    row[col.name] = rng.randint(*col.values)
                else:
                    parent = db.table(col.values[0])
                    row[col.name] = rng.choice(data[parent.name])[parent.pk]
            rows.append(row)
        data[table.name] = rows
    return data


def _sql_literal(value: Any) -> str:
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def _sql_type(col: Col) -> str:
    return "TEXT" if col.kind in ("label", "cat") else "INTEGER"


def create_table_sql(table: Table, db: Database) -> str:
    """A ``CREATE TABLE`` statement with its keys, as the sqlite file and the corpus write it."""
    parts = [f"{c.name} {_sql_type(c)}" for c in table.cols]
    parts.append(f"PRIMARY KEY ({table.pk})")
    for col in table.of_kind("fk"):
        parent = db.table(col.values[0])
        parts.append(f"FOREIGN KEY ({col.name}) REFERENCES {parent.name}({parent.pk})")
    return f"CREATE TABLE {table.name} ({', '.join(parts)})"


def _tables_json_entry(db: Database) -> Row:
    """The database in the official Spider ``tables.json`` layout (global column indices, ``*`` first)."""
    columns: list[list[Any]] = [[-1, "*"]]
    types = ["text"]
    index: dict[tuple[str, str], int] = {}
    for t_idx, table in enumerate(db.tables):
        for col in table.cols:
            index[(table.name, col.name)] = len(columns)
            columns.append([t_idx, col.name])
            types.append("text" if col.kind in ("label", "cat") else "number")
    foreign = []
    for table, col, parent in db.foreign_keys():
        foreign.append([index[(table.name, col.name)], index[(parent.name, parent.pk)]])
    return {
        "db_id": db.db_id,
        "table_names_original": [t.name for t in db.tables],
        "table_names": [t.name.replace("_", " ") for t in db.tables],
        "column_names_original": columns,
        "column_names": [[t, name.replace("_", " ") if t >= 0 else name] for t, name in columns],
        "column_types": types,
        "primary_keys": [index[(t.name, t.pk)] for t in db.tables],
        "foreign_keys": foreign,
    }


def _write_sqlite(path: Path, db: Database, data: Mapping[str, list[Row]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        for table in db.tables:
            con.execute(create_table_sql(table, db))
            names = [c.name for c in table.cols]
            marks = ", ".join("?" for _ in names)
            con.executemany(
                f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})",
                [tuple(row[n] for n in names) for row in data[table.name]],
            )
        con.commit()
    finally:
        con.close()


def _spider_pair(rng: random.Random, db: Database, data: Mapping[str, list[Row]]) -> tuple[str, str]:
    """One (question, gold query) from a template: count, filter, max/min/avg, order+limit, join, group-by.

    Every value a filter names is read from the rows, so each gold query returns at least one row.
    """
    kind = rng.choice(("count", "count_cat", "list_cat", "num_cmp", "agg", "order", "group", "join", "join_group"))
    table = rng.choice(db.tables)
    rows = data[table.name]
    p, s, t = table.plural, table.singular, table.name
    lab, lp = table.label, table.label_phrase
    cats, nums = table.of_kind("cat"), table.of_kind("num")
    fks = db.foreign_keys()
    if kind == "count":
        q = rng.choice((f"How many {p} are there?", f"Count the number of {p}.", f"What is the total number of {p}?"))
        return q, f"SELECT count(*) FROM {t}"
    if kind in ("count_cat", "list_cat") and cats:
        c = rng.choice(cats)
        v = rng.choice(rows)[c.name]
        if kind == "count_cat":
            return f"How many {p} have {c.phrase} {v}?", f"SELECT count(*) FROM {t} WHERE {c.name} = {_sql_literal(v)}"
        q = rng.choice(
            (f"What are the {lp}s of {p} whose {c.phrase} is {v}?", f"List the {lp}s of all {p} with {c.phrase} {v}.")
        )
        return q, f"SELECT {lab} FROM {t} WHERE {c.name} = {_sql_literal(v)}"
    if kind == "num_cmp" and nums:
        n = rng.choice(nums)
        values = sorted(r[n.name] for r in rows)
        if values[0] == values[-1]:
            return f"How many {p} are there?", f"SELECT count(*) FROM {t}"
        if rng.random() < 0.5:
            x, word, op = rng.randint(values[0], values[-1] - 1), "greater than", ">"
        else:
            x, word, op = rng.randint(values[0] + 1, values[-1]), "less than", "<"
        if rng.random() < 0.3:
            return f"How many {p} have {n.phrase} {word} {x}?", f"SELECT count(*) FROM {t} WHERE {n.name} {op} {x}"
        return (
            f"Find the {lp}s of {p} whose {n.phrase} is {word} {x}.",
            f"SELECT {lab} FROM {t} WHERE {n.name} {op} {x}",
        )
    if kind == "agg" and nums:
        n = rng.choice(nums)
        fn, word = rng.choice((("max", "maximum"), ("min", "minimum"), ("avg", "average")))
        if cats and rng.random() < 0.5:
            c = rng.choice(cats)
            v = rng.choice(rows)[c.name]
            q = f"What is the {word} {n.phrase} of {p} whose {c.phrase} is {v}?"
            return q, f"SELECT {fn}({n.name}) FROM {t} WHERE {c.name} = {_sql_literal(v)}"
        return f"What is the {word} {n.phrase} of all {p}?", f"SELECT {fn}({n.name}) FROM {t}"
    if kind == "order" and nums:
        n = rng.choice(nums)
        desc = rng.random() < 0.5
        word, order = ("highest", "DESC") if desc else ("lowest", "ASC")
        style = rng.randint(0, 2)
        if style == 0:
            return f"Which {s} has the {word} {n.phrase}?", f"SELECT {lab} FROM {t} ORDER BY {n.name} {order} LIMIT 1"
        if style == 1:
            k = rng.randint(2, 5)
            q = f"List the {lp}s of the {k} {p} with the {word} {n.phrase}."
            return q, f"SELECT {lab} FROM {t} ORDER BY {n.name} {order} LIMIT {k}"
        direction = "descending" if desc else "ascending"
        q = f"List the {lp}s of all {p} sorted by {n.phrase} in {direction} order."
        return q, f"SELECT {lab} FROM {t} ORDER BY {n.name} {order}"
    if kind == "group" and cats:
        c = rng.choice(cats)
        style = rng.randint(0, 2)
        if style == 0:
            return (
                f"How many {p} are there for each {c.phrase}?",
                f"SELECT {c.name}, count(*) FROM {t} GROUP BY {c.name}",
            )
        if style == 1 and nums:
            n = rng.choice(nums)
            q = f"For each {c.phrase}, what is the average {n.phrase} of {p}?"
            return q, f"SELECT {c.name}, avg({n.name}) FROM {t} GROUP BY {c.name}"
        counts: dict[Any, int] = {}
        for r in rows:
            counts[r[c.name]] = counts.get(r[c.name], 0) + 1
        k = rng.randint(0, max(counts.values()) - 1)
        q = f"Which {c.phrase} values have more than {k} {p}?"
        return q, f"SELECT {c.name} FROM {t} GROUP BY {c.name} HAVING count(*) > {k}"
    if kind in ("join", "join_group") and fks:
        child, fk, parent = rng.choice(fks)
        crow = rng.choice(data[child.name])
        prow = next(r for r in data[parent.name] if r[parent.pk] == crow[fk.name])
        on = f"FROM {child.name} AS T1 JOIN {parent.name} AS T2 ON T1.{fk.name} = T2.{parent.pk}"
        if kind == "join_group":
            if rng.random() < 0.5:
                q = f"For each {parent.singular}, show the {parent.label_phrase} and the number of {child.plural}."
                return q, f"SELECT T2.{parent.label}, count(*) {on} GROUP BY T1.{fk.name}"
            q = f"Which {parent.singular} has the most {child.plural}? Give the {parent.label_phrase}."
            return q, f"SELECT T2.{parent.label} {on} GROUP BY T1.{fk.name} ORDER BY count(*) DESC LIMIT 1"
        style = rng.randint(0, 2)
        if style == 0:
            v = prow[parent.label]
            q = f"What are the {child.label_phrase}s of {child.plural} whose {fk.phrase} is {v}?"
            return q, f"SELECT T1.{child.label} {on} WHERE T2.{parent.label} = {_sql_literal(v)}"
        if style == 1:
            v = crow[child.label]
            q = (
                f"What is the {parent.label_phrase} of the {fk.phrase} of the {child.singular} "
                f"whose {child.label_phrase} is {v}?"
            )
            return q, f"SELECT T2.{parent.label} {on} WHERE T1.{child.label} = {_sql_literal(v)}"
        pcats = parent.of_kind("cat")
        c = rng.choice(pcats)
        v = prow[c.name]
        q = f"How many {child.plural} have a {fk.phrase} whose {c.phrase} is {v}?"
        return q, f"SELECT count(*) {on} WHERE T2.{c.name} = {_sql_literal(v)}"
    return f"How many {p} are there?", f"SELECT count(*) FROM {t}"


# --- HellaSwag-shaped scenes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """An everyday activity: the context names an ``{x}`` that the right ending must mention again."""

    activity: str
    ctx: str
    ending: str
    options: tuple[str, ...]


SCENES: tuple[Scene, ...] = (
    Scene(
        "Making tea",
        "{name} fills the kettle and sets a mug with a {x} on the counter. When the water boils, {pron}",
        "pours it over the {x} and lets it steep.",
        ("green tea bag", "mint tea bag", "black tea bag", "chamomile tea bag"),
    ),
    Scene(
        "Washing dishes",
        "{name} stacks the dirty {x} in the sink and turns on the warm water. {Pron}",
        "scrubs the {x} with a soapy sponge and rinses them.",
        ("plates", "bowls", "cups", "pans"),
    ),
    Scene(
        "Brushing teeth",
        "{name} squeezes toothpaste onto {pos} {x} and looks in the mirror. {Pron}",
        "brushes {pos} teeth with the {x} for two minutes.",
        ("blue toothbrush", "new toothbrush", "electric toothbrush", "soft toothbrush"),
    ),
    Scene(
        "Watering plants",
        "{name} fills a watering can at the tap and walks over to the {x}. {Pron}",
        "tips the can and waters the {x} until the soil is damp.",
        ("tomato plants", "rose bushes", "potted herbs", "sunflowers"),
    ),
    Scene(
        "Riding a bike",
        "{name} puts on {pos} helmet and wheels {pos} {x} out of the garage. {Pron}",
        "climbs onto the {x} and pedals down the street.",
        ("red bike", "mountain bike", "old bicycle", "racing bike"),
    ),
    Scene(
        "Baking cookies",
        "{name} mixes butter, sugar and {x} into a soft dough. {Pron}",
        "rolls the dough full of {x} into balls and puts them in the oven.",
        ("chocolate chips", "oats", "raisins", "nuts"),
    ),
    Scene(
        "Painting a room",
        "{name} pours {x} paint into a tray and picks up a roller. {Pron}",
        "rolls the {x} paint evenly across the wall.",
        ("blue", "white", "yellow", "green"),
    ),
    Scene(
        "Walking the dog",
        "{name} clips a leash onto the collar of {pos} {x} and opens the front door. {Pron}",
        "walks the {x} around the block and lets it sniff the grass.",
        ("puppy", "beagle", "old dog", "terrier"),
    ),
    Scene(
        "Changing a tire",
        "{name} loosens the nuts on the flat {x} tire and raises the car with a jack. {Pron}",
        "pulls off the flat tire and bolts the spare onto the {x} wheel.",
        ("front", "rear", "left", "right"),
    ),
    Scene(
        "Making a sandwich",
        "{name} lays two slices of bread on a plate and opens a jar of {x}. {Pron}",
        "spreads the {x} on the bread and presses the slices together.",
        ("peanut butter", "jam", "honey", "hummus"),
    ),
    Scene(
        "Playing guitar",
        "{name} sits on a stool and tunes the strings of {pos} {x}. {Pron}",
        "strums a few chords on the {x} and starts to sing.",
        ("acoustic guitar", "old guitar", "electric guitar", "ukulele"),
    ),
    Scene(
        "Fishing",
        "{name} baits a hook with a {x} and walks to the end of the dock. {Pron}",
        "casts the line with the {x} into the lake and waits for a bite.",
        ("worm", "small minnow", "piece of bread", "shiny lure"),
    ),
    Scene(
        "Doing laundry",
        "{name} carries a basket of {x} to the washing machine. {Pron}",
        "loads the {x} into the machine and adds a scoop of soap.",
        ("towels", "shirts", "socks", "bed sheets"),
    ),
    Scene(
        "Building a snowman",
        "{name} rolls two balls of snow into a snowman and takes a {x} from {pos} pocket. {Pron}",
        "presses the {x} into the face of the snowman as a nose.",
        ("carrot", "pine cone", "red button", "small stick"),
    ),
    Scene(
        "Mowing the lawn",
        "{name} fills the {x} with fuel and pulls the starter cord. {Pron}",
        "pushes the {x} in neat rows across the grass.",
        ("lawn mower", "old mower", "push mower", "new mower"),
    ),
    Scene(
        "Reading a book",
        "{name} curls up on the couch with a {x} and a cup of cocoa. {Pron}",
        "opens the {x} to the first page and begins to read.",
        ("mystery novel", "thick book", "comic book", "library book"),
    ),
    Scene(
        "Swimming",
        "{name} changes into {pos} swimsuit and walks to the edge of the {x}. {Pron}",
        "dives into the {x} and swims a few laps.",
        ("pool", "lake", "pond", "river"),
    ),
    Scene(
        "Cooking pasta",
        "{name} brings a pot of salted water to a boil and opens a box of {x}. {Pron}",
        "drops the {x} into the pot and stirs it with a wooden spoon.",
        ("spaghetti", "penne", "macaroni", "noodles"),
    ),
    Scene(
        "Wrapping a present",
        "{name} cuts a sheet of {x} wrapping paper and sets a box in the middle. {Pron}",
        "folds the {x} paper around the box and tapes it shut.",
        ("red", "striped", "gold", "flowered"),
    ),
    Scene(
        "Flying a kite",
        "{name} unrolls the string of {pos} {x} kite on a windy hill. {Pron}",
        "runs into the wind until the {x} kite rises into the sky.",
        ("red", "dragon", "diamond", "paper"),
    ),
    Scene(
        "Planting a tree",
        "{name} digs a deep hole in the yard and lifts a young {x} tree from its pot. {Pron}",
        "sets the {x} tree in the hole and packs soil around its roots.",
        ("apple", "oak", "maple", "cherry"),
    ),
    Scene(
        "Cleaning windows",
        "{name} sprays cleaner on the {x} window and takes out a cloth. {Pron}",
        "wipes the {x} window until the glass shines.",
        ("kitchen", "bedroom", "car", "front"),
    ),
    Scene(
        "Making a smoothie",
        "{name} drops {x} and a cup of yogurt into the blender. {Pron}",
        "blends the {x} and yogurt until smooth and pours it into a glass.",
        ("bananas", "strawberries", "blueberries", "mango slices"),
    ),
    Scene(
        "Shoveling snow",
        "{name} pulls on {pos} boots and grabs a shovel to clear the {x}. {Pron}",
        "scoops the snow off the {x} and piles it beside the path.",
        ("driveway", "sidewalk", "front steps", "porch"),
    ),
    Scene(
        "Tying shoes",
        "{name} sits on the bottom stair and slips on {pos} {x}. {Pron}",
        "ties the laces of the {x} in a double knot.",
        ("sneakers", "running shoes", "hiking boots", "school shoes"),
    ),
    Scene(
        "Feeding a cat",
        "{name} hears the cat meow and opens a can of {x}. {Pron}",
        "spoons the {x} into the bowl of the cat and sets it on the floor.",
        ("tuna", "salmon", "chicken", "cat food"),
    ),
    Scene(
        "Setting the table",
        "{name} takes the {x} from the cupboard before the guests arrive. {Pron}",
        "places the {x} neatly at each seat around the table.",
        ("dinner plates", "napkins", "forks and knives", "glasses"),
    ),
    Scene(
        "Playing basketball",
        "{name} dribbles the ball down the court toward the {x}. {Pron}",
        "jumps and shoots the ball at the {x}.",
        ("hoop", "basket", "far hoop", "net"),
    ),
    Scene(
        "Packing a suitcase",
        "{name} opens {pos} suitcase on the bed and folds {pos} {x}. {Pron}",
        "lays the folded {x} in the suitcase and zips it closed.",
        ("shirts", "sweaters", "pants", "jackets"),
    ),
    Scene(
        "Writing a letter",
        "{name} sits at the desk with a {x} and a sheet of paper. {Pron}",
        "writes a short letter to a friend with the {x}.",
        ("blue pen", "pencil", "fountain pen", "black marker"),
    ),
    Scene(
        "Ironing clothes",
        "{name} sets up the ironing board and lays a wrinkled {x} across it. {Pron}",
        "presses the hot iron over the {x} until it is smooth.",
        ("shirt", "dress", "pair of pants", "tablecloth"),
    ),
    Scene(
        "Lighting a campfire",
        "{name} stacks dry {x} in the fire pit and strikes a match. {Pron}",
        "holds the match to the {x} until the flames catch.",
        ("twigs", "logs", "pine branches", "sticks"),
    ),
    Scene(
        "Taking a photo",
        "{name} lifts {pos} camera and points it at the {x}. {Pron}",
        "presses the button and takes a picture of the {x}.",
        ("sunset", "mountains", "old bridge", "birds"),
    ),
    Scene(
        "Vacuuming",
        "{name} plugs in the vacuum cleaner and pushes it into the {x}. {Pron}",
        "runs the vacuum back and forth across the carpet of the {x}.",
        ("living room", "hallway", "bedroom", "office"),
    ),
)


def _fill(template: str, name: str, pron: str, pos: str, x: str) -> str:
    return template.format(name=name, pron=pron, Pron=pron.capitalize(), pos=pos, x=x)


def _scene_parts(rng: random.Random) -> tuple[Scene, str, str, str, str]:
    scene = rng.choice(SCENES)
    name, pron, pos = _person(rng)
    return scene, name, pron, pos, rng.choice(scene.options)


def _hellaswag_item(rng: random.Random) -> Row:
    """A scene's context, its own ending and three endings of other scenes (same person, so only content differs)."""
    scene, name, pron, pos, x = _scene_parts(rng)
    others = rng.sample([s for s in SCENES if s is not scene], 3)
    endings = [_fill(o.ending, name, pron, pos, rng.choice(o.options)) for o in others]
    label = rng.randrange(4)
    endings.insert(label, _fill(scene.ending, name, pron, pos, x))
    ctx = _fill(scene.ctx, name, pron, pos, x)
    return {"activity_label": scene.activity, "ctx": ctx, "endings": endings, "label": str(label)}


# --- pretraining corpus ---------------------------------------------------------------------------------------


def _arith_doc(rng: random.Random) -> str:
    """Correct equations in formats other than the task's: words, tables, statements, chains."""
    kind = rng.randrange(6)
    lines: list[str] = []
    n = rng.randint(2, 6)
    if kind == 0:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            op = rng.choice("+-*")
            if op == "-":
                a, b = max(a, b), min(a, b)
                lines.append(f"{number_word(a).capitalize()} minus {number_word(b)}: {a} - {b} = {a - b}.")
            elif op == "+":
                lines.append(f"{number_word(a).capitalize()} plus {number_word(b)}: {a} + {b} = {a + b}.")
            else:
                a, b = rng.randint(1, 12), rng.randint(1, 12)
                words = f"{number_word(a).capitalize()} times {number_word(b)} is {number_word(a * b)}"
                lines.append(f"{words}: {a} x {b} = {a * b}.")
    elif kind == 1:
        a, start = rng.randint(1, 60), rng.randint(1, 43)
        op = rng.choice(("+", "-"))
        lines.append(f"Adding to {a}:" if op == "+" else f"Taking away from {a + 60}:")
        for row in range(start, start + 3 * n, 3):
            eqs = [
                f"{a} + {b} = {a + b}" if op == "+" else f"{a + 60} - {b} = {a + 60 - b}" for b in range(row, row + 3)
            ]
            lines.append(", ".join(eqs))
    elif kind == 2:
        a = rng.randint(2, 12)
        sym = rng.choice(("x", "*"))
        lines.append(f"The {number_word(a)} times table:")
        lines += [", ".join(f"{a} {sym} {b} = {a * b}" for b in range(row, row + 3)) for row in range(1, 13, 3)]
    elif kind == 3:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            obj = rng.choice(OBJECTS)
            style = rng.randrange(3)
            if style == 0:
                lines.append(f"If you have {a} {obj} and get {b} more, you have {a + b} {obj}.")
            elif style == 1:
                a, b = max(a, b), min(a, b)
                lines.append(f"If you have {a} {obj} and give away {b}, you have {a - b} {obj} left.")
            else:
                m, k = rng.randint(2, 9), rng.randint(2, 12)
                lines.append(f"{m} {rng.choice(CONTAINERS)} with {k} {obj} each hold {m * k} {obj} in all.")
    elif kind == 4:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            t = a + b
            c = rng.randint(1, min(60, t))
            lines.append(f"Start with {a}, add {b} to get {t}, then take away {c} to get {t - c}.")
    else:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            op = rng.choice(("+", "-", "*"))
            if op == "*":
                a, b = rng.randint(2, 9), rng.randint(2, 12)
                lines.append(f"{a} * {b} = {a * b}, so {b} * {a} = {a * b} too.")
            elif op == "-":
                a, b = max(a, b), min(a, b)
                lines.append(f"{a} - {b} = {a - b} because {a - b} + {b} = {a}.")
            else:
                lines.append(f"{a} + {b} = {a + b} and {b} + {a} = {a + b}.")
    return "\n".join(lines)


def _sql_doc(
    rng: random.Random, databases: Mapping[str, tuple[Database, dict[str, list[Row]]]], held_out: set[str]
) -> str:
    """Schemas, inserts and commented SELECTs over the toy databases; held-out task questions are skipped."""
    db, data = databases[rng.choice(sorted(databases))]
    kind = rng.randrange(4)
    if kind == 0:
        lines = [f"-- tables of the {db.db_id} database"]
        lines += [create_table_sql(t, db) + ";" for t in db.tables]
        return "\n".join(lines)
    if kind == 1:
        table = rng.choice(db.tables)
        rows = rng.sample(data[table.name], min(len(data[table.name]), rng.randint(1, 4)))
        lines = [f"-- a few rows of {table.name} in {db.db_id}"]
        for row in rows:
            values = ", ".join(_sql_literal(row[c.name]) for c in table.cols)
            lines.append(f"INSERT INTO {table.name} VALUES ({values});")
        return "\n".join(lines)
    lines = []
    for _ in range(rng.randint(1, 3)):
        question, query = _spider_pair(rng, db, data)
        if question in held_out:
            continue
        comment = question[0].lower() + question[1:].rstrip("?.")
        lines += [f"-- {comment}", query + ";"]
    return (
        "\n".join(lines) if lines else f"-- count the {db.tables[0].plural}\nSELECT count(*) FROM {db.tables[0].name};"
    )


_CLOSINGS = (
    "{Pron} smiles when {pron} is done.", "It only takes a few minutes.", "Then {pron} cleans up and goes inside.",
    "{Pron} hums a song the whole time.", "Afterwards {pron} feels calm and happy.",
)  # fmt: skip


def _scene_doc(rng: random.Random, held_out: set[str]) -> str:
    """Full-sentence stories of the HellaSwag scenes (context + right ending), minus held-out contexts."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        scene, name, pron, pos, x = _scene_parts(rng)
        ctx = _fill(scene.ctx, name, pron, pos, x)
        if ctx in held_out:
            continue
        story = f"{ctx} {_fill(scene.ending, name, pron, pos, x)}"
        if rng.random() < 0.4:
            story += " " + _fill(rng.choice(_CLOSINGS), name, pron, pos, x)
        lines.append(story)
    return "\n".join(lines) if lines else "The day was quiet and nothing much happened."


PLACES = ("park", "market", "river", "library", "station", "garden", "beach", "village", "forest", "harbor")
ANIMALS = ("cat", "dog", "fox", "owl", "horse", "rabbit", "duck", "goat", "deer", "sparrow")
ADJECTIVES = ("small", "old", "quiet", "bright", "lazy", "curious", "brave", "gentle", "tired", "happy")
THINGS = ("bench", "tree", "lamp post", "wagon", "fence", "boat", "bridge", "wall", "bush", "cart")
TIMES = ("morning", "afternoon", "evening", "spring", "winter", "summer")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy")
TOPICS = ("weather", "harvest", "old days", "new school", "river", "festival", "journey", "stars")


def _prose_doc(rng: random.Random) -> str:
    """Plain narrative sentences, a domain the tasks do not use (routing contrast)."""
    sentences = []
    for _ in range(rng.randint(2, 8)):
        name, pron, _ = _person(rng)
        other, _, _ = _person(rng, exclude=name)
        adj, animal, thing = rng.choice(ADJECTIVES), rng.choice(ANIMALS), rng.choice(THINGS)
        place, time = rng.choice(PLACES), rng.choice(TIMES)
        sentences.append(
            rng.choice(
                (
                    f"{name} walked to the {place} in the {time}.",
                    f"The {adj} {animal} slept under the {thing}.",
                    f"{name} and {other} talked about the {rng.choice(TOPICS)} for a long time.",
                    f"It was a {rng.choice(WEATHER)} day, so {name} stayed near the {place}.",
                    f"The {animal} ran across the {place} and hid behind a {thing}.",
                    f"{name} found a {adj} {thing} on the way to the {place}.",
                    f"{pron.capitalize()} remembered the {adj} {animal} from the {place}.",
                    f"Everyone at the {place} waved when {name} arrived.",
                )
            )
        )
    per_line = rng.randint(1, 3)
    return "\n".join(" ".join(sentences[i : i + per_line]) for i in range(0, len(sentences), per_line))


def _code_doc(rng: random.Random) -> str:
    """Small Python functions; example calls print their true result, so the code domain is consistent."""
    kind = rng.randrange(7)
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    noun = rng.choice(("items", "values", "numbers", "scores", "prices", "counts"))
    if kind == 0:
        name = rng.choice(("add", "plus", "total", "combine"))
        return f"def {name}(a, b):\n    return a + b\n\nprint({name}({a}, {b}))  # {a + b}"
    if kind == 1:
        m, k = rng.randint(2, 12), rng.randint(2, 12)
        name = rng.choice(("multiply", "times", "product", "area"))
        return f"def {name}(x, y):\n    return x * y\n\nprint({name}({m}, {k}))  # {m * k}"
    if kind == 2:
        return (
            f"def count_large({noun}, limit={a}):\n    total = 0\n    for value in {noun}:\n"
            f"        if value > limit:\n            total += 1\n    return total"
        )
    if kind == 3:
        return f"def is_even(n):\n    return n % 2 == 0\n\nprint(is_even({a}))  # {a % 2 == 0}"
    if kind == 4:
        return (
            f"def largest({noun}):\n    best = {noun}[0]\n    for value in {noun}:\n"
            "        best = max(best, value)\n    return best"
        )
    if kind == 5:
        word = rng.choice(("hello", "garden", "river", "python", "planet", "window"))
        return f'def shout(text):\n    return text.upper() + "!"\n\nprint(shout("{word}"))  # {word.upper()}!'
    hi, lo = max(a, b), min(a, b)
    return f"def difference(a, b):\n    return abs(a - b)\n\nprint(difference({lo}, {hi}))  # {hi - lo}"


# --- writing ----------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Iterable[Row]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _unique_splits(
    make: Callable[[], Row], key: Callable[[Row], str], sizes: Mapping[str, int], what: str
) -> dict[str, list[Row]]:
    """Draw distinct items (by ``key``) and cut them into splits, so no item is shared across splits."""
    total = sum(sizes.values())
    seen: set[str] = set()
    rows: list[Row] = []
    misses = 0
    while len(rows) < total:
        row = make()
        if key(row) in seen:
            misses += 1
            if misses > 20_000:  # the template space is nearly exhausted
                raise ValueError(f"could only draw {len(rows)} distinct {what} of the {total} asked for; use fewer")
            continue
        misses = 0
        seen.add(key(row))
        rows.append(row)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = rows[start : start + sizes[split]]
        start += sizes[split]
    return out


def _resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    merged = dict(DEFAULT_SIZES)
    for key, value in (sizes or {}).items():
        if key not in DEFAULT_SIZES:
            raise ValueError(f"unknown size {key!r}; known: {', '.join(DEFAULT_SIZES)}")
        if int(value) < (0 if key == "corpus_validation_docs" else 1):
            raise ValueError(f"size {key!r} must be positive, got {value}")
        merged[key] = int(value)
    if merged["corpus_validation_docs"] == 0:
        merged["corpus_validation_docs"] = max(1, round(0.02 * merged["corpus_train_docs"]))
    return merged


def _task_sizes(sizes: Mapping[str, int], task: str) -> dict[str, int]:
    return {split: sizes[f"{task}_{split}"] for split in SPLITS}


def generate_minitasks(out_dir: str | Path, *, seed: int = 0, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Write the three mini tasks, the Spider databases and the pretraining corpus under ``out_dir``.

    ``sizes`` overrides entries of :data:`DEFAULT_SIZES` (``arith_train``, ..., ``corpus_train_docs``).
    Returns ``{"out_dir", "seed", "sizes", "counts", "paths", "corpus_bytes"}``, also written to ``manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sz = _resolve_sizes(sizes)
    counts: dict[str, int] = {}
    paths: dict[str, str] = {}

    def dump(rel: str, rows: Iterable[Row]) -> None:
        counts[rel] = _write_jsonl(out / rel, rows)
        paths[rel] = str(out / rel)

    arith_rng = _rng(seed, "arith")
    arith = _unique_splits(
        lambda: _arith_problem(arith_rng), lambda r: r["question"], _task_sizes(sz, "arith"), "arith problems"
    )
    for split in SPLITS:
        dump(f"arith/{split}.jsonl", arith[split])
    for split in SPLITS:  # the same problems in the LLM-Adapters math format (Math50K / math test sets)
        rel = f"{LLM_ADAPTERS_MATH}/{split}.json"
        rows = [llm_adapters_math_row(row) for row in arith[split]]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        counts[rel], paths[rel] = len(rows), str(out / rel)

    db_rng = _rng(seed, "spider-db")
    databases = {db.db_id: (db, _fill_database(db_rng, db)) for db in DATABASES}
    spider_rng = _rng(seed, "spider")
    db_ids = sorted(databases)

    def spider_row() -> Row:
        db, data = databases[spider_rng.choice(db_ids)]
        question, query = _spider_pair(spider_rng, db, data)
        return {"db_id": db.db_id, "question": question, "query": query}

    spider = _unique_splits(spider_row, lambda r: r["question"], _task_sizes(sz, "spider"), "spider questions")
    for split in SPLITS:
        dump(f"spider/{split}.jsonl", spider[split])
    tables_path = out / "spider" / "tables.json"
    tables_path.write_text(json.dumps([_tables_json_entry(db) for db, _ in databases.values()], indent=1) + "\n")
    paths["spider/tables.json"] = str(tables_path)
    for db_id, (db, data) in databases.items():
        db_path = out / "spider" / "database" / db_id / f"{db_id}.sqlite"
        _write_sqlite(db_path, db, data)
        paths[f"spider/database/{db_id}"] = str(db_path)

    hs_rng = _rng(seed, "hellaswag")
    hellaswag = _unique_splits(
        lambda: _hellaswag_item(hs_rng), lambda r: r["ctx"], _task_sizes(sz, "hellaswag"), "scenes"
    )
    for split in SPLITS:
        dump(f"hellaswag/{split}.jsonl", hellaswag[split])

    for split, rows in facts_splits(_rng(seed, "facts"), sz["facts_n"]).items():
        dump(f"facts/{split}.jsonl", rows)

    held_sql = {r["question"] for split in ("validation", "test") for r in spider[split]}
    held_ctx = {r["ctx"] for split in ("validation", "test") for r in hellaswag[split]}
    for split in ("train", "validation"):
        rngs = {d: _rng(seed, f"corpus-{split}-{d}") for d in ("mix", "arith", "sql", "scene", "prose")}
        n_docs = sz[f"corpus_{split}_docs"]

        def docs(n: int = n_docs, rngs: dict[str, random.Random] = rngs) -> Iterable[Row]:
            order = [i % 4 for i in range(n)]
            rngs["mix"].shuffle(order)
            for domain in order:
                if domain == 0:
                    text = _arith_doc(rngs["arith"])
                elif domain == 1:
                    text = _sql_doc(rngs["sql"], databases, held_sql)
                elif domain == 2:
                    text = _scene_doc(rngs["scene"], held_ctx)
                else:
                    prose = rngs["prose"]
                    text = _prose_doc(prose) if prose.random() < 0.5 else _code_doc(prose)
                yield {"text": text}

        dump(f"corpus/{split}.jsonl", docs())
    corpus_bytes = (out / "corpus" / "train.jsonl").stat().st_size

    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": sz,
        "counts": counts,
        "corpus_train_bytes": corpus_bytes,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    paths["manifest.json"] = str(out / "manifest.json")
    return {
        "out_dir": str(out),
        "seed": seed,
        "sizes": sz,
        "counts": counts,
        "paths": paths,
        "corpus_bytes": corpus_bytes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the moe-sieve mini tasks and pretraining corpus.")
    parser.add_argument(
        "out_dir",
        help=f"folder to write arith/, {LLM_ADAPTERS_MATH}/, spider/, hellaswag/, facts/, corpus/, manifest.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--corpus-docs", type=int, default=None, help="documents in corpus/train.jsonl")
    args = parser.parse_args(argv)
    sizes = dict(SMALL_SIZES) if args.small else {}
    if args.corpus_docs is not None:
        sizes["corpus_train_docs"] = args.corpus_docs
        sizes.setdefault("corpus_validation_docs", 0)
        if not args.small:
            sizes["corpus_validation_docs"] = 0
    result = generate_minitasks(args.out_dir, seed=args.seed, sizes=sizes)
    for rel, n in result["counts"].items():
        print(f"{rel}: {n}")
    print(f"corpus/train.jsonl: {result['corpus_bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
