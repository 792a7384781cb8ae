"""UperNet (Xiao et al., 2018) with an auxiliary FCN head, as GPPF §4.1 uses for semantic segmentation.

Layout follows MMSegmentation's UPerHead / FCNHead: a pyramid pooling module on the last feature,
an FPN over all of them, concatenation at stride 4, a 3x3 fusion conv and a 1x1 classifier; the
auxiliary FCN head reads res4 and its loss is weighted 0.4 (MMSeg's UperNet configs). GroupNorm
replaces SyncBN: heads never use cross-task BN, and per-GPU segmentation batches are small.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.task import FeatureInfo
from task_plugins.detection.rcnn import group_norm


def conv_gn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        group_norm(cout),
        nn.ReLU(inplace=True),
    )


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    def __init__(
        self,
        features: list[FeatureInfo],
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        last = features[-1].channels
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(conv_gn_relu(last, channels, 1) for _ in pool_scales)
        self.ppm_bottleneck = conv_gn_relu(last + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_gn_relu(f.channels, channels, 1) for f in features[:-1])
        # On a shared neck's pyramid (gppf.models.neck) the neck's FPN replaces UperNet's top-down path:
        # the laterals only set the width, the pyramid pooling and the fusion remain.
        self.own_fpn = not all(f.pyramid for f in features)
        if self.own_fpn:
            self.fpn = nn.ModuleList(conv_gn_relu(channels, channels, 3) for _ in features[:-1])
        self.fuse = conv_gn_relu(len(features) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [
            _up(conv(F.adaptive_avg_pool2d(top, s)), top.shape[-2:])
            for s, conv in zip(self.pool_scales, self.ppm)
        ]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        levels.append(self.ppm_bottleneck(torch.cat([top, *pooled], 1)))
        if self.own_fpn:
            for i in range(len(levels) - 1, 0, -1):  # top-down pathway
                levels[i - 1] = levels[i - 1] + _up(levels[i], levels[i - 1].shape[-2:])
            outs = [conv(x) for conv, x in zip(self.fpn, levels[:-1])] + [levels[-1]]
        else:
            outs = levels
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """MMSeg's auxiliary FCNHead: one 3x3 conv, dropout, classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_gn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetWithAux(nn.Module):
    """Training: (main logits, aux logits) at the input resolution; evaluation: main logits only."""

    def __init__(
        self, features: list[FeatureInfo], num_classes: int, channels: int, aux_channels: int, aux_index: int
    ):
        super().__init__()
        self.main = UperNetHead(features, num_classes, channels)
        self.aux_index = aux_index
        self.aux = FCNHead(features[aux_index].channels, num_classes, aux_channels)
        self.stride = features[0].reduction

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        size = (feats[0].shape[-2] * self.stride, feats[0].shape[-1] * self.stride)
        main = _up(self.main(feats), size)
        if not self.training:
            return main
        return main, _up(self.aux(feats[self.aux_index]), size)
