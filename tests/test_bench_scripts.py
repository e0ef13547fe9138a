"""The scripts under scripts/: grouped by purpose, each with a --help that says where its output goes, timing with
clebench.timing; the peer benchmarks (one script each, sharing scripts/peers/_peers.py) merge their sections into
one results table."""
from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from clebench import timing
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "scripts" / "peers"
SCRIPTS = ("cle_time", "agreement", "simulation", "sweep")
GROUPS = {"benchmarks", "deploy", "peers", "results", "training", "zoo"}
# every script but the private helpers (_peers.py), each loaded in this process: one subprocess each would import
# torch again (~3 s a script)
PYTHON_SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*.py") if not p.name.startswith("_"))


def test_scripts_are_grouped_by_purpose_with_unique_names():
    files = [p for p in (ROOT / "scripts").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {p.relative_to(ROOT / "scripts").parts[0] for p in files} == GROUPS  # no script loose in scripts/
    assert all(len(p.relative_to(ROOT / "scripts").parts) == 2 for p in files)
    assert len({p.stem for p in files}) == len(files)  # conftest.load_script finds a script by its name alone


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / "scripts")))
def test_every_script_has_a_help_saying_what_it_does_and_where_its_output_goes(path, capsys):
    parser = load_script(path.stem).build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and parser.description.strip().splitlines()[0] in text
    assert re.search(r"^Output: \S", parser.description, re.M), f"{path}: no 'Output: ...' paragraph"
    assert issubclass(parser.formatter_class, timing.HelpFormatter)  # the defaults shown, the description as written


def test_the_shell_script_has_a_help_too():
    done = subprocess.run(["bash", "scripts/benchmarks/gpu_checks.sh", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "RESULTS": "/nonexistent/not-made"})
    assert done.returncode == 0 and "\nOutput: " in done.stdout and "GPU_INPUTS" in done.stdout
    assert not Path("/nonexistent/not-made").exists()


def test_timing_helper():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3 and [len(t) for t in times.values()] == [3, 3]
    results = {}
    timing.interleaved({"x": lambda: len(calls)}, 2, results=results)
    assert results == {"x": 6}
    seconds, value = timing.timed(lambda: gc.isenabled(), hold_gc=True)
    assert seconds >= 0 and value is False and gc.isenabled()
    assert timing.cpu_name() and timing.machine_summary("peer 1").endswith(f", peer 1, Python {sys.version.split()[0]}")
    help_text = load_script("bench_quantsim").build_parser().format_help()
    assert "(default: 7)" in help_text and "(default: None)" not in help_text


def test_one_script_per_benchmark_and_no_self_reinvoking_runner():
    assert sorted(p.name for p in PEERS.glob("bench_peers*.py")) == sorted(f"bench_peers_{name}.py" for name in SCRIPTS)
    for name in SCRIPTS:
        text = (PEERS / f"bench_peers_{name}.py").read_text()
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
    command = [sys.executable, "scripts/peers/bench_peers_cle_time.py", "--models", "resnet18_cifar10", "--fresh-runs", "1",
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


def test_adaround_comparison_gives_medians_every_repeats_ratio_and_aimets_top1_range():
    compare = load_script("compare_aimet_adaround")
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


def test_adaround_timing_gives_median_seconds_and_every_repeats_ratio():
    bench = load_script("bench_adaround")
    runs = {("clebench", 200): [5.0, 10.0, 10.0], ("aimet", 200): [10.0, 40.0, 20.0]}
    seconds = bench.medians(runs)
    assert seconds == {("clebench", 200): 10.0, ("aimet", 200): 20.0}
    row = bench.format_row(seconds, 200, 2, bench.per_repeat(runs, 200))
    assert row.endswith("AIMET / clebench 2.00x  (per repeat 2.00x, 4.00x, 2.00x)")
    assert "clebench    10.0 s (  25.0 ms/layer-iteration)" in row  # 10 s / (2 layers x 200 iterations)
