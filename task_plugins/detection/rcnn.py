"""Faster / Mask R-CNN with FPN on top of the platform backbone, assembled from torchvision's parts;
`cascade: true` swaps the RoI box head for Cascade R-CNN's three stages (task_plugins.detection.cascade).

GPPF §4.1 / App. D.1: FPN, RPN, and box and mask heads with four conv layers before the predictors
(torchvision's "v2" heads). All normalisation in the head is GroupNorm: ranks run different heads,
so the head may not use cross-task BN, and the per-GPU batch of 2-12 images is too small for BN.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from gppf.api.heads import TakesBatch
from gppf.api.task import FeatureInfo
from gppf.io.batches import rows
from task_plugins.detection.cascade import CascadeRoIHeads, CascadeStage, stage_box_weights


class Float32BoxCoder(BoxCoder):
    """torchvision decodes boxes in the dtype of the predicted offsets, which under bf16 autocast
    has 4-pixel steps between 512 and 1024: proposals, regression targets and final boxes are
    computed in float32 instead (as detectron2 does); the convs and FCs stay under autocast."""

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])

    def encode(self, reference: list[torch.Tensor], proposals: list[torch.Tensor]) -> list[torch.Tensor]:
        return super().encode([b.float() for b in reference], [p.float() for p in proposals])


@dataclass
class RCNNConfig:
    """Sizes of the head; the defaults are torchvision's Mask R-CNN v2 (for 1024-pixel inputs)."""

    fpn_channels: int = 256
    conv_channels: int = 256  # the four convs of the box and the mask head
    fc_channels: int = 1024
    anchor_size: int = 32  # anchors of the finest FPN level; each coarser level doubles it
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_per_image: int = 256
    roi_batch_per_image: int = 512
    score_thresh: float = 0.05
    detections_per_image: int = 100
    # Cascade R-CNN (task_plugins.detection.cascade): stages' IoU thresholds and loss weights
    cascade: bool = False
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self):
        if self.cascade:
            if not self.cascade_ious or len(self.cascade_ious) != len(self.cascade_loss_weights):
                raise ValueError(
                    f"head.cascade_ious {tuple(self.cascade_ious)} and head.cascade_loss_weights "
                    f"{tuple(self.cascade_loss_weights)} must be non-empty and of the same length"
                )
            if not all(0.0 < v < 1.0 for v in self.cascade_ious):
                raise ValueError(f"head.cascade_ious {tuple(self.cascade_ious)} must lie in (0, 1)")


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups as in the paper's heads; fewer for narrow heads (at least 4 channels a group),
    always a divisor of `channels`."""
    groups = max(g for g in range(1, min(32, max(1, channels // 4)) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def class_balanced_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Cui et al.'s class-balanced weights, (1 - beta) / (1 - beta^n_c) for a class with n_c
    training instances, scaled to mean 1 over the classes; background (index 0, a sampled RoI
    label rather than an object class) keeps weight 1. Returns [len(counts) + 1]."""
    n = torch.tensor([max(1, int(c)) for c in counts], dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    w = w * len(counts) / w.sum()
    return torch.cat([torch.ones(1, dtype=torch.float64), w]).float()


def unpack_masks(packed: torch.Tensor, size: int) -> torch.Tensor:
    """[..., size*size/8] uint8 from np.packbits -> [..., size, size] uint8 in {0, 1}."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], size, size)


class RCNNHead(nn.Module, TakesBatch):
    """FPN + RPN + RoI heads. Training: `forward(feats, batch)` returns the loss dict; evaluation:
    one dict per image with boxes (input pixels), labels (0-based), scores and masks (28x28 probs)."""

    takes_batch = True  # MultiTaskModel passes the batch: targets and image sizes live there

    def __init__(self, features: list[FeatureInfo], num_classes: int, masks: bool, cfg: RCNNConfig):
        super().__init__()
        # On a shared neck's pyramid (gppf.models.neck) the head adds only the extra max-pooled level.
        self.fpn: nn.Module | None = None
        if all(f.pyramid for f in features):
            c = features[0].channels
        else:
            c = cfg.fpn_channels
            self.fpn = FeaturePyramidNetwork(
                [f.channels for f in features], c, extra_blocks=LastLevelMaxPool(), norm_layer=group_norm
            )
        levels = len(features) + 1
        anchors = AnchorGenerator(
            tuple((cfg.anchor_size * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_train, "testing": cfg.rpn_pre_nms_test},
            post_nms_top_n={"training": cfg.rpn_post_nms_train, "testing": cfg.rpn_post_nms_test},
            nms_thresh=0.7,
        )
        names = [str(i) for i in range(len(features))]

        def box_head() -> nn.Module:
            return FastRCNNConvFCHead(
                (c, 7, 7), [cfg.conv_channels] * 4, [cfg.fc_channels], norm_layer=group_norm
            )

        mask_kwargs = {}
        if masks:
            mask_kwargs = {
                "mask_roi_pool": MultiScaleRoIAlign(names, 14, 2),
                "mask_head": MaskRCNNHeads(c, [cfg.conv_channels] * 4, 1, norm_layer=group_norm),
                "mask_predictor": MaskRCNNPredictor(cfg.conv_channels, cfg.conv_channels, num_classes + 1),
            }
        if cfg.cascade:
            stages = [
                CascadeStage(
                    box_head(), cfg.fc_channels, num_classes, iou, Float32BoxCoder(stage_box_weights(k))
                )
                for k, iou in enumerate(cfg.cascade_ious)
            ]
            self.roi_heads = CascadeRoIHeads(
                MultiScaleRoIAlign(names, 7, 2),
                stages,
                cfg.cascade_loss_weights,
                batch_size_per_image=cfg.roi_batch_per_image,
                positive_fraction=0.25,
                score_thresh=cfg.score_thresh,
                nms_thresh=0.5,
                detections_per_img=cfg.detections_per_image,
                **mask_kwargs,
            )
        else:
            self.roi_heads = self._roi_heads(names, box_head(), num_classes, cfg, mask_kwargs)
        self.rpn.box_coder = Float32BoxCoder(self.rpn.box_coder.weights)
        self.roi_heads.box_coder = Float32BoxCoder(self.roi_heads.box_coder.weights)
        self.masks = masks
        self.cascade = cfg.cascade
        self._class_weights: torch.Tensor | None = None

    @staticmethod
    def _roi_heads(
        names: list[str], box_head: nn.Module, num_classes: int, cfg: RCNNConfig, mask_kwargs: dict
    ):
        return RoIHeads(
            MultiScaleRoIAlign(names, 7, 2),
            box_head,
            FastRCNNPredictor(cfg.fc_channels, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=cfg.roi_batch_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=cfg.score_thresh,
            nms_thresh=0.5,
            detections_per_img=cfg.detections_per_image,
            **mask_kwargs,
        )

    def targets(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """The batch's ragged instance columns -> torchvision's per-image target dicts (labels 1-based)."""
        size = batch["image"].shape[-1]
        out = [
            {"boxes": boxes.float().reshape(-1, 4), "labels": labels.long() + 1}
            for boxes, labels in zip(rows(batch["boxes"]), rows(batch["labels"]))
        ]
        if self.masks:
            for t, packed in zip(out, rows(batch["masks"])):
                t["masks"] = unpack_masks(packed, size)
        return out

    @property
    def class_weights(self) -> torch.Tensor | None:
        """[classes + 1] per-class loss weights (background first) while a class-balanced stage
        runs (DetectionTask.enter_stage); None otherwise. Set by the stage, not saved. A cascade
        weights every stage's classifier loss with them."""
        return self._class_weights

    @class_weights.setter
    def class_weights(self, weights: torch.Tensor | None) -> None:
        self._class_weights = weights
        if self.cascade:
            self.roi_heads.class_weights = weights

    def balanced_classifier_loss(
        self, pyramid: dict[str, torch.Tensor], images: ImageList, batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """LVIS's second stage (GPPF Table 2, after Copy-Paste [29]): the final classification
        layer retrained with the class-balanced loss of Cui et al. [24] on the RoIs the frozen
        RPN and sampler give, sum_i w_{y_i} CE_i / N. The rest of the head is frozen in that
        stage, so its losses would carry no gradient and are not computed."""
        targets = self.targets(batch)
        proposals, _ = self.rpn(images, pyramid, targets)
        proposals, _, labels, _ = self.roi_heads.select_training_samples(proposals, targets)
        features = self.roi_heads.box_head(
            self.roi_heads.box_roi_pool(pyramid, proposals, images.image_sizes)
        )
        logits, _ = self.roi_heads.box_predictor(features)
        labels = torch.cat(labels)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        return {"loss_classifier_balanced": (self.class_weights.to(ce.device)[labels] * ce).mean()}

    def forward(
        self, feats: list[torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training: the RPN and RoI losses (or the class-balanced classifier loss alone, while
        `class_weights` is set). Evaluation: per-image detections (0-based labels)."""
        if self.fpn is not None:
            pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        else:  # LastLevelMaxPool's extra level, on the neck's levels
            pyramid = OrderedDict((str(i), f) for i, f in enumerate(feats))
            pyramid["pool"] = F.max_pool2d(feats[-1], 1, 2, 0)
        sizes = [(int(h), int(w)) for h, w in batch["size"].tolist()]
        images = ImageList(batch["image"], sizes)
        if self.training and self.class_weights is not None and not self.cascade:
            return self.balanced_classifier_loss(pyramid, images, batch)
        targets = self.targets(batch) if self.training else None
        proposals, rpn_losses = self.rpn(images, pyramid, targets)
        detections, roi_losses = self.roi_heads(pyramid, proposals, sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        for d in detections:
            d["labels"] = d["labels"] - 1
        return detections
