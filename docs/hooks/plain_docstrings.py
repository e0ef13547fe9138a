"""Griffe extension (mkdocs.yml, mkdocstrings' python handler): the project's docstrings are plain text, not Markdown.

Before mkdocstrings renders one as Markdown, its Markdown and HTML specials outside `code spans` are escaped, so
"w<bits>" keeps its <bits>, W[o] is no link and *args no emphasis; and a block indented under a line of prose (the
docstrings' formulas, examples and tables) becomes a fenced code block, as it reads in the source.
"""
from __future__ import annotations

import re
import textwrap

import griffe

BULLET = re.compile(r"\s*(?:\* )?")
CODE_SPAN = re.compile(r"(`[^`\n]*`)")
MARKDOWN_SPECIALS = re.compile(r"([\\*_\[\]#])")
HTML_SPECIALS = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _escape(line: str) -> str:
    """`line` with every special outside its code spans escaped (a leading "* " list marker is kept)."""
    bullet = BULLET.match(line)[0]
    parts = CODE_SPAN.split(line[len(bullet):])
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        text = MARKDOWN_SPECIALS.sub(r"\\\1", parts[i])
        parts[i] = "".join(HTML_SPECIALS.get(char, char) for char in text)
    return bullet + "".join(parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(text: str) -> str:
    """A plain-text docstring as Markdown that renders to the same text, indented blocks as code blocks."""
    lines, out, index = text.splitlines(), [], 0
    while index < len(lines):
        line = lines[index]
        base = _indent(out[-1]) if out and out[-1].strip() and not out[-1].startswith("```") else 0
        if line.strip() and _indent(line) >= base + 4:
            block = []
            while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) >= base + 4):
                block.append(lines[index])
                index += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```text", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            continue
        out.append(_escape(line))
        index += 1
    return "\n".join(out)


class PlainDocstrings(griffe.Extension):
    """Rewrites each loaded object's docstring with `to_markdown`, before mkdocstrings renders it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
