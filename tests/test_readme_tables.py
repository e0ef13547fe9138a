"""The tables of the README and the docs pages come from the committed results (scripts/results/readme_tables.py):
CI fails when they disagree."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results" / "readme_tables.py"


def _module():
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_agrees_with_the_committed_results():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_block_is_regenerated_from_its_file():
    tables = _module()
    pages = {"README.md": {"cifar10_mobilenet_v2", "methods-cifar10-w4"},
             "docs/results.md": {"imagenet_sample", "cifar10_resnet18", "cifar10_models", "simulation_cost",
                                 "methods-cifar10"},
             "docs/how-to/deploy.md": {"deploy_gap", "deploy_runtimes", "engine_sweeps", "engine_speed"},
             "docs/how-to/adaround.md": {"ptq-cifar10", "ptq-imagenet-sample-lite0", "adaround_aimet",
                                         "adaround_time", "adaround_schedule"}}
    found = {path.relative_to(ROOT).as_posix(): {m["name"] for m in tables.BLOCK.finditer(path.read_text("utf-8"))}
             for path in tables.FILES}
    for page, names in pages.items():
        assert names <= found[page], page
    assert set(tables.BLOCKS) <= set().union(*found.values())  # every table the generator knows is on a page
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # the headline row, from results/cifar10/mobilenet_v2_cifar10/results.csv (84.5300 at W4A8, 90.7100 FP32)
    assert "| BN fold | 90.71 | 90.64 (-0.07) | 90.08 (-0.63) | 84.53 (-6.18) | 90.65 (-0.06) |" in readme
    tampered = readme.replace("84.53 (-6.18)", "84.43 (-6.28)")
    assert tampered != readme and tables.regenerate(tampered, "README.md") == readme
    assert tables.regenerate("<!-- table:engine_speed -->\nstale\n<!-- /table:engine_speed -->\n", "x").count("16.82x") == 1


def test_ptq_ladder_picks_the_models_cls_step_and_subtracts_adaround_without_cle(tmp_path):
    tables = _module()
    folder = tmp_path / "results" / "ptq"
    folder.mkdir(parents=True)
    rows = [("resnet18_cifar10", steps, top1) for steps, top1 in [
        ("bn_fold", 80.0), ("bn_fold+cls+hbf", 82.0), ("bn_fold+cls+hbf+bias_correction", 83.0),
        ("bn_fold+cls+hbf+adaround", 88.5), ("bn_fold+adaround", 87.0)]]
    rows += [("mobilenet_v2_cifar10", "bn_fold+cls_relu6_clip+hbf+adaround", 70.0)]  # unfinished: one row
    header = "model,dataset,steps,quant,fp32_top1,fp32_top5,quant_top1,quant_top5,delta_top1,n_images," \
             "n_calibration,seconds,config_hash,onnxruntime_top1\n"
    body = "".join(f"{model},cifar10,{steps},w4a8_per_tensor_minmax,90,99,{top1},99,{top1 - 90},1000,512,1,abc,"
                   f"{top1 - 0.5}\n" for model, steps, top1 in rows)
    (folder / "results.csv").write_text(header + body)
    tables.ROOT = tmp_path
    lines = tables.ptq_ladder("ptq").splitlines()
    assert lines[0] == "| model | steps | FP32 | W4A8 sim / int8 |"
    assert "| ResNet18 | + CLS + HBF + AdaRound | 90.00 | 88.50 / 88.00 |" in lines
    assert "| ResNet18 | CLE's gain after AdaRound (points) |  | +1.50 |" in lines
    assert "| ResNet18 | AdaRound rows' seconds, with / without CLE |  | 1 / 1 |" in lines
    assert "| MobileNetV2 | + CLS (ReLU6 clip) + HBF + AdaRound | 90.00 | 70.00 / 69.50 |" in lines
    assert "| MobileNetV2 | BN fold | — | — |" in lines
    assert "| MobileNetV2 | CLE's gain after AdaRound (points) |  | — |" in lines
    assert "| MobileNetV2 | AdaRound rows' seconds, with / without CLE |  | 1 / — |" in lines


def test_the_adaround_time_table_reads_back_what_bench_adaround_prints():
    bench = load_script("bench_adaround")
    tables = _module()
    seconds = {("clebench", 200): 60.0, ("aimet", 200): 130.0, ("clebench", 1000): 280.0, ("aimet", 1000): 514.0}
    text = "\n".join([bench.format_row(seconds, 200, 21, [2.2, 2.1, 2.0]), bench.format_row(seconds, 1000, 21),
                       bench.format_slope(seconds, 200, 1000, 21), bench.format_convolution(11.94)])
    rows = [m.groups() for m in tables.ADAROUND_TIME_ROW.finditer(text)]
    assert [(r[0], r[1], r[3], r[5], r[6]) for r in rows] == [("200", "60.0", "130.0", "2.17x", "2.20x, 2.10x, 2.00x"),
                                                              ("1000", "280.0", "514.0", "1.84x", None)]
    # marginal ms per layer-iteration: (280 - 60) / (21 x 800) s and (514 - 130) / (21 x 800) s
    assert tables.ADAROUND_TIME_SLOPE.search(text).groups() == ("13.1", "22.9", "1.75x")
    assert tables.ADAROUND_TIME_CONVOLUTION.search(text)[1] == "11.9"
