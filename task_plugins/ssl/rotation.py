"""Rotation prediction (Gidaris et al. 2018) as a CompL auxiliary task (CompL §3.2, §3.3).

Each training image gets CompL's auxiliary augmentation (crop, colour jitter, blur) and one of
four rotations (0, 90, 180, 270 degrees), drawn per sample; the head pools the last trunk level
and a linear layer predicts which. λ is the task's `loss_weight` (CompL: 0.05 for rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.registry import register_task
from gppf.api.task import Evaluator, FeatureInfo
from gppf.io.images import sample_rng
from task_plugins.ssl.data import (
    SSLConfig,
    SSLTask,
    Top1Evaluator,
    chw,
    eval_view,
    seeded_views,
    view_transform,
)

ROTATIONS = 4


@dataclass
class RotationConfig(SSLConfig):
    loss_weight: float = 0.05  # λ (CompL: 0.05 for rotation)
    blur: float = 0.5


class RotationHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, ROTATIONS)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(feats[-1].mean((2, 3)))


def rotate(chw_image: np.ndarray, k: int) -> np.ndarray:
    """`chw_image` rotated by k x 90 degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(chw_image, k, axes=(1, 2)))


@register_task("rotation")
class RotationTask(SSLTask):
    config_cls = RotationConfig
    cfg: RotationConfig

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        size = self.cfg.input_size
        t = view_transform(self.cfg, size)
        n = len(batch["image"])
        images = np.empty((n, 3, size, size), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        for i in range(n):
            path = str(batch["image"][i])
            img = self.load(path)
            # Evaluation: fixed resize, and every rotation equally often (by position in the split).
            view = seeded_views([t], img, seed, path)[0] if train else eval_view(img, size)
            k = int(sample_rng(seed + 1, path).integers(ROTATIONS)) if train else i % ROTATIONS
            images[i] = rotate(chw(view), k)
            labels[i] = k
        return {"image": images, "label": labels}

    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        return RotationHead(features[-1].channels)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["label"])

    def evaluator(self) -> Evaluator:
        return Top1Evaluator("top1", key="label")
