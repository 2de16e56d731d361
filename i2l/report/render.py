"""Report rendering: tables with best/second marks, figures and notes, written as one self-contained HTML file
(images as base64 data URIs) and a Markdown file whose figures sit beside it in `figures/`."""

from __future__ import annotations

import base64
import html
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from i2l.io import write_bytes_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{margin:.8em 0}figcaption{font-size:.8em;color:#555}img{max-width:100%}
.note{font-size:.85em;color:#444}
"""
# Lets a headless browser (and the tests) see how many images actually decoded.
_SCRIPT = """window.addEventListener('load',function(){var n=0;for(var i=0;i<document.images.length;i++)
{var im=document.images[i];if(im.complete&&im.naturalWidth>0)n++;}
document.body.setAttribute('data-images-loaded',String(n));});"""


def fmt(value, digits: int | None = None) -> str:
    """Compact number formatting for tables ('–' for missing)."""
    try:
        if value is None or value is pd.NA or (isinstance(value, numbers.Real) and math.isnan(value)):
            return "–"
    except TypeError:
        pass
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if digits is not None:
        return f"{v:.{digits}f}"
    if v == 0 or abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


@dataclass
class Table:
    """A table of preformatted cells; marks[(row, col)] is 'best' (bold) or 'second' (underlined)."""

    columns: list[str]
    rows: list[list[str]]
    marks: dict[tuple[int, int], str] = field(default_factory=dict)
    table_id: str = ""

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = []
        for i, row in enumerate(self.rows):
            cells = []
            for j, cell in enumerate(row):
                text = html.escape(str(cell))
                mark = self.marks.get((i, j))
                text = f"<b>{text}</b>" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text
                cells.append(f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        tid = f' id="{html.escape(self.table_id)}"' if self.table_id else ""
        return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def markdown(self) -> str:
        def cell(i: int, j: int, text: str) -> str:
            text = str(text).replace("|", "\\|")
            mark = self.marks.get((i, j))
            return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text

        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in self.columns) + " |",
                 "|" + "|".join(":---" if j == 0 else "---:" for j in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
                  for i, row in enumerate(self.rows)]
        return "\n".join(lines)


def rank_marks(values: dict[int, float], lower_is_better: bool, col: int) -> dict[tuple[int, int], str]:
    """Best and second-best distinct values of one column (ties share the mark); none if fewer than two."""
    clean = {i: v for i, v in values.items() if v is not None and not math.isnan(v)}
    distinct = sorted(set(clean.values()), reverse=not lower_is_better)
    if len(distinct) < 2:
        return {}
    marks = {}
    for i, v in clean.items():
        if v == distinct[0]:
            marks[(i, col)] = "best"
        elif v == distinct[1]:
            marks[(i, col)] = "second"
    return marks


class Document:
    """Accumulates sections in both formats, then writes index.html, report.md and figures/."""

    def __init__(self, title: str):
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]
        self.figures: dict[str, bytes] = {}

    def heading(self, text: str, anchor: str) -> None:
        self.html.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')
        self.md += [f"## {text}", ""]

    def para(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")
        self.md += [f"*{text}*" if note else text, ""]

    def bullets(self, items: list[str]) -> None:
        if items:
            self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            self.md += [f"- {i}" for i in items] + [""]

    def table(self, table: Table) -> None:
        self.html.append(table.html())
        self.md += [table.markdown(), ""]

    def figure(self, name: str, png: bytes, caption: str) -> None:
        self.figures[name] = png
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img data-figure="{html.escape(name)}" alt="{html.escape(caption)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')
        self.md += [f"![{caption}](figures/{name}.png)", "", f"*{caption}*", ""]

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "figures").mkdir(exist_ok=True)
        for name, png in self.figures.items():
            write_bytes_atomic(out_dir / "figures" / f"{name}.png", png)
        page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.html) + f"<script>{_SCRIPT}</script></body></html>\n")
        # a reader (or a browser refresh) never sees half a report
        write_bytes_atomic(out_dir / "report.md", "\n".join(self.md).encode())
        write_bytes_atomic(out_dir / "index.html", page.encode())
        return out_dir / "index.html"

