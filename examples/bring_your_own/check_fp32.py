"""Check the worked example's FP32 top-1 against a plain torchvision evaluation of the same images.

    python examples/bring_your_own/check_fp32.py RESULTS_DIR

Evaluates my_net.build() with the checkpoint (module. prefixes stripped by hand) on work/data/val through
torchvision.datasets.ImageFolder and the transforms sweep.toml asks for (Resize(36) -> CenterCrop(32) -> ToTensor ->
Normalize), and compares with the sweep's `bn_fold` rows (BN folding keeps the FP32 function). Exit 1 if they differ
by more than 0.2 points.
"""
import argparse
import sys
import tomllib
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torchvision import transforms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from my_net import build  # noqa: E402

TOLERANCE = 0.2  # points


def torchvision_top1() -> float:
    config = tomllib.loads((HERE / "sweep.toml").read_text())
    data, preprocess = config["data"], config["data"]["preprocess"]
    transform = transforms.Compose([transforms.Resize(preprocess["resize"]), transforms.CenterCrop(preprocess["crop"]),
                                    transforms.ToTensor(), transforms.Normalize(preprocess["mean"], preprocess["std"])])
    images = torchvision.datasets.ImageFolder(HERE / data["root"] / data["eval_split"], transform=transform)
    to_model = {index: data["classes"][folder] for folder, index in images.class_to_idx.items()}
    model = build().eval()
    checkpoint = torch.load(HERE / config["models"][0]["checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()})
    correct = 0
    with torch.no_grad():
        for inputs, folders in torch.utils.data.DataLoader(images, batch_size=100):
            labels = torch.tensor([to_model[int(f)] for f in folders])
            correct += int((model(inputs).argmax(1) == labels).sum())
    return 100.0 * correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args()
    rows = pd.read_csv(args.results_dir / "results.csv")
    sweep = rows.loc[rows["steps"] == "bn_fold", "fp32_top1"]
    reference = torchvision_top1()
    worst = float((sweep - reference).abs().max())
    print(f"FP32 top-1: clebench sweep {', '.join(f'{v:.2f}' for v in sweep)}; torchvision ImageFolder {reference:.2f}; "
          f"largest difference {worst:.2f} points (allowed {TOLERANCE})")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
