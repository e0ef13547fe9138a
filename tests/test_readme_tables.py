"""The README's tables come from the committed results (scripts/readme_tables.py): CI fails when they disagree."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "readme_tables.py"


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
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [m["name"] for m in tables.BLOCK.finditer(readme)]
    assert {"imagenet_sample", "cifar10_mobilenet_v2", "cifar10_resnet18", "deploy_gap", "engine_speed",
            "simulation_cost"} <= set(names)
    # the headline row, from results/cifar10/mobilenet_v2_cifar10/results.csv (84.5300 at W4A8, 90.7100 FP32)
    assert "| BN fold | 90.71 | 90.64 (-0.07) | 90.08 (-0.63) | 84.53 (-6.18) | 90.65 (-0.06) |" in readme
    tampered = readme.replace("84.53 (-6.18)", "84.43 (-6.28)")
    assert tampered != readme and tables.regenerate(tampered, "README.md") == readme
    assert tables.regenerate("<!-- table:engine_speed -->\nstale\n<!-- /table:engine_speed -->\n", "x").count("16.82x") == 1
