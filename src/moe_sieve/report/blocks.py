"""The blocks a report section is made of, and the cell formats every section shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    cell_classes: list[list[str]] | None = None  # an HTML class per cell (e.g. the claims' verdict colours)
    css_class: str = ""  # an HTML class of the table ("text": every column left-aligned)


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    key: str
    title: str
    intro: str
    blocks: list[Table | Figure | str] = field(default_factory=list)


def fmt(value: Any, fmt: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"
