"""A self-contained HTML page: tables, inline PNG images, and a page-level check that nothing failed to load.

The page needs no network and opens from disk: images are data: URIs, the style and one script are inline, and a
Content-Security-Policy forbids every other source (`default-src 'none'`), so a stray reference cannot fetch anything.
The script records on the <html> element what a test (or a person with the browser's inspector) wants to know:
data-images / data-tables (how many rendered), data-problems (broken images, script errors, blocked requests; empty
when none) and data-checked="yes" once the page has loaded.
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

MISSING = "—"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #1a1a1a; }
h1 { font-size: 24px; } h2 { font-size: 20px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 16px; margin-top: 20px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; } th { background: #f0f0f0; } td.r, th.r { text-align: right; }
tr.regressed td, tr.missing td { background: #fde2e2; } tr.improved td { background: #e2f5e2; }
figure { margin: 8px 0 24px; } figure img { max-width: min(100%, 1000px); border: 1px solid #e0e0e0; }
figcaption, .note { color: #555; font-size: 13px; }
.problem { color: #a00000; } .pass { color: #006000; font-weight: bold; } .fail { color: #a00000; font-weight: bold; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; } .gallery figure { margin: 0; width: 112px; font-size: 12px; }
.gallery img { width: 96px; height: 96px; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""
_SCRIPT = """
const problems = [];
addEventListener("error", e => problems.push(e.message ? "script error: " + e.message :
  "failed to load " + (e.target && (e.target.alt || e.target.tagName))), true);
addEventListener("securitypolicyviolation", e => problems.push("blocked request: " + e.blockedURI));
addEventListener("load", () => {
  const images = Array.from(document.images);
  images.filter(i => !(i.complete && i.naturalWidth > 0)).forEach(i => problems.push("broken image: " + i.alt));
  const root = document.documentElement.dataset;
  root.images = images.length;
  root.tables = document.querySelectorAll("table").length;
  root.problems = problems.join(" | ");
  root.checked = "yes";
});
"""


def _script_hash() -> str:
    return base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()


CONTENT_SECURITY_POLICY = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                           f"script-src 'sha256-{_script_hash()}'")


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], right_aligned: Sequence[bool],
          row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; right_aligned per column; row_classes: a CSS class per row (e.g. a gate status)."""
    align = lambda i: ' class="r"' if right_aligned[i] else ""  # noqa: E731
    head = "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header))
    body = []
    for k, row in enumerate(rows):
        css = f' class="{escape(row_classes[k])}"' if row_classes else ""
        body.append(f"<tr{css}>" + "".join(f"<td{align(i)}>{escape(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def cell_text(value: object) -> str:
    """A CSV value as a table shows it: floats to 4 significant digits, NaN / None as MISSING."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def frame_table(frame: pd.DataFrame) -> str:
    """Any DataFrame as a table (numeric columns right-aligned), for CSVs whose columns the report does not know."""
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame.columns]
    rows = [[cell_text(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return table([str(c) for c in frame.columns], rows, numeric)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(path: Path, caption: str) -> str:
    """The PNG file inline, with its file name and a caption under it."""
    alt = f"{caption} ({Path(path).name})"
    return (f'<figure><img src="{png_data_uri(Path(path).read_bytes())}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)} — <code>{escape(Path(path).name)}</code></figcaption></figure>")


def key_values(items: Iterable[tuple[str, object]]) -> str:
    """A two-column table of (key, value)."""
    return table(["key", "value"], [(k, cell_text(v)) for k, v in items], [False, False])


def flatten(data: object, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, leaf) pairs; lists of scalars joined by ', '."""
    if isinstance(data, dict):
        return [pair for key, value in data.items() for pair in flatten(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(data, list) and all(not isinstance(v, (dict, list)) for v in data):
        return [(prefix, ", ".join(map(str, data)))]
    if isinstance(data, list):
        return [pair for i, value in enumerate(data) for pair in flatten(value, f"{prefix}[{i}]")]
    return [(prefix, data)]


def page(title: str, body: Sequence[str]) -> str:
    """A whole HTML document: `body` fragments in order under an <h1>."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CONTENT_SECURITY_POLICY, quote=False)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        *body,
        "</body>",
        "</html>",
        "",
    ])
