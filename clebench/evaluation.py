"""Top-1 / top-5 accuracy of a classifier over a loader of (images, labels) batches."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

TOP_K = (1, 5)


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", *, progress: bool = True,
             desc: str | None = None, channels_last: bool = False) -> dict:
    """{"top1": %, "top5": %, "n": images, "predictions": int64 [n]} of `model` on `loader`.

    The model is moved to `device` and run in eval mode; "predictions" holds each image's top-1 class, on the CPU,
    in loader order (what a regression gate compares image by image).

    loader yields (inputs [B, ...], int labels [B]); the model must return logits [B, classes]. With fewer than
    5 classes, top-5 counts all of them. The model's train/eval mode is restored afterwards.
    channels_last: run 4-D inputs and a copy of the model in torch.channels_last memory format. On the CPU it is
    up to 3x faster for MobileNetV2 (scripts/benchmarks/bench_engines.py), but the convolutions sum in another
    order, and in a fake-quantized model a value that lies on a rounding boundary then moves by one grid step, which
    flips the top-1 of ~0.1-0.3 % of images; so it is opt-in.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.to(device).eval()
    runner = _channels_last_copy(model) if channels_last else model
    try:
        with torch.inference_mode():
            def forward(inputs: torch.Tensor) -> torch.Tensor:
                inputs = inputs.to(device)
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                return runner(inputs)

            return accuracy(forward, loader, progress=progress, desc=desc)
    finally:
        model.train(was_training)


def _channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose 4-D parameters and buffers are channels_last (same values, same modules)."""
    copied = copy.deepcopy(model)
    return copied.to(memory_format=torch.channels_last)


def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, *, progress: bool = True,
             desc: str | None = None) -> dict:
    """evaluate()'s dict for any `forward(inputs [B, ...]) -> logits [B, classes]` (a torch model, an ONNX session).

    The top-5 classes and labels of every batch stay where the logits are and are counted once at the end, so a GPU
    evaluation does not wait for the host after each batch.
    """
    rankings, all_labels = [], []
    classes = None
    for batch in tqdm(loader, desc=desc or "evaluating", unit="batch", disable=not progress):
        inputs, labels = _split(batch)
        logits = forward(inputs)
        _check_shapes(logits, labels)
        classes = logits.shape[1]
        rankings.append(logits.topk(min(max(TOP_K), classes), dim=1).indices)
        all_labels.append(labels.to(logits.device))
    if not rankings:
        raise ValueError("the loader yielded no images: evaluate needs at least one (inputs, labels) batch")
    ranked, labels = torch.cat(rankings), torch.cat(all_labels)
    _check_labels(labels, classes)
    hits = ranked == labels.view(-1, 1)
    correct = {k: int(hits[:, :k].any(dim=1).sum()) for k in TOP_K}
    seen = len(labels)
    return {"top1": 100.0 * correct[1] / seen, "top5": 100.0 * correct[5] / seen, "n": seen,
            "predictions": ranked[:, 0].cpu()}


def agreement(first: dict, second: dict) -> float:
    """% of images whose top-1 class is the same in two evaluations of the same images (evaluate()'s dicts)."""
    return 100.0 * (first["predictions"] == second["predictions"]).double().mean().item()


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    pair = isinstance(batch, (tuple, list)) and len(batch) >= 2
    if not (pair and torch.is_tensor(batch[0]) and torch.is_tensor(batch[1])):
        raise TypeError(f"each batch must be an (inputs, labels) pair of tensors, got {type(batch).__name__}")
    return batch[0], batch[1]


def _check_shapes(logits: object, labels: torch.Tensor) -> None:
    if not torch.is_tensor(logits) or logits.dim() != 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [batch, classes], got {shape}")
    if labels.dim() != 1 or len(labels) != len(logits) or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer class indices of shape [{len(logits)}], got {labels.dtype} {tuple(labels.shape)}"
        )


def _check_labels(labels: torch.Tensor, classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {classes} "
            "classes: are the model and the data set's label spaces the same?"
        )
