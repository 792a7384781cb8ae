"""The trunk contract and the backbone registry.

A trunk is the shared network every task runs through. The trainer only talks to this interface:

- `forward(x, task) -> list of feature maps` (NCHW, finest first) and `feature_info` (their
  channels and strides) — what heads are built from;
- `set_step(state)` — per-step state, a pure function of (seed, step, rank): Gumbel τ and noise
  for lego trunks, nothing for static ones;
- `param_groups()` — parameters that need their own optimizer settings (controller logits);
- `routes()` / `export(task)` / `load_plain(state)` — a task's path, the plain timm state_dict of
  that path, and the inverse (load a plain timm state_dict into the trunk);
- `local_bn_copy()` — a copy whose BatchNorms are local (no collectives): for a second network
  in a step, such as MoCo's momentum encoder, which other ranks do not run;
- `analysis_layers()` — the layers, in forward order, whose outputs layer-by-layer analyses
  compare (gppf.tools.cka); `channels_last_layers` says whether those outputs are NHWC.

Trunks register by (kind, timm family): `@register_trunk("lego", "swin_transformer")`. The family
is timm's module of the model name ("resnet", "swin_transformer", ...); "*" matches any family.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gppf.api.task import FeatureInfo
from gppf.io.checkpoint import LoadReport

if TYPE_CHECKING:
    from gppf.config.job import BackboneConfig


@dataclass(frozen=True)
class StepState:
    """What a trunk may depend on at a step. τ runs on its own clock: steps of stages in which it
    decays (`tau_step` of `tau_total`), so a stage can hold it."""

    seed: int
    step: int
    rank: int
    tau_step: int
    tau_total: int


# timm's residual blocks (ResNet "layer1.0"), and the blocks of staged models (Swin "layers.0.blocks.1",
# ConvNeXt "stages.0.blocks.1"): what a static trunk's analysis_layers() finds by name.
_BLOCK_NAME = re.compile(r"(?:^|\.)(?:layer\d+\.\d+|(?:layers|stages)\.\d+\.blocks\.\d+)$")


class Trunk(nn.Module):
    feature_info: list[FeatureInfo]
    timm_name: str = ""
    channels_last_layers: bool = False  # analysis_layers() outputs are NHWC (Swin's blocks)

    def forward(self, x: torch.Tensor, task: str) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def set_step(self, state: StepState) -> None:
        """Per-step state; a static trunk has none."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups with their own settings (e.g. controller logits: own lr, no weight
        decay). Parameters not listed go to the default group."""
        return []

    def routes(self) -> dict[str, dict[str, Any]]:
        """Per task: {"route": unit per layer, "probs": selection probabilities}; {} when static."""
        return {}

    def export(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """The plain timm state_dict of the network `task` runs (`timm.create_model(timm_name,
        num_classes=0)` loads it with strict=True)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export a plain state_dict")

    def load_plain(self, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        """Load a plain timm state_dict (the inverse of `export`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a plain state_dict")

    def analysis_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each layer whose output layer-by-layer analyses compare, in forward
        order. The default finds timm's blocks by name; a trunk of another shape overrides it."""
        return [(n.removeprefix("body."), m) for n, m in self.named_modules() if _BLOCK_NAME.search(n)]

    def local_bn_copy(self) -> Trunk:
        """A deep copy with plain BatchNorm2d instead of cross-task BN, no gradients: it issues no
        collectives, so one rank may run it alone."""
        from gppf.dist.cross_bn import to_local_bn

        clone = copy.deepcopy(self)
        to_local_bn(clone)
        for p in clone.parameters():
            p.requires_grad_(False)
        return clone


Builder = Callable[["BackboneConfig", list[str]], Trunk]
_TRUNKS: dict[tuple[str, str], Builder] = {}


def register_trunk(kind: str, family: str = "*") -> Callable[[Builder], Builder]:
    """Register `builder(cfg: BackboneConfig, task_names) -> Trunk` for backbone.kind=`kind` and
    timm models of `family`; a duplicate is an error."""

    def deco(builder: Builder) -> Builder:
        key = (kind, family)
        if key in _TRUNKS and _TRUNKS[key] is not builder:
            raise ValueError(f"a trunk for backbone.kind={kind!r}, family {family!r} is already registered")
        _TRUNKS[key] = builder
        return builder

    return deco


def timm_kwargs(drop_path_rate: float | None, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for timm.create_model: what the backbone config sets explicitly
    (drop_path_rate None keeps the model's own default), then model_kwargs."""
    return {**({} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}), **(model_kwargs or {})}


def timm_family(name: str) -> str:
    """timm's module of a model name: "resnet", "swin_transformer", ... (ValueError if unknown)."""
    import timm
    from timm.models import is_model_in_modules

    if not timm.models.is_model(name):
        raise ValueError(f"backbone.name={name!r} is not a timm model (see timm.list_models())")
    for _, family in _TRUNKS:
        if family != "*" and is_model_in_modules(name, [family]):
            return family
    return "*"


