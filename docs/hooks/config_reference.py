"""MkDocs hook: the line `<!-- config-reference -->` becomes the sweep config's keys, read at build time from
clebench/sweep/config.py's declarations, so the page cannot drift from the loader.

Per TOML table: the allowed keys (the loader's key sets, `_DATA_KEYS` ...), each key's default (the field of the
same name in the spec dataclass the table fills, where it declares one) and its comment in the annotated example of
config.py's module docstring; then that example itself. Types, required keys and allowed values are checked by the
loader's code, which declares them nowhere this hook could read.
"""
from __future__ import annotations

import dataclasses
import html
import re
import textwrap

from clebench.models.preprocessing import PREPROCESS_KEYS
from clebench.sweep import config as sweep_config, custom_steps

MARKER = "<!-- config-reference -->"
TABLES = [  # (the TOML table, its keys, the dataclass holding their defaults)
    ("top level", sweep_config._TOP_KEYS, None),
    ("[data]", sweep_config._DATA_KEYS, sweep_config.DataSpec),
    ('[data] with dataset = "imagefolder"', sweep_config._IMAGEFOLDER_KEYS, sweep_config.DataSpec),
    ("[data.preprocess]", set(PREPROCESS_KEYS), None),
    ("[[models]]", sweep_config._MODEL_KEYS, sweep_config.ModelSpec),
    ("[eval]", sweep_config._EVAL_KEYS, sweep_config.EvalSpec),
    ("[execution]", sweep_config._EXECUTION_KEYS, sweep_config.ExecutionSpec),
    ("[adaround]", sweep_config._ADAROUND_KEYS, sweep_config.AdaroundSpec),
    ("[act_equalize]", sweep_config._ACT_EQUALIZE_KEYS, sweep_config.ActEqualizeSpec),
    ("[sensitivity]", sweep_config._SENSITIVITY_KEYS, sweep_config.SensitivitySpec),
    ("[sensitivity] rows entries", sweep_config._SENSITIVITY_ROW_KEYS, sweep_config.SensitivityRow),
    ("[report]", sweep_config._REPORT_KEYS, None),
    ("[custom_steps] NAME = { ... }", custom_steps.KEYS, None),
]
KEY_LINE = re.compile(r"(?P<key>\w+) = .*?(?:\s#\s(?P<comment>.*))?")
CONTINUATION = re.compile(r"\s{2,}#\s(?P<comment>.*)")  # an indented comment goes on the key above it


def _docstring() -> tuple[str, str]:
    """(the annotated TOML example that opens config.py's docstring, the paragraphs after it)."""
    lines = sweep_config.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    return textwrap.dedent("\n".join(lines[start:end])).strip(), "\n".join(lines[end:]).strip()


def comments() -> dict[tuple[str, str], str]:
    """{(table header as written, e.g. "[data]" or "" at the top, key): its comment} from the docstring's example."""
    found: dict[tuple[str, str], str] = {}
    table, last = "", None
    for line in _docstring()[0].splitlines():
        if line.startswith("["):
            table, last = line.split("#")[0].strip(), None
        elif (match := KEY_LINE.fullmatch(line)) is not None:
            last = (table, match["key"])
            found[last] = match["comment"] or ""
        elif last is not None and (match := CONTINUATION.fullmatch(line)) is not None:
            found[last] = f"{found[last]} {match['comment']}".strip()
    return found


def default(spec, key: str) -> str:
    """The key's default as TOML writes it, from `spec`'s field of that name; "" where none is declared."""
    field = {f.name: f for f in dataclasses.fields(spec)}.get(key) if spec else None
    if field is None or field.default is dataclasses.MISSING or dataclasses.is_dataclass(field.default):
        return ""
    value = field.default
    if value is None:
        return "omitted"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _summary(spec) -> str:
    """The spec class's own docstring ("" for the one dataclass writes, "DataSpec(dataset: str, ...)")."""
    if spec is None or (spec.__doc__ or "").startswith(f"{spec.__name__}("):
        return ""
    return " ".join(spec.__doc__.split())


def table_section(title: str, keys: set[str], spec, notes: dict[tuple[str, str], str]) -> str:
    header = "" if title == "top level" else title.split(" ")[0]
    tables = {name.split(" ")[0].strip("[]") for name, _, _ in TABLES}  # top-level keys that are tables below

    def row(key: str) -> str:
        note = notes.get((header, key)) or ("a table, below" if not header and key in tables else "")
        value = default(spec, key)
        return (f"<tr><td><code>{key}</code></td><td>{f'<code>{html.escape(value)}</code>' if value else ''}</td>"
                f"<td>{html.escape(note)}</td></tr>\n")

    summary = f"<p>{html.escape(_summary(spec))} (<code>{spec.__name__}</code>)</p>\n\n" if _summary(spec) else ""
    return (f"## `{title}`\n\n{summary}<table>\n<tr><th>key</th><th>default</th><th>from the docstring example</th></tr>\n"
            f"{''.join(row(key) for key in sorted(keys))}</table>\n")


def config_reference() -> str:
    notes = comments()
    sections = [table_section(title, keys, spec, notes) for title, keys, spec in TABLES]
    example, closing = _docstring()
    return "\n".join([*sections, "## The annotated example", "", f"```toml\n{example}\n```", "", closing, ""])


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, config_reference()) if MARKER in markdown else markdown
