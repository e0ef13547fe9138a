"""evaluate(): top-1 / top-5 over a loader, eval mode, clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clebench.evaluation import agreement, evaluate


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index (x holds the indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.logits[x.long()])


def test_top1_top5_hand_counted():
    # 3 samples, 6 classes; label ranks: 1st, 3rd, 6th -> top-1 1/3, top-5 2/3
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],
        [1.0, 9, 8, 2, 3, 4],
        [9.0, 8, 7, 6, 5, 1],
    ])
    labels = torch.tensor([0, 2, 5])
    model = FixedLogits(logits).train()
    loader = [(torch.tensor([0, 1]), labels[:2]), (torch.tensor([2]), labels[2:])]
    result = evaluate(model, loader, progress=False)
    assert result.pop("predictions").tolist() == [0, 1, 0]  # each image's top-1 class, in loader order
    assert result == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3), "n": 3}
    assert model.training  # restored after evaluating in eval mode (the dropout would have changed the ranking)


def test_fewer_than_five_classes_counts_all_in_top5():
    model = FixedLogits(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    result = evaluate(model, [(torch.tensor([0, 1]), torch.tensor([0, 0]))], progress=False)
    result.pop("predictions")
    assert result == {"top1": 50.0, "top5": 100.0, "n": 2}


def test_errors_are_clear():
    model = FixedLogits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, [], progress=False)
    with pytest.raises(ValueError, match="3 classes"):
        evaluate(model, [(torch.tensor([0]), torch.tensor([7]))], progress=False)
    with pytest.raises(TypeError, match=r"\(inputs, labels\)"):
        evaluate(model, [torch.tensor([0])], progress=False)
    with pytest.raises(ValueError, match="integer class indices"):
        evaluate(model, [(torch.tensor([0]), torch.tensor([0.0]))], progress=False)


def test_agreement_is_the_percentage_of_equal_top1_classes():
    first = {"predictions": torch.tensor([0, 1, 2, 3])}
    assert agreement(first, {"predictions": torch.tensor([0, 1, 0, 3])}) == 75.0
    assert agreement(first, first) == 100.0
