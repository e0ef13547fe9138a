"""The documentation site (mkdocs.yml, docs/): it builds with --strict, its CLI reference lists every command and
argument of the real parser, every generated marker was filled, it loads nothing from the network, README.md's links
into it resolve, and a page renders in headless Chromium from disk."""
from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from chromium import check_page
from clebench.cli import build_parser
from conftest import require_extra

require_extra("mkdocs")

ROOT = Path(__file__).resolve().parents[1]
REMOTE_ASSET = re.compile(r"<(?!a\b)(\w+)\b[^>]*?\b(?:src|href)=[\"'](?:https?:)?//[^\"']*", re.I)  # <a>: a link out
EMPTY_TABLE = re.compile(r"<!-- table:([\w-]+) -->\s*<!-- /table:\1 -->")
REMOTE_CSS = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"']?)(?:https?:)?//", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs") / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(folder)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr
    return folder


def _sections(page: str) -> dict[str, str]:
    """{h2 id: the HTML up to the next h2} of a built page."""
    starts = list(re.finditer(r'<h2 id="([^"]+)"', page))
    return {m[1]: page[m.start():(starts[i + 1].start() if i + 1 < len(starts) else len(page))]
            for i, m in enumerate(starts)}


def test_cli_reference_lists_every_command_and_argument(site):
    parser = build_parser()
    sections = _sections((site / "reference" / "cli.html").read_text(encoding="utf-8"))
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for anchor, command in [("clebench", parser), *((f"clebench-{n}", c) for n, c in commands.choices.items())]:
        assert anchor in sections, f"no section for {anchor}"
        for action in command._actions:
            if action is commands:
                continue
            names = action.option_strings or ([f"{{{','.join(action.choices)}}}"] if action.choices else
                                              [action.metavar or action.dest])
            missing = [name for name in names if name not in sections[anchor]]
            assert not missing, f"{anchor}: {missing} not on the page"


def test_every_marker_is_filled_and_no_asset_is_remote(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"<!-- (readme:|cli-reference|config-reference)", text), page
        assert not EMPTY_TABLE.search(text), page  # scripts/results/readme_tables.py fills a block between its markers
        assert not REMOTE_ASSET.search(text), f"{page}: {REMOTE_ASSET.search(text)[0]}"
    for sheet in site.rglob("*.css"):
        assert not REMOTE_CSS.search(sheet.read_text(encoding="utf-8")), sheet
    started = html.unescape(re.sub(r"<[^>]+>", "", (site / "getting-started.html").read_text(encoding="utf-8")))
    assert 'pip install -e ".[dev' in started  # README.md's "Set up and test" block, included


def test_the_readme_links_into_the_site_resolve(site):
    """README.md links docs/*.md by relative path (for GitHub and a clone): each exists, each #anchor is on its page."""
    for target in re.findall(r"\]\((?!https?://)([^)\s]+)\)", (ROOT / "README.md").read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:
            page = site / Path(path).relative_to("docs").with_suffix(".html")
            assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), target


def test_a_page_renders_from_disk_in_chromium(site, tmp_path):
    screenshot = tmp_path / "cli.png"
    result = check_page(site / "reference" / "cli.html", screenshot, tmp_path / "profile", width=1200, height=1600)
    assert result.console == []
    shot = imread(screenshot)
    assert shot.shape[:2] == (1600, 1200) and np.std(shot[..., :3]) > 0.05
