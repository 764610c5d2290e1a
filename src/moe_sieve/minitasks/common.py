"""What every mini-task generator shares: the seeded per-domain generators, the vocabulary, and the writers."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1
SPLITS = ("train", "validation", "test")

Row = dict[str, Any]


def domain_rng(seed: int, domain: str) -> random.Random:
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


def person(rng: random.Random, exclude: str = "") -> tuple[str, str, str]:
    """(name, subject pronoun, possessive) so that scenes and problems refer to one person consistently."""
    while True:
        name, pron = rng.choice(NAMES)
        if name != exclude:
            return name, pron, "her" if pron == "she" else "his"


# --- writing ----------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[Row]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def unique_splits(
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
