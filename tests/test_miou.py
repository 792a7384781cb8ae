"""mIoU from the accumulated confusion matrix, checked against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from task_plugins.segmentation.task import MIoUEvaluator


def _logits(pred: list[list[int]], n: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(pred), n).permute(2, 0, 1)[None].float()


def test_miou_matches_hand_computed_confusion_matrix():
    # gt (255 = ignore)   pred
    #  0 0 1               0 1 1
    #  1 2 255             1 2 0   <- the ignored pixel's wrong prediction must not count
    ev = MIoUEvaluator(num_classes=3, ignore_index=255)
    ev.update(_logits([[0, 1, 1]], 3), {"mask": torch.tensor([[[0, 0, 1]]])})  # two batches
    ev.update(_logits([[1, 2, 0]], 3), {"mask": torch.tensor([[[1, 2, 255]]])})
    # confusion[gt][pred]: (0,0)=1 (0,1)=1 (1,1)=2 (2,2)=1
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.equal(ev.conf, expected)
    # IoU_c = tp / (row + col - tp): 1/(2+1-1), 2/(2+3-2), 1/(1+1-1)
    miou = (1 / 2 + 2 / 3 + 1) / 3
    m = ev.compute()
    assert m["mIoU"] == pytest.approx(100 * miou)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 5)

    # The state round-trips (it is what the workers all-reduce).
    other = MIoUEvaluator(3, 255)
    other.load_state(ev.state() * 2)
    assert other.compute()["mIoU"] == pytest.approx(100 * miou)


def test_absent_classes_do_not_count():
    """A class in neither ground truth nor prediction has no IoU (not 0, not 1)."""
    ev = MIoUEvaluator(num_classes=4, ignore_index=255)
    ev.update(_logits([[0, 1]], 4), {"mask": torch.tensor([[[0, 1]]])})
    assert ev.compute()["mIoU"] == pytest.approx(100.0)
