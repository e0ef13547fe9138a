"""MkDocs hook: the line `<!-- config-reference -->` becomes the sweep config's keys, rendered at build time from
clebench/sweep/config.py's schema (`SCHEMA`), the declarations the loader validates with, so the page cannot drift
from the loader.

Per TOML table (a `config.Table`): its meaning, then one row per key (a `config.Key`): type, default (or required),
allowed values or range, meaning. Then the annotated example that opens config.py's docstring, and the paragraphs
after it (what the config hash covers).
"""
from __future__ import annotations

import html
import textwrap

from clebench.sweep import config as sweep_config

MARKER = "<!-- config-reference -->"


def _docstring() -> tuple[str, str]:
    """(the annotated TOML example that opens config.py's docstring, the paragraphs after it)."""
    lines = sweep_config.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    return textwrap.dedent("\n".join(lines[start:end])).strip(), "\n".join(lines[end:]).strip()


def toml_value(value) -> str:
    """A default as a TOML file writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return str(value)


def default(key: sweep_config.Key) -> str:
    """The key's default as the page shows it: "required", "omitted" (no value), or the TOML value."""
    if key.required:
        return "required"
    return "omitted" if key.default is None or key.default == {} else toml_value(key.default)


def allowed(key: sweep_config.Key) -> str:
    """The allowed values or range; where the key declares a phrase for its errors, that phrase."""
    if key.choices is not None:
        return " | ".join(map(str, key.choices))
    if key.expected is not None and key.expected.startswith("be "):
        return key.expected.removeprefix("be ")
    return key.allowed


def table_section(table: sweep_config.Table) -> str:
    def cell(text: str, code: bool = False) -> str:
        return f"<td>{f'<code>{html.escape(text)}</code>' if code and text else html.escape(text)}</td>"

    rows = "".join(f"<tr>{cell(key.name, True)}{cell(key.type)}{cell(default(key), not key.required)}"
                   f"{cell(allowed(key))}{cell(key.doc)}</tr>\n" for key in table.keys)
    spec = f" (<code>{table.spec.__name__}</code>)" if table.spec is not None else ""
    return (f"## `{table.header or 'top level'}`\n\n<p>{html.escape(table.doc)}{spec}</p>\n\n<table>\n"
            "<tr><th>key</th><th>type</th><th>default</th><th>allowed</th><th>meaning</th></tr>\n"
            f"{rows}</table>\n")


def config_reference() -> str:
    example, closing = _docstring()
    return "\n".join([*(table_section(table) for table in sweep_config.SCHEMA), "## The annotated example", "",
                      f"```toml\n{example}\n```", "", closing, ""])


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, config_reference()) if MARKER in markdown else markdown
