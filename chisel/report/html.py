"""Self-contained HTML: inline CSS, figures as base64 PNG data URIs, no script, no external URL.

Every string that reaches the page goes through `esc` (feature, concept, site, metric, run path);
the helpers here are the only places markup is written.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2433; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; margin-top: 2em; }
.sub { color: #5b6577; font-size: 0.92em; }
table { border-collapse: collapse; margin: 10px 0; font-size: 0.88em; }
th, td { border: 1px solid #dde1e7; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0; }
.missing { background: #fff6e5; border-left: 4px solid #e0a030; padding: 6px 12px; margin: 8px 0; }
.answer { background: #eef6f0; border-left: 4px solid #2a7f62; padding: 6px 12px; margin: 8px 0; }
ul.toc { columns: 2; font-size: 0.92em; }
code { background: #f1f3f6; padding: 0 3px; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(x: float | int | None, digits: int = 4) -> str:
    """A number as the report prints it (the same text tests look for)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def pct(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}%"


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(
    header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()
) -> str:
    """A table; cells are escaped, columns in `numeric` right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def para(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


def bullets(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"


def missing(text: str) -> str:
    return para(text, "missing")


def section(anchor: str, title: str, body: str) -> str:
    """`body` is markup built by the helpers above; `anchor` is a fixed identifier."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (anchor, title, body markup). Returns the whole document."""
    toc = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t, _ in sections)
    parts = "".join(section(a, t, b) for a, t, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><main><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>'
        f'<ul class="toc">{toc}</ul>{parts}</main></body></html>\n'
    )
