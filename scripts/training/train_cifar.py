"""Train the reference CIFAR-10 checkpoints (resnet18_cifar10, mobilenet_v2_cifar10) from scratch.

Recipe: 100 epochs, batch 512, SGD Nesterov momentum 0.9, OneCycle (linear, 15 % warm-up), weight decay on
conv/linear weights only (not on BatchNorm, biases or depthwise kernels), label smoothing 0.1, random crop 32
with 4-pixel zero padding + horizontal flip, bf16 autocast. The whole data set is decoded once (clebench.data.datasets)
and stays on the device as uint8; augmentation runs there too.

    python scripts/training/train_cifar.py --model resnet18_cifar10 --out runs/cifar            # GPU, ~100 s on an H200
    python scripts/training/train_cifar.py --model mobilenet_v2_cifar10 --epochs 1 --limit 1024 --device cpu   # smoke test

Output: writes <out>/<model>.pt (float32 state_dict) and <out>/<model>.json (recipe, test accuracy, sha256); after every
epoch <out>/<model>.resume.pt, which --resume continues from.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from clebench import timing
from clebench.data.datasets import ImageSet, batches, load_images
from clebench.models.checkpoint import sha256_file
from clebench.models.cifar import CIFAR10_BUILDERS
from clebench.models.preprocessing import CIFAR10_PREPROCESSING

# model -> (torchvision architecture, peak learning rate, weight decay)
RECIPES = {"resnet18_cifar10": ("resnet18", 0.4, 5e-4), "mobilenet_v2_cifar10": ("mobilenet_v2", 0.2, 4e-4)}
PAD = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=timing.HelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(RECIPES))
    parser.add_argument("--data", default=None, help="data root holding cifar10/{train,test} (default: CLEBENCH_DATA)")
    parser.add_argument("--out", type=Path, default=Path("runs/cifar"), help="output folder of the checkpoint, its JSON record and the resume state (default: runs/cifar)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=None, help="OneCycle peak learning rate (default: the recipe's)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None, help="train and test on class-balanced subsets this size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/<model>.resume.pt")
    return parser


def parse_args() -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args()
    for name in ("epochs", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights; none on BatchNorm, biases or depthwise kernels."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) and not depthwise:
                decay.append(param)
            else:
                no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded uint8 batch [B, 3, 32, 32], then random horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    dy, dx = torch.randint(0, 2 * PAD + 1, (2, n, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    cropped = padded[torch.arange(n, device=images.device)[:, None, None, None],
                     torch.arange(3, device=images.device)[None, :, None, None], rows, cols]
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, CIFAR-10 mean/std normalised."""
    mean = torch.tensor(CIFAR10_PREPROCESSING.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_PREPROCESSING.std, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def evaluate(model: nn.Module, test: ImageSet, device: str, dtype: torch.dtype | None) -> float:
    """Top-1 accuracy (fraction) on ``test``."""
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        for x, y in batches(test, 1000, CIFAR10_PREPROCESSING, device):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(test)


def train(args: argparse.Namespace) -> None:
    arch, default_lr, default_wd = RECIPES[args.model]
    lr = default_lr if args.lr is None else args.lr
    weight_decay = default_wd if args.weight_decay is None else args.weight_decay
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    device_type = torch.device(args.device).type
    torch.manual_seed(args.seed)

    train_set = load_images("cifar10", "train", args.data, CIFAR10_PREPROCESSING, limit=args.limit)
    test_set = load_images("cifar10", "test", args.data, CIFAR10_PREPROCESSING, limit=args.limit)
    images, labels = train_set.images.to(args.device), train_set.labels.to(args.device)

    model = CIFAR10_BUILDERS[args.model]().to(args.device)
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15,
        anneal_strategy="linear", cycle_momentum=False,
    )
    generator = torch.Generator(args.device).manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    args.out.mkdir(parents=True, exist_ok=True)
    resume_path = args.out / f"{args.model}.resume.pt"
    start_epoch, train_seconds = 0, 0.0
    if args.resume:
        if not resume_path.is_file():
            raise FileNotFoundError(f"--resume: {resume_path} does not exist; run without --resume to start afresh")
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state["epochs"] != args.epochs:
            raise ValueError(f"{resume_path} is from a {state['epochs']}-epoch run: pass --epochs {state['epochs']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        if device_type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]

    bar = tqdm(total=args.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=args.model, unit="step")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        clock = timing.Stopwatch()
        order = torch.randperm(len(train_set), device=args.device, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = normalize(augment(images[index], generator))
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
        if device_type == "cuda":
            torch.cuda.synchronize()
        train_seconds += clock.seconds
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                 "epoch": epoch + 1, "epochs": args.epochs, "train_seconds": train_seconds}
        if device_type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        torch.save(state, resume_path.with_suffix(".tmp"))
        resume_path.with_suffix(".tmp").replace(resume_path)  # never leave a half-written resume file
    bar.close()

    top1 = evaluate(model, test_set, args.device, dtype)
    weights_path = args.out / f"{args.model}.pt"
    torch.save({k: v.float().cpu() for k, v in model.state_dict().items()}, weights_path)
    record = {
        "model": arch, "dataset": "cifar10", "epochs": args.epochs, "batch_size": args.batch_size, "max_lr": lr,
        "weight_decay": weight_decay, "label_smoothing": args.label_smoothing,
        "weight_decay_on": "conv/linear weights except depthwise", "augment": "random crop 32 pad 4 + horizontal flip",
        "optimizer": "SGD nesterov 0.9, OneCycle linear", "precision": f"{args.precision} autocast",
        f"test_top1_{args.precision}": round(top1, 4), "train_seconds": round(train_seconds, 1),
        "sha256": sha256_file(weights_path), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device_type == "cuda" else device_type,
        "train_images": len(train_set), "test_images": len(test_set), "seed": args.seed,
    }
    (args.out / f"{args.model}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.model}: test top-1 {100 * top1:.2f} % on {len(test_set)} images; wrote {weights_path}")


if __name__ == "__main__":
    try:
        train(parse_args())
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"train_cifar.py: error: {err}")
