"""The peer benchmarks: one script each, sharing scripts/_peers.py, merging their sections into one results table."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cle_time", "agreement", "simulation", "sweep")


def test_one_script_per_benchmark_and_no_self_reinvoking_runner():
    assert sorted(p.name for p in (ROOT / "scripts").glob("bench_peers*.py")) == sorted(
        f"bench_peers_{name}.py" for name in SCRIPTS)
    for name in SCRIPTS:
        text = (ROOT / "scripts" / f"bench_peers_{name}.py").read_text()
        assert "argparse.SUPPRESS" not in text and "sys.path" not in text


@pytest.mark.slow
def test_cle_time_replaces_its_own_section_and_keeps_the_others(tmp_path, models_dir):
    older = pd.DataFrame([
        {"section": "sweep", "model": "m", "measure": "wall time", "tool": "clebench", "value": 1.5, "unit": "s",
         "note": "", "machine": "x", "date": "d"},
        {"section": "cle-time", "model": "stale", "measure": "first call", "tool": "clebench", "value": 9.0,
         "unit": "ms", "note": "", "machine": "x", "date": "d"},
    ])
    older.to_csv(tmp_path / "peers.csv", index=False)
    command = [sys.executable, "scripts/bench_peers_cle_time.py", "--models", "resnet18_cifar10", "--fresh-runs", "1",
               "--repeats", "1", "--models-dir", str(models_dir), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(tmp_path / "peers.csv", keep_default_na=False)
    assert list(dict.fromkeys(rows["section"])) == ["cle-time", "sweep"]  # peers.md order, whatever ran last
    measured = rows[rows["section"] == "cle-time"]
    assert set(measured["model"]) == {"resnet18_cifar10"} and {"clebench", "torch.ao"} <= set(measured["tool"])
    timings = measured[measured["measure"].isin(["first call", "repeated call"])]
    assert set(timings["measure"]) == {"first call", "repeated call"} and (timings["value"] > 0).all()
    if "aimet" in set(measured["tool"]):  # with the bench extra (as in CI): AIMET timed too, and the speed-up goal
        assert {"clebench >= 10x faster than AIMET, first call", "clebench >= 10x faster than AIMET, repeated call"} \
            == set(measured["measure"]) - set(timings["measure"])
    markdown = (tmp_path / "peers.md").read_text()
    assert markdown.index("## cle-time") < markdown.index("## sweep") and "stale" not in markdown


def test_adaround_comparison_gives_medians_every_repeats_ratio_and_aimets_top1_range(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    compare = importlib.import_module("compare_aimet_adaround")
    top1 = {"nearest": [80.0], "aimet": [90.1, 90.4, 90.2], "clebench": [91.0], "clebench lr 1e-3": [90.0]}
    wall = {"aimet": [10.0, 40.0, 20.0], "clebench": [5.0, 10.0, 10.0], "clebench lr 1e-3": [7.0]}
    cpu = {"aimet": [20.0, 80.0, 40.0], "clebench": [10.0, 20.0, 30.0], "clebench lr 1e-3": [14.0]}
    assert compare.table_rows("m", top1, wall, cpu) == [
        "| m | top-1 (%) | 80.00 | 90.10 (90.10-90.40) | 91.00 | 90.00 | |",
        "| m | AdaRound s (wall / CPU), median of 3 |  | 20 / 40 | 10 / 20 | 7 / 14 | 2.00x / 2.00x |",
        "| m | wall ratio per repeat | | | | | 2.00x, 4.00x, 2.00x |",
    ]
    once = compare.table_rows("m", {"nearest": [80.0], "clebench": [91.0]}, {"clebench": [5.0]}, {"clebench": [9.0]})
    assert once == ["| m | top-1 (%) | 80.00 | - | 91.00 | - | |",
                    "| m | AdaRound s (wall / CPU) |  |  | 5 / 9 |  | - |"]


def test_adaround_timing_gives_median_seconds_and_every_repeats_ratio(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = importlib.import_module("bench_adaround")
    runs = {("clebench", 200): [5.0, 10.0, 10.0], ("aimet", 200): [10.0, 40.0, 20.0]}
    seconds = bench.medians(runs)
    assert seconds == {("clebench", 200): 10.0, ("aimet", 200): 20.0}
    row = bench.format_row(seconds, 200, 2, bench.per_repeat(runs, 200))
    assert row.endswith("AIMET / clebench 2.00x  (per repeat 2.00x, 4.00x, 2.00x)")
    assert "clebench    10.0 s (  25.0 ms/layer-iteration)" in row  # 10 s / (2 layers x 200 iterations)
