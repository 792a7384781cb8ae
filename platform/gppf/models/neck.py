"""A neck shared by every task between the trunk and the heads: an FPN (P2-P5) plus an adapter
design, optionally followed by a language-guided adapter on P5 (LV-Adapter §4, appendix D.3).

Adapter designs (`model.adapter`), each one trained alone in the pretrain-adapt-finetune
paradigm's adapt stage (the whole neck is "the adapter"):

    fpn          the FPN itself is the adapter (the paper's choice)
    pre          two convs on every trunk level before the FPN
    post         two convs on every pyramid level after the FPN
    pre_scalar   pre, as a residual weighted by one learnable scalar, initialised at adapter_init
    pre_vector   pre, as a residual weighted by a learnable per-channel vector, initialised likewise

The two convs are 3x3 (C -> min(C, 256)), ReLU, 1x1 (back to C): on a ResNet-50's res5 a full
width 3x3 pair would add 75M parameters. The neck's outputs carry `pyramid=True`, which tells
heads that build an FPN of their own (R-CNN, UperNet) to use these levels instead.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from gppf.api.task import FeatureInfo, Task
from gppf.config.base import ConfigError
from gppf.config.job import ADAPTERS
from gppf.models.language import LanguageAdapter

if TYPE_CHECKING:
    from gppf.config.job import ModelConfig


class ConvAdapter(nn.Module):
    """Two convs; with `residual` ("scalar" or "vector") the output is x + gate * convs(x)."""

    def __init__(self, channels: int, residual: str = "", init: float = 1e-3):
        super().__init__()
        mid = min(channels, 256)
        self.convs = nn.Sequential(
            nn.Conv2d(channels, mid, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(mid, channels, 1)
        )
        self.residual = residual
        if residual:
            shape = (1,) if residual == "scalar" else (1, channels, 1, 1)
            self.gate = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if not self.residual:
            return out
        gate = self.gate if self.gate.dim() == 4 else self.gate.view(1, 1, 1, 1)
        return x + gate * out


class SharedNeck(nn.Module):
    def __init__(
        self,
        features: list[FeatureInfo],
        channels: int = 256,
        adapter: str = "fpn",
        adapter_init: float = 1e-3,
        language: LanguageAdapter | None = None,
    ):
        super().__init__()
        if adapter not in ADAPTERS:
            raise ConfigError(f"config.model.adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
        self.adapter = adapter
        self.pre = None
        if adapter.startswith("pre"):
            residual = adapter[4:]  # "", "scalar" or "vector"
            self.pre = nn.ModuleList(ConvAdapter(f.channels, residual, adapter_init) for f in features)
        self.fpn = FeaturePyramidNetwork([f.channels for f in features], channels)
        self.post = nn.ModuleList(ConvAdapter(channels) for _ in features) if adapter == "post" else None
        self.language = language
        self.feature_info = [FeatureInfo(channels, f.reduction, pyramid=True) for f in features]

    def forward(self, feats: list[torch.Tensor], task: str) -> list[torch.Tensor]:
        if self.pre is not None:
            feats = [a(f) for a, f in zip(self.pre, feats)]
        levels = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        if self.post is not None:
            levels = [a(f) for a, f in zip(self.post, levels)]
        if self.language is not None:
            levels[-1] = self.language(levels[-1], task)
        return levels


def build_neck(cfg: ModelConfig, features: list[FeatureInfo], tasks: list[Task]) -> SharedNeck | None:
    """The shared neck of `model.neck` ("" = none: heads keep their own FPNs; ModelConfig has
    checked that no adapter or language variant is asked for then)."""
    if not cfg.neck:
        return None
    lang = None
    if cfg.language.variant:
        names = {t.name: t.class_names() for t in tasks}
        lang = LanguageAdapter(cfg.language, names, cfg.neck_channels)
    return SharedNeck(features, cfg.neck_channels, cfg.adapter, cfg.adapter_init, lang)
