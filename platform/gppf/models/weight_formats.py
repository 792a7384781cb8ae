"""Backbone weights from the files people have, in the trunk's plain (timm) key layout.

Recognised, from local files only (nothing is downloaded):

- exported routes and timm checkpoints: `conv1.weight`, `layer1.0...` (ResNet) or
  `patch_embed...` (Swin); the classifier (`fc.*`, `head.*`) is left out;
- torchvision ResNets: the same keys as timm's ResNets; `fc.*` is left out;
- MoCo v1/v2: `{"state_dict": {"module.encoder_q.conv1.weight", ...}}`; the projection head
  (`encoder_q.fc.*`), the momentum encoder (`encoder_k.*`) and the queue are left out;
- DenseCL: MoCo's layout with the encoder as `encoder_q.0.*` (backbone) and `encoder_q.1.*`
  (neck), or mmcv's `backbone.*`; necks, dense projection heads, momentum encoders and queues are
  left out.

Whatever is left must map onto the trunk: a key that does not is an error that names it as the
file spells it. (A gppf checkpoint is not converted: it loads in the trunk's own layout.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gppf.io.checkpoint import LoadReport, load_weights, read_weights

if TYPE_CHECKING:
    from gppf.api.trunk import Trunk

CLASSIFIERS = ("fc.", "head.", "classifier.")  # also where MoCo keeps its projection MLP
MOMENTUM = re.compile(r"^(encoder_k\.|queue\d*(_ptr)?$|momentum_encoder\.)")
NECKS = ("neck.", "head.", "projector.", "predictor.")


@dataclass
class PlainWeights:
    state: dict[str, torch.Tensor]  # the trunk's plain layout
    fmt: str
    source_keys: dict[str, str] = field(default_factory=dict)  # plain key -> key in the file
    dropped: list[str] = field(default_factory=list)  # keys of the file deliberately left out


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def to_plain(state: dict[str, torch.Tensor]) -> PlainWeights:
    """Convert a backbone state_dict of any recognised format to the plain timm layout."""
    keys = {k: k for k in state}  # current name -> name in the file
    fmt = "plain (timm / torchvision layout, or an exported route)"
    dropped: list[str] = []

    def rename(fn) -> None:
        nonlocal keys
        keys = {fn(k): orig for k, orig in keys.items()}

    def drop(pred) -> None:
        nonlocal keys
        dropped.extend(orig for k, orig in keys.items() if pred(k))
        keys = {k: orig for k, orig in keys.items() if not pred(k)}

    rename(lambda k: _strip(k, "module."))  # DataParallel / DDP
    if any(k.startswith("encoder_q.") for k in keys):
        fmt = "MoCo (encoder_q)"
        drop(lambda k: bool(MOMENTUM.match(k)))
        drop(lambda k: not k.startswith("encoder_q."))
        rename(lambda k: _strip(k, "encoder_q."))
        if any(k.startswith("0.") for k in keys):  # DenseCL: encoder_q = Sequential(backbone, neck)
            fmt = "DenseCL (encoder_q.0 = backbone)"
            drop(lambda k: not k.startswith("0."))
            rename(lambda k: _strip(k, "0."))
    elif any(k.startswith("backbone.") for k in keys):  # mmcv-style (DenseCL, OpenSelfSup)
        fmt = "backbone.* (mmcv style)"
        drop(lambda k: bool(MOMENTUM.match(k)) or k.startswith(NECKS))
        drop(lambda k: not k.startswith("backbone."))
        rename(lambda k: _strip(k, "backbone."))
    drop(lambda k: k.startswith(CLASSIFIERS))
    return PlainWeights({k: state[orig] for k, orig in keys.items()}, fmt, dict(keys), dropped)


def load_backbone(trunk: Trunk, path: str) -> LoadReport:
    """Load backbone weights from `path` into `trunk` and say what happened.

    A gppf checkpoint loads its `backbone.*` tensors in the trunk's own layout (keys the trunk
    lacks, such as other tasks' controllers, are reported). Any other file is converted by
    `to_plain` and loaded with `trunk.load_plain`; a key that maps to nothing in the trunk is an
    error naming it."""
    state, kind = read_weights(path)
    if kind == "checkpoint":
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        report = load_weights(trunk, state, path)
        report.fmt = "gppf checkpoint"
        if not report.loaded:
            raise ValueError(
                f"backbone.init_from {path}: no tensor of the checkpoint's backbone fits this one (a lego "
                "checkpoint for a static backbone? export a route first: python -m gppf.tools.export)"
            )
        return report
    plain = to_plain(state)
    report = trunk.load_plain(plain.state, path)
    if report.unexpected:
        key = report.unexpected[0]
        raise ValueError(
            f"backbone.init_from {path} ({plain.fmt}): {plain.source_keys.get(key, key)!r} maps to no "
            f"parameter of the {trunk.timm_name} backbone ({len(report.unexpected)} such keys)"
        )
    report.fmt, report.dropped = plain.fmt, plain.dropped
    return report
