"""Open a local HTML file in headless Chromium (Debian's `chromium`) with the network unreachable; read back what the
page's own load check recorded on <html> (clebench.reporting.html), the console messages, and a screenshot.

Also a command, which .ci/run points at its own sweep's report.html (exit 1 on a broken image, a script or console
error, or a blocked request):

    python tests/chromium.py RESULTS_DIR/report.html SCREENSHOT.png
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: nothing can be fetched even past the page's CSP
         "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0"]


class PageCheck(NamedTuple):
    attributes: dict[str, str]  # data-* of <html>: images, tables, problems, checked
    console: list[str]  # console messages (errors included) the page logged


def chromium() -> str:
    """The Chromium executable; skips the test where there is none, except in CI (env CI set), where it fails."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI: apt-get install -y chromium (.ci/run does)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _run(page: Path, *flags: str, profile: Path) -> subprocess.CompletedProcess:
    command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *flags, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def check_page(page: Path, screenshot: Path, profile: Path, width: int = 1400, height: int = 2400) -> PageCheck:
    """Load `page` twice: once to dump the DOM after load, once to save a `width` x `height` screenshot."""
    dumped = _run(page, "--dump-dom", profile=profile)
    html_tag = re.search(r"<html[^>]*>", dumped.stdout)
    attributes = dict(re.findall(r'data-(\w+)="([^"]*)"', html_tag.group(0))) if html_tag else {}
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    _run(page, f"--screenshot={screenshot}", f"--window-size={width},{height}", profile=profile)
    return PageCheck(attributes, console)


def main(argv: list[str]) -> int:
    page, screenshot = Path(argv[0]), Path(argv[1])
    with tempfile.TemporaryDirectory() as profile:
        result = check_page(page, screenshot, Path(profile))
    print(f"{page}: {result.attributes}; console: {result.console or 'empty'}; screenshot {screenshot}")
    ok = result.attributes.get("checked") == "yes" and not result.attributes.get("problems") and not result.console
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
