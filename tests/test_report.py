"""write_report on small synthetic results directories: table contents, plots, determinism and errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from torch import nn

import clebench.reporting.report
import clebench.sweep.results
import clebench.sweep.steps
from clebench.ranges import channel_stats, layer_ranges
from clebench.sweep.results import RESULT_COLUMNS
from clebench.reporting.report import (
    markdown_table,
    plot_layer_ranges,
    sorted_steps,
    step_label,
    write_report,
)

MODEL = "tiny_cifar10"
QUANTS = ["w8a8_per_tensor_minmax", "w4a8_per_tensor_minmax"]
# (steps, fp32 top-1, quantized top-1 per quant); written out of pipeline order on purpose.
ACCURACY = [
    ("bn_fold+relu6_to_relu+cls", 70.0, [69.0, 40.0]),
    ("none", 71.5, [10.25, 9.0]),
    ("bn_fold+relu6_to_relu", 70.0, [12.0, 9.5]),
    ("bn_fold", 71.5, [11.0, 10.0]),
    ("bn_fold+relu6_to_relu+cls+hbf", 70.0, [69.5, 45.125]),
]


def _results_rows() -> list[dict]:
    rows = []
    for steps, fp32, quantized in ACCURACY:
        for quant, top1 in zip(QUANTS, quantized):
            rows.append({
                "model": MODEL, "dataset": "cifar10", "steps": steps, "quant": quant,
                "fp32_top1": fp32, "fp32_top5": 98.0, "quant_top1": top1, "quant_top5": 90.0,
                "delta_top1": top1 - fp32, "n_images": 200, "n_calibration": 64, "seconds": 1.5,
                "config_hash": "001234abcdef",
            })
    return rows


def _tiny_model(scale_second: float) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    nn.init.uniform_(model[2].weight, -1.0, 1.0)
    model[2].weight.data[::2] *= scale_second
    return model


def _with_keys(frame: pd.DataFrame, steps: str) -> pd.DataFrame:
    frame.insert(0, "steps", steps)
    frame.insert(0, "model", MODEL)
    return frame


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    pd.DataFrame(_results_rows(), columns=RESULT_COLUMNS).to_csv(tmp_path / "results.csv", index=False)
    before, after = _tiny_model(20.0), _tiny_model(1.0)
    ranges = [_with_keys(layer_ranges(m), s) for m, s in ((before, "bn_fold"), (after, "bn_fold+relu6_to_relu+cls"))]
    pd.concat(ranges).to_csv(tmp_path / "ranges.csv", index=False)
    channels = [_with_keys(channel_stats(m, ["2"]), s) for m, s in ((before, "bn_fold"), (after, "bn_fold+relu6_to_relu+cls"))]
    pd.concat(channels).to_csv(tmp_path / "channel_ranges.csv", index=False)
    return tmp_path


def _table_rows(markdown: str, title: str) -> list[list[str]]:
    """Cells of the rows of the table under the heading `title`."""
    section = markdown.split(title, 1)[1].split("###", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert np.std(image[..., :3]) > 0.05  # not a blank canvas


def test_write_report_tables_and_plots(results_dir: Path):
    written = write_report(results_dir)
    names = [p.name for p in written]
    assert names == ["results.md", f"accuracy_{MODEL}.png", f"range_ratio_{MODEL}.png", f"fig2_channel_ranges_{MODEL}.png",
                     "report.html"]
    for path in written[1:-1]:
        _assert_real_png(path)

    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "001234abcdef" in markdown  # a hash with leading zeros stays text
    assert "200 evaluation images, 64 calibration images" in markdown
    assert f"## {MODEL} on cifar10" in markdown
    top1 = _table_rows(markdown, "### Top-1 accuracy (%)")
    assert [row[0] for row in top1] == [
        "original", "BN fold", "BN fold + ReLU6→ReLU", "BN fold + ReLU6→ReLU + CLS", "BN fold + ReLU6→ReLU + CLS + HBF",
    ]
    assert top1[0] == ["original", "71.50", "10.25 (-61.25)", "9.00 (-62.50)"]
    assert top1[4] == ["BN fold + ReLU6→ReLU + CLS + HBF", "70.00", "69.50 (-0.50)", "45.12 (-24.88)"]
    header = markdown.split("### Top-1 accuracy (%)", 1)[1].splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == ["Steps", "FP32", *QUANTS]
    top5 = _table_rows(markdown, "### Top-5 accuracy (%)")
    assert len(top5) == 5 and top5[0][1:] == ["98.00", "90.00 (-8.00)", "90.00 (-8.00)"]


def test_write_report_is_deterministic(results_dir: Path):
    write_report(results_dir)
    first = (results_dir / "results.md").read_bytes()
    write_report(results_dir)
    assert (results_dir / "results.md").read_bytes() == first


def test_partial_results(results_dir: Path):
    rows = [r for r in _results_rows() if not (r["steps"] == "bn_fold" and r["quant"] == QUANTS[1])]
    pd.DataFrame(rows).to_csv(results_dir / "results.csv", index=False)
    (results_dir / "ranges.csv").unlink()
    (results_dir / "channel_ranges.csv").write_text("")
    names = [p.name for p in write_report(results_dir)]
    assert names == ["results.md", f"accuracy_{MODEL}.png", "report.html"]
    top1 = _table_rows((results_dir / "results.md").read_text(encoding="utf-8"), "### Top-1 accuracy (%)")
    assert top1[1] == ["BN fold", "71.50", "11.00 (-60.50)", "—"]


def test_repeated_runs_keep_the_last(results_dir: Path):
    rerun = dict(_results_rows()[0], quant_top1=69.75)
    pd.DataFrame([*_results_rows(), rerun]).to_csv(results_dir / "results.csv", index=False)
    write_report(results_dir)
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert "1 repeated run(s)" in markdown
    assert _table_rows(markdown, "### Top-1 accuracy (%)")[3][2] == "69.75 (-0.25)"


def test_fp32_that_differs_between_quant_settings_shows_its_range(results_dir: Path):
    rows = _results_rows()
    rows[-1]["fp32_top1"] = 69.5  # e.g. bias correction depends on the quantized weights
    pd.DataFrame(rows).to_csv(results_dir / "results.csv", index=False)
    write_report(results_dir)
    top1 = _table_rows((results_dir / "results.md").read_text(encoding="utf-8"), "### Top-1 accuracy (%)")
    assert top1[4][1:] == ["69.50–70.00", "69.50 (-0.50)", "45.12 (-24.38)"]


def test_missing_or_empty_results_are_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="results directory"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="results.csv"):
        write_report(tmp_path)
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ValueError, match="results.csv is empty"):
        write_report(tmp_path)
    (tmp_path / "results.csv").write_text(",".join(RESULT_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        write_report(tmp_path)
    pd.DataFrame(_results_rows()).drop(columns=["quant_top5"]).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="quant_top5"):
        write_report(tmp_path)
    pd.DataFrame(_results_rows()).assign(quant_top1="n/a").to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="'quant_top1' must hold numbers"):
        write_report(tmp_path)


def test_step_labels_and_order():
    assert step_label("none") == "original"
    assert step_label("bn_fold+relu6_to_relu+cls+hbf+bias_correction") == "BN fold + ReLU6→ReLU + CLS + HBF + BC"
    shuffled = ["bn_fold+cls_relu6_keep", "bn_fold+relu6_to_relu+cls", "none", "bn_fold+custom", "bn_fold"]
    assert sorted_steps(shuffled) == [
        "none", "bn_fold", "bn_fold+relu6_to_relu+cls", "bn_fold+cls_relu6_keep", "bn_fold+custom",
    ]


def test_markdown_table_alignment_and_escaping():
    table = markdown_table(["name", "value"], [["a|b", "1.00"], ["c", "10.00"]], [False, True])
    assert table.splitlines() == [
        "| name | value |",
        "|:-----|------:|",
        r"| a\|b |  1.00 |",
        "| c    | 10.00 |",
    ]


def test_plot_layer_ranges(tmp_path: Path):
    path = plot_layer_ranges(layer_ranges(_tiny_model(20.0)), tmp_path / "ranges.png", "tiny: range ratio per layer")
    _assert_real_png(path)
    with pytest.raises(ValueError, match="range_ratio"):
        plot_layer_ranges(pd.DataFrame({"layer": ["0"]}), tmp_path / "bad.png", "bad")


def test_step_order_and_labels_come_from_the_pipeline():
    assert clebench.reporting.report.STEP_ORDER is clebench.sweep.steps.STEP_ORDER  # one source: a new step sorts where it runs
    assert set(clebench.reporting.report.STEP_LABELS) == set(clebench.sweep.steps.STEP_ORDER)


def _page(results_dir: Path) -> str:
    return (results_dir / "report.html").read_text(encoding="utf-8")


def test_report_html_is_self_contained_with_tables_plots_and_meta(results_dir: Path):
    (results_dir / "meta.json").write_text('{"config": {"data": {"limit": 200}}, "device": "cpu", '
                                           '"last_run_work": {"rows": 10}}')
    write_report(results_dir)
    page = _page(results_dir)
    assert page.count('<img src="data:image/png;base64,') == 3  # accuracy, range ratio, Fig. 2
    assert "http://" not in page and "https://" not in page and "default-src 'none'" in page
    assert page.count("<table>") == 2 + 2  # top-1 and top-5; meta.json's machine and config
    assert "<td>last_run_work.rows</td><td>10</td>" in page and "<td>data.limit</td><td>200</td>" in page
    assert '<td class="r">45.12 (-24.88)</td>' in page  # the same cell as results.md


def test_accuracy_chart_is_dots_not_lines(results_dir: Path):
    rows = pd.read_csv(results_dir / "results.csv", dtype={"config_hash": str})
    figure = clebench.reporting.report.accuracy_figure(rows, "tiny")
    lines = figure.axes[0].get_lines()
    assert len(lines) == 1 + len(QUANTS) and {line.get_linestyle() for line in lines} == {"None"}
    assert list(lines[1].get_xdata()) == [10.25, 11.0, 12.0, 69.0, 69.5]  # w8a8 in pipeline order
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()][0] == "original"


def test_every_deployed_runtime_gets_its_table(results_dir: Path):
    rows = pd.read_csv(results_dir / "results.csv", dtype={"config_hash": str})
    rows["int8_top1"], rows["int8_agreement"] = rows["quant_top1"] - 0.5, 99.5  # an older folder's ONNX Runtime
    rows["openvino_top1"] = rows["quant_top1"] + 0.25  # a runtime without an agreement column
    rows.to_csv(results_dir / "results.csv", index=False)
    write_report(results_dir)
    markdown = (results_dir / "results.md").read_text(encoding="utf-8")
    assert _table_rows(markdown, "### Simulated vs real int8 (ONNX Runtime) top-1 (%)")[0][1] == "10.25 / 9.75 (99.5)"
    assert _table_rows(markdown, "### Simulated vs real int8 (OpenVINO) top-1 (%)")[4][2] == "45.12 / 45.38"
    assert "Simulated vs delta" not in markdown
    page = _page(results_dir)
    assert "Simulated vs real int8 (OpenVINO) top-1 (%)" in page and '<td class="r">10.25 / 9.75 (99.5)</td>' in page


def test_diagnostics_csvs_are_tables_and_sensitivity_a_chart(results_dir: Path):
    pd.DataFrame({"set": [0, 1], "layers": ["0 -> 2", "2 -> 4"], "range_ratio_before": [40.0, 3.5]}).to_csv(
        results_dir / "cle_sets.csv", index=False)
    pd.DataFrame({"layer": ["4"], "reason": ["followed by an add"]}).to_csv(results_dir / "cle_skipped.csv", index=False)
    pd.DataFrame({"layer": ["0", "2", "4"], "quant": ["w4a8"] * 3, "delta_top1": [-0.5, -12.25, 0.0]}).to_csv(
        results_dir / "sensitivity.csv", index=False)
    names = [p.name for p in write_report(results_dir)]
    assert names[-2:] == ["sensitivity.png", "report.html"]
    _assert_real_png(results_dir / "sensitivity.png")
    page = _page(results_dir)
    assert "<td>0 -&gt; 2</td><td class=\"r\">40</td>" in page and "<td>followed by an add</td>" in page
    assert '<td class="r">-12.25</td>' in page and "sensitivity.csv</code>, 3 rows" in page


def test_partial_folders_give_a_partial_page(results_dir: Path):
    (results_dir / "results.csv").unlink()
    (results_dir / "channel_ranges.csv").write_text("model,steps\nx,y\n")  # an old or foreign schema
    with pytest.raises(FileNotFoundError, match="results.csv"):
        write_report(results_dir)
    page = _page(results_dir)
    assert page.count('<p class="problem">Not shown:') == 2 and "lacks the column(s)" in page
    assert page.count("<img ") == 1  # the range-ratio plot still rendered


def test_a_folder_of_the_previous_schema_reports():
    """The committed H200 run (meta.json without precision, no predictions.npz) still gives every section."""
    folder = Path(__file__).resolve().parents[1] / "results" / "gpu" / "cifar10_mobilenet_v2_h100"
    if not folder.is_dir():
        pytest.skip("results/gpu/cifar10_mobilenet_v2_h100 is not in this checkout")
    import shutil, tempfile  # noqa: E401

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(folder, Path(tmp) / "h100"))
        write_report(copy)
        page = _page(copy)
    assert "Not shown" not in page and page.count("<img ") == 3 and "<td>device</td><td>cuda</td>" in page


def test_methods_table_puts_each_rows_accuracy_beside_its_cost(results_dir: Path):
    rows = pd.read_csv(results_dir / "results.csv", dtype={"config_hash": str})
    rows["onnxruntime_top1"] = rows["quant_top1"] - 0.5
    rows.loc[rows["steps"] == "bn_fold", "onnxruntime_top1"] = float("nan")  # a row the runtime did not run
    rows.to_csv(results_dir / "results.csv", index=False)
    costs = [("bn_fold", "bn_fold", 0.25, 2), ("bn_fold+relu6_to_relu", "relu6_to_relu", 0.01, 0),
             ("bn_fold+relu6_to_relu+cls", "cls", 0.5, 3)]  # no +hbf: not measured
    pd.DataFrame([(MODEL, *cost) for cost in costs], columns=clebench.sweep.results.STEP_COST_COLUMNS).to_csv(
        results_dir / "step_costs.csv", index=False)
    group = clebench.reporting.report.read_results_table(results_dir / "results.csv")
    header, cells, _ = clebench.reporting.report.method_cells(group, pd.read_csv(results_dir / "step_costs.csv"))
    assert header == ["Steps", *QUANTS, "FP32 steps (s)", "Layers changed"]
    by_label = {row[0]: row[1:] for row in cells}
    assert by_label["BN fold"] == ["11.00", "10.00", "0.25", "bn_fold 2"]  # not deployed: the simulation alone
    assert by_label["BN fold + ReLU6→ReLU + CLS"] == ["69.00 / 68.50", "40.00 / 39.50", "0.76",
                                                      "bn_fold 2, relu6_to_relu 0, cls 3"]
    assert by_label["BN fold + ReLU6→ReLU + CLS + HBF"][2:] == ["—", "—"]
    assert by_label["original"] == ["10.25 / 9.75", "9.00 / 8.50", "0.00", "—"]
    write_report(results_dir)
    page = _page(results_dir)
    assert "Methods: accuracy and cost" in page and "simulated / ONNX Runtime int8" in page


def test_no_methods_section_without_step_costs(results_dir: Path):
    write_report(results_dir)
    assert "Methods: accuracy and cost" not in _page(results_dir)
