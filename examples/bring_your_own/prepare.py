"""Make the worked example's inputs from the shared data: a small ImageFolder whose folder names are not the model's
class names, and the CIFAR-10 ResNet18 checkpoint saved as a DataParallel training run saves it.

    python examples/bring_your_own/prepare.py ../shared [--out examples/bring_your_own/work]

Writes OUT/data/{train,val}/<folder>/*.jpg (4 of CIFAR-10's classes: 50 validation and 32 calibration images each)
and OUT/my_net.pth ({"epoch": ..., "state_dict": {"module.<name>": tensor}}).
"""
import argparse
import shutil
from pathlib import Path

import torch

FOLDERS = {"planes": "airplane", "cars": "automobile", "cats": "cat", "ships": "ship"}  # folder -> CIFAR-10 class
IMAGES = {"train": ("train", 32), "val": ("test", 50)}  # split -> (CIFAR-10 split, images per folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shared", type=Path, help="the shared folder (data/cifar10, models/resnet18_cifar10.pt)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "work", help="where to write")
    args = parser.parse_args()
    for split, (source_split, count) in IMAGES.items():
        for folder, cifar_class in FOLDERS.items():
            target = args.out / "data" / split / folder
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted((args.shared / "data" / "cifar10" / source_split / cifar_class).iterdir())[:count]:
                shutil.copyfile(image, target / image.name)
    state_dict = torch.load(args.shared / "models" / "resnet18_cifar10.pt", map_location="cpu", weights_only=True)
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, args.out / "my_net.pth")
    print(f"wrote {args.out / 'data'} and {args.out / 'my_net.pth'}")


if __name__ == "__main__":
    main()
