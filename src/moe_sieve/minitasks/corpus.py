"""The pretraining corpus: arithmetic, SQL, everyday scenes, prose and Python, with held-out task items kept out."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from .common import (
    CONTAINERS,
    OBJECTS,
    Row,
    number_word,
    person,
)
from .hellaswag import fill_scene, scene_parts
from .spider import Database, create_table_sql, spider_pair, sql_literal


def arith_doc(rng: random.Random) -> str:
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


def sql_doc(
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
            values = ", ".join(sql_literal(row[c.name]) for c in table.cols)
            lines.append(f"INSERT INTO {table.name} VALUES ({values});")
        return "\n".join(lines)
    lines = []
    for _ in range(rng.randint(1, 3)):
        question, query = spider_pair(rng, db, data)
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


def scene_doc(rng: random.Random, held_out: set[str]) -> str:
    """Full-sentence stories of the HellaSwag scenes (context + right ending), minus held-out contexts."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        scene, name, pron, pos, x = scene_parts(rng)
        ctx = fill_scene(scene.ctx, name, pron, pos, x)
        if ctx in held_out:
            continue
        story = f"{ctx} {fill_scene(scene.ending, name, pron, pos, x)}"
        if rng.random() < 0.4:
            story += " " + fill_scene(rng.choice(_CLOSINGS), name, pron, pos, x)
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
        name, pron, _ = person(rng)
        other, _, _ = person(rng, exclude=name)
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


def corpus_docs(
    n: int,
    rngs: Mapping[str, random.Random],
    databases: Mapping[str, tuple[Database, Mapping[str, list[Row]]]],
    held_sql: set[str],
    held_ctx: set[str],
) -> Iterable[Row]:
    """``n`` documents, the four domains in equal shares in a seeded order (``rngs``: mix, arith, sql, scene, prose)."""
    order = [i % 4 for i in range(n)]
    rngs["mix"].shuffle(order)
    for domain in order:
        if domain == 0:
            text = arith_doc(rngs["arith"])
        elif domain == 1:
            text = sql_doc(rngs["sql"], databases, held_sql)
        elif domain == 2:
            text = scene_doc(rngs["scene"], held_ctx)
        else:
            prose = rngs["prose"]
            text = _prose_doc(prose) if prose.random() < 0.5 else _code_doc(prose)
        yield {"text": text}
