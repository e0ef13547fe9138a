"""MkDocs hook: pages include README.md's own text instead of retyping it, so each fact has one source.

A line `<!-- readme: HEADING -->` is replaced by the text under that README heading, up to the next heading of any
level; `<!-- readme: HEADING > START -->` begins at the section's first line that starts with START instead. A
heading that is gone, or a START the section lacks, fails the build. README.md's relative links are rewritten
relative to the including page: a link into docs/ to that page of the site, any other file (the Fig. 2 plot under
results/) to a copy the site gets at the file's own path.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- readme: (?P<heading>.+?)(?: > (?P<start>.+?))? -->$", re.M)
LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)\s]+)\)")
DOCS = "docs/"  # README.md links the site's pages as docs/PAGE.md, which is PAGE.md in the site


def _headings(lines: list[str]) -> list[int]:
    """Indices of the markdown headings in `lines`, skipping fenced code (a bash comment is no heading)."""
    found, fenced = [], False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(index)
    return found


def section(heading: str, start: str | None = None) -> str:
    """README.md's text under `heading` (without it) up to the next heading, from the line starting with `start`."""
    lines = README.read_text(encoding="utf-8").splitlines()
    headings = _headings(lines)
    first = next((i for i in headings if lines[i].lstrip("#").strip() == heading), None)
    if first is None:
        raise PluginError(f"README.md has no heading {heading!r}")
    body = lines[first + 1:next((i for i in headings if i > first), len(lines))]
    if start is not None:
        begin = next((i for i, line in enumerate(body) if line.startswith(start)), None)
        if begin is None:
            raise PluginError(f"README.md's section {heading!r} has no line starting with {start!r}")
        body = body[begin:]
    return "\n".join(body).strip() + "\n"


def on_files(files: Files, config) -> Files:
    """Add the repository files outside docs/ that README.md links to, at their own paths, so included links resolve."""
    for target in dict.fromkeys(m["target"] for m in LINK.finditer(README.read_text(encoding="utf-8"))):
        if not target.startswith(DOCS) and (ROOT / target).is_file() and files.get_file_from_path(target) is None:
            files.append(File.generated(config, target, abs_src_path=str(ROOT / target)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each README marker of the page by its section, with links made relative to the page."""
    folder = posixpath.dirname(page.file.src_uri)

    def include(match: re.Match) -> str:
        text = section(match["heading"], match["start"])
        return LINK.sub(lambda link: f"]({posixpath.relpath(link['target'].removeprefix(DOCS), folder or '.')})", text)

    return MARKER.sub(include, markdown)
