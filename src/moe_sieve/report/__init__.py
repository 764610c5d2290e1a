"""``moe-sieve report``: one self-contained HTML page (figures embedded as PNG) and its Markdown twin, built
from whatever a study directory holds (profiles, results.csv, run directories)."""

from .build import build_sections
from .render import write_report

__all__ = ["build_sections", "write_report"]
