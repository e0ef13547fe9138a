"""report.html in headless Chromium, loaded from disk with no network: every table and image renders, the console
stays empty, nothing is fetched, and a run that fails the gate shows its flipped images. Screenshots are saved to
$CLEBENCH_SCREENSHOTS (else the test's tmp folder). .ci/run also opens its own sweep's report.html this way
(`python tests/chromium.py`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from clebench import cli
from clebench.reporting import html
from clebench.sweep.results import PREDICTIONS_FILE, labels_name, prediction_name, read_predictions, write_predictions
from chromium import check_page

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CI_RESULTS = ROOT / "results" / "cifar10_ci"
BASELINE = CI_RESULTS / "baseline.json"
FLIPPED = ("mobilenet_v2_cifar10", "cifar10", "bn_fold+cls_relu6_clip", "w8a8_per_tensor_minmax")


def _screenshot(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("CLEBENCH_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _assert_renders(page: Path, screenshot: Path, profile: Path) -> dict[str, str]:
    source = page.read_text(encoding="utf-8")
    result = check_page(page, screenshot, profile)
    assert result.attributes.get("checked") == "yes", "the page's load check did not run"
    assert result.attributes["problems"] == ""
    assert int(result.attributes["images"]) == source.count("<img ") > 0
    assert int(result.attributes["tables"]) == source.count("<table>") > 0
    assert result.console == []
    shot = imread(screenshot)
    assert shot.shape[:2] == (2400, 1400) and np.std(shot[..., :3]) > 0.05
    return result.attributes


def test_report_of_the_ci_run_renders(tmp_path):
    """The committed run of configs/cifar10_ci.toml (CI's baseline run), re-reported with `clebench check --html`."""
    folder = tmp_path / "cifar10_ci"
    shutil.copytree(CI_RESULTS, folder)
    assert cli.main(["check", str(folder), "--baseline", str(BASELINE), "--html"]) == 0
    attributes = _assert_renders(folder / "report.html", _screenshot(tmp_path, "report_ci.png"), tmp_path / "profile")
    plots = len(list(folder.glob("*.png")))
    assert int(attributes["images"]) >= plots >= 5  # accuracy and range-ratio plots of both models, Fig. 2
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "Regression gate" in page and '<span class="pass">PASS</span>' in page


@pytest.mark.skipif(not os.environ.get("CLEBENCH_DATA"), reason="needs the shared CIFAR-10 images (CLEBENCH_DATA)")
def test_report_of_a_failing_run_shows_the_flipped_images(tmp_path):
    folder = tmp_path / "regressed"
    shutil.copytree(CI_RESULTS, folder)
    predictions = read_predictions(folder / PREDICTIONS_FILE)
    quant, labels = prediction_name(FLIPPED, "quant"), predictions[labels_name(*FLIPPED[:2])]
    flipped = np.flatnonzero(predictions[quant] == labels)[:6]  # six right answers made wrong
    predictions[quant][flipped] = (labels[flipped] + 1) % 10
    write_predictions(predictions, folder / PREDICTIONS_FILE)
    table = pd.read_csv(folder / "results.csv", dtype=str)
    row = (table[["model", "dataset", "steps", "quant"]] == list(FLIPPED)).all(axis=1)
    table.loc[row, "quant_top1"] = f"{float(table.loc[row, 'quant_top1'].iloc[0]) - 3.0:.4f}"
    table.to_csv(folder / "results.csv", index=False)

    assert cli.main(["check", str(folder), "--baseline", str(BASELINE), "--html"]) == 1
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert '<span class="fail">FAIL</span>' in page and "6 image(s) changed" in page
    assert [f'alt="image {i}"' in page for i in flipped] == [True] * 6
    assert page.count('<span class="problem">') == 6  # each went from right to wrong
    attributes = _assert_renders(folder / "report.html", _screenshot(tmp_path, "report_regressed.png"), tmp_path / "profile")
    assert int(attributes["images"]) == len(list(folder.glob("*.png"))) + 6


def test_the_page_check_reports_a_broken_image_and_a_blocked_request(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(html.page("bad", ['<img src="https://example.com/x.png" alt="remote">',
                                      '<img src="data:image/png;base64,AAAA" alt="corrupt">']), encoding="utf-8")
    problems = check_page(page, tmp_path / "bad.png", tmp_path / "profile").attributes["problems"]
    assert "blocked request: https://example.com/x.png" in problems
    assert "broken image: corrupt" in problems and "broken image: remote" in problems
