"""Spider-shaped text-to-SQL: the databases, their SQLite files and ``tables.json``, and question/query pairs."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    NAMES,
    SURNAMES,
    Row,
)


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


def fill_database(rng: random.Random, db: Database) -> dict[str, list[Row]]:
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


def sql_literal(value: Any) -> str:
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


def tables_json_entry(db: Database) -> Row:
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


def write_sqlite(path: Path, db: Database, data: Mapping[str, list[Row]]) -> None:
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


def spider_pair(rng: random.Random, db: Database, data: Mapping[str, list[Row]]) -> tuple[str, str]:
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
            return f"How many {p} have {c.phrase} {v}?", f"SELECT count(*) FROM {t} WHERE {c.name} = {sql_literal(v)}"
        q = rng.choice(
            (f"What are the {lp}s of {p} whose {c.phrase} is {v}?", f"List the {lp}s of all {p} with {c.phrase} {v}.")
        )
        return q, f"SELECT {lab} FROM {t} WHERE {c.name} = {sql_literal(v)}"
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
            return q, f"SELECT {fn}({n.name}) FROM {t} WHERE {c.name} = {sql_literal(v)}"
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
            return q, f"SELECT T1.{child.label} {on} WHERE T2.{parent.label} = {sql_literal(v)}"
        if style == 1:
            v = crow[child.label]
            q = (
                f"What is the {parent.label_phrase} of the {fk.phrase} of the {child.singular} "
                f"whose {child.label_phrase} is {v}?"
            )
            return q, f"SELECT T2.{parent.label} {on} WHERE T1.{child.label} = {sql_literal(v)}"
        pcats = parent.of_kind("cat")
        c = rng.choice(pcats)
        v = prow[c.name]
        q = f"How many {child.plural} have a {fk.phrase} whose {c.phrase} is {v}?"
        return q, f"SELECT count(*) {on} WHERE T2.{c.name} = {sql_literal(v)}"
    return f"How many {p} are there?", f"SELECT count(*) FROM {t}"
