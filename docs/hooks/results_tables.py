"""MkDocs hook: every `<!-- table:NAME -->` ... `<!-- /table:NAME -->` block of a page is filled at build time by
scripts/readme_tables.py, the generator that writes README.md's tables, from the committed results folders.

That covers the Results page's own (empty) blocks and the blocks inside the README sections readme_sections.py
includes, so no table on the site is copied by hand, and an unknown table name fails the build.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[2] / "scripts" / "readme_tables.py"


def _load_generator():
    """scripts/readme_tables.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("readme_tables", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_tables = _load_generator()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return readme_tables.regenerate(markdown, page.file.src_uri)
