"""The renderer: sections to one self-contained HTML page (figures embedded as PNG) and its Markdown twin."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_path, atomic_write_text, ensure_writable
from .._version import __version__
from .blocks import Figure, Table
from .build import build_sections

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 18px;
color:#1d2330;line-height:1.45;font-size:14px}
h1{font-size:24px;margin-bottom:2px}
h2{font-size:18px;margin-top:34px;border-bottom:2px solid #e3e7ef;padding-bottom:4px}
.meta{color:#667085;font-size:12.5px}.intro{color:#344054;max-width:900px}
nav{background:#f6f8fb;border:1px solid #e3e7ef;border-radius:6px;padding:8px 14px;margin:14px 0;font-size:13px;
display:flex;flex-wrap:wrap;gap:4px 16px}nav a{color:#1f5fbf;text-decoration:none}
table{border-collapse:collapse;margin:10px 0 16px;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e7ef;padding:4px 10px;text-align:right}th{background:#f6f8fb;font-weight:600}
td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}tr:hover td{background:#fafbfd}
caption{caption-side:bottom;text-align:left;color:#667085;font-size:12px;padding-top:4px}
figure{margin:10px 0 18px}figure img{max-width:100%;border:1px solid #eef0f4;border-radius:4px}
figcaption{color:#667085;font-size:12px}.note{color:#667085;font-size:12.5px}
table.text td,table.text th{text-align:left;vertical-align:top}
td.verdict{font-weight:600;white-space:nowrap}td.held{background:#e3f4e6;color:#1b5e20}
td.not-held{background:#fde8e6;color:#8e1b10}td.untestable{background:#f1f2f5;color:#475467}
"""


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    classes = table.cell_classes or [[""] * len(row) for row in table.rows]
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='{html.escape(k)}'>{html.escape(c)}</td>" if k else f"<td>{html.escape(c)}</td>"
            for c, k in zip(row, kinds, strict=True)
        )
        + "</tr>"
        for row, kinds in zip(table.rows, classes, strict=True)
    )
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    css = f" class='{html.escape(table.css_class)}'" if table.css_class else ""
    return f"<table{css}>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |"]
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "figure"


def write_report(
    study_dir: str | os.PathLike,
    out_html: str | os.PathLike,
    out_md: str | os.PathLike | None = None,
    *,
    reference: str = "full",
    margins: Sequence[float] = (1.0, 2.0, 3.0),
    k: str = "25%",
    stability_trials: int = 50,
    overwrite: bool = True,
    metric: str = "accuracy",
    unit: str | None = None,
) -> dict[str, Any]:
    """Write the HTML report (figures embedded) and its Markdown twin (figures as PNG files in
    ``<md stem>_files/``); returns ``{"html", "md", "figures", "sections"}``.

    A report is derived from the study, so by default it replaces an earlier one (atomically).
    """
    out_html = Path(out_html)
    out_md = Path(out_md) if out_md is not None else out_html.with_suffix(".md")
    for path in (out_html, out_md):
        ensure_writable(path, overwrite)
    sections, data = build_sections(study_dir, reference, margins, k, stability_trials, metric, unit)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"moe-sieve study report: {Path(study_dir).resolve().name}"
    meta = f"{Path(study_dir).resolve()} · generated {now} by moe-sieve {__version__}"

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(meta)}</div>",
        "<nav>" + "".join(f"<a href='#{s.key}'>{html.escape(s.title)}</a>" for s in sections) + "</nav>",
    ]
    md = [f"# {title}", "", f"_{meta}_", ""]
    figures_dir = out_md.parent / f"{out_md.stem}_files"
    figure_paths = []
    for section in sections:
        parts.append(f"<section id='{section.key}'><h2>{html.escape(section.title)}</h2>")
        parts.append(f"<p class='intro'>{html.escape(section.intro)}</p>")
        md += [f"## {section.title}", "", section.intro, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(_html_table(block))
                md += [_md_table(block), ""]
            elif isinstance(block, Figure):
                b64 = base64.b64encode(block.png).decode("ascii")
                alt = html.escape(block.caption)
                img = f"<img alt='{alt}' src='data:image/png;base64,{b64}'>"
                parts.append(f"<figure>{img}<figcaption>{alt}</figcaption></figure>")
                path = figures_dir / f"{_slug(block.name)}.png"
                figure_paths.append((path, block.png))
                md += [f"![{block.caption}]({figures_dir.name}/{path.name})", ""]
            else:
                parts.append(f"<p class='note'>{html.escape(block)}</p>")
                md += [block, ""]
        parts.append("</section>")
    if not sections:
        parts.append("<p class='note'>Nothing to report.</p>")
    parts.append("</body></html>")

    figures_dir.mkdir(parents=True, exist_ok=True)
    for path, png in figure_paths:
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
    atomic_write_text(out_md, "\n".join(md).rstrip() + "\n")
    atomic_write_text(out_html, "\n".join(parts) + "\n")
    for path in (out_html, out_md, *(p for p, _ in figure_paths)):
        path.chmod(0o644)  # a report is for reading (the atomic temp files start private)
    return {
        "html": out_html,
        "md": out_md,
        "figures": [p for p, _ in figure_paths],
        "sections": [s.key for s in sections],
        "study": str(data.root),
    }
