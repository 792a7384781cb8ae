"""Cascade R-CNN RoI heads (Cai & Vasconcelos, 2018) on torchvision's RoIHeads: GPPF-SwinT's
detection head (App. D.1).

Stage k matches its RoIs to the ground truth at IoU `ious[k]` (0.5 / 0.6 / 0.7), classifies them
and regresses class-agnostic box deltas with its own box coder (targets normalised by 0.1, 0.05,
0.033 for the centre, as MMDetection's cascade configs do); its loss counts `loss_weights[k]`
(1 / 0.5 / 0.25). Stage k+1 trains on stage k's sampled RoIs refined by stage k's deltas
(detached; the ground-truth boxes sampling added are dropped and added again by the next stage's
sampling). At test time each stage refines the previous stage's boxes, the class score is the
mean of the stages' softmax scores, and the boxes are the last stage's. The mask head runs on the
last stage: its positive RoIs in training, the final detections at test time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops


def stage_box_weights(stage: int) -> tuple[float, float, float, float]:
    """BoxCoder weights of stage `stage` (0-based): (10, 10, 5, 5) times stage + 1. Later stages see
    better-localised RoIs whose deltas are smaller, so their targets are scaled up to match."""
    k = stage + 1
    return (10.0 * k, 10.0 * k, 5.0 * k, 5.0 * k)


class CascadeStage(nn.Module):
    """One stage: box head, class logits and class-agnostic deltas, its IoU threshold and coder."""

    def __init__(self, box_head: nn.Module, channels: int, num_classes: int, iou: float, coder: BoxCoder):
        super().__init__()
        self.box_head = box_head
        self.cls_score = nn.Linear(channels, num_classes + 1)
        self.bbox_pred = nn.Linear(channels, 4)
        self.iou = iou
        self.matcher = Matcher(iou, iou, allow_low_quality_matches=False)
        self.coder = coder

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.box_head(roi_features).flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(RoIHeads):
    """torchvision's RoIHeads interface (`forward(features, proposals, image_shapes, targets)`
    returns (detections, losses)); RoI pooling, sampling, NMS settings and the mask branch are
    RoIHeads' own, the box branch is the cascade of `stages`."""

    def __init__(
        self,
        box_roi_pool: nn.Module,
        stages: list[CascadeStage],
        loss_weights: tuple[float, ...],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ):
        if len(stages) != len(loss_weights) or not stages:
            raise ValueError(f"{len(stages)} cascade stages but {len(loss_weights)} loss weights")
        super().__init__(
            box_roi_pool,
            None,  # the stages hold the box heads and predictors
            None,
            stages[0].iou,
            stages[0].iou,
            batch_size_per_image,
            positive_fraction,
            stage_box_weights(0),
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool,
            mask_head,
            mask_predictor,
        )
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        # [classes + 1] class-balanced weights of every stage's cross-entropy while LVIS's second
        # stage runs (RCNNHead.class_weights); None otherwise
        self.class_weights: torch.Tensor | None = None

    # -- training -----------------------------------------------------------------------------
    def sample(
        self, stage: CascadeStage, rois: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], ...]:
        """RoIs (with the ground-truth boxes added) matched at the stage's IoU and subsampled:
        (rois, matched gt index, labels (0 = background), regression targets, is-gt flags)."""
        gt_boxes = [t["boxes"].to(rois[0].dtype) for t in targets]
        rois = self.add_gt_proposals(rois, gt_boxes)
        matched, labels = [], []
        for r, g, t in zip(rois, gt_boxes, targets):
            if len(g) == 0:  # a negative image: every RoI is background
                m = torch.zeros(len(r), dtype=torch.int64, device=r.device)
                lab = torch.zeros_like(m)
            else:
                m = stage.matcher(box_ops.box_iou(g, r))  # -1 below the threshold (one threshold)
                lab = torch.where(m >= 0, t["labels"][m.clamp(min=0)].to(torch.int64), 0)
                m = m.clamp(min=0)
            matched.append(m)
            labels.append(lab)
        keep = self.subsample(labels)
        out_rois, out_matched, out_labels, out_targets, is_gt = [], [], [], [], []
        for r, g, m, lab, k in zip(rois, gt_boxes, matched, labels, keep):
            out_rois.append(r[k])
            out_matched.append(m[k])
            out_labels.append(lab[k])
            gt = g if len(g) else torch.zeros((1, 4), dtype=r.dtype, device=r.device)
            out_targets.append(gt[m[k]])
            is_gt.append(k >= len(r) - len(g))  # add_gt_proposals appended them last
        reg_targets = stage.coder.encode(out_targets, out_rois)
        return out_rois, out_matched, out_labels, list(reg_targets), is_gt

    def box_loss(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        labels: list[torch.Tensor],
        reg_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's fastrcnn_loss for class-agnostic deltas: cross-entropy (class-balanced,
        sum_i w_{y_i} CE_i / N, while `class_weights` is set), and smooth L1 (beta 1/9) over the
        positives divided by the number of sampled RoIs."""
        labels_t = torch.cat(labels)
        targets_t = torch.cat(reg_targets)
        pos = labels_t > 0
        if self.class_weights is None:
            cls = F.cross_entropy(logits, labels_t)
        else:
            ce = F.cross_entropy(logits.float(), labels_t, reduction="none")
            cls = (self.class_weights.to(ce.device)[labels_t] * ce).mean()
        box = F.smooth_l1_loss(deltas[pos], targets_t[pos], beta=1 / 9, reduction="sum") / labels_t.numel()
        return cls, box

    def refine(
        self,
        stage: CascadeStage,
        deltas: torch.Tensor,
        rois: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[torch.Tensor]:
        """The stage's boxes: its deltas applied to its RoIs, clipped to each image."""
        boxes = stage.coder.decode(deltas, rois).reshape(-1, 4).split([len(r) for r in rois])
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes, image_shapes)]

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return self.detect(features, proposals, image_shapes), {}
        self.check_targets(targets)
        losses: dict[str, torch.Tensor] = {}
        rois = proposals
        last = len(self.stages) - 1
        for k, (stage, weight) in enumerate(zip(self.stages, self.loss_weights)):
            rois, matched, labels, reg_targets, is_gt = self.sample(stage, rois, targets)
            logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            cls, box = self.box_loss(logits, deltas, labels, reg_targets)
            losses[f"loss_classifier_{k}"] = weight * cls
            losses[f"loss_box_reg_{k}"] = weight * box
            if k < last:
                with torch.no_grad():
                    refined = self.refine(stage, deltas.detach(), rois, image_shapes)
                    rois = [r[~g] for r, g in zip(refined, is_gt)]
        if self.has_mask():
            pos = [lab > 0 for lab in labels]
            pos_rois = [r[p] for r, p in zip(rois, pos)]
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, pos_rois, image_shapes))
            )
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits,
                pos_rois,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                [m[p] for m, p in zip(matched, pos)],
            )
        return [], losses

    # -- inference ----------------------------------------------------------------------------
    def detect(self, features, proposals, image_shapes) -> list[dict[str, torch.Tensor]]:
        rois = proposals
        scores = []
        for stage in self.stages:
            logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            scores.append(F.softmax(logits, -1))
            rois = self.refine(stage, deltas, rois, image_shapes)
        probs = torch.stack(scores).mean(0).split([len(r) for r in rois])
        detections = []
        for boxes, p in zip(rois, probs):
            detections.append(self.select(boxes, p))
        if self.has_mask():
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, [d["boxes"] for d in detections], image_shapes))
            )
            for d, m in zip(detections, maskrcnn_inference(mask_logits, [d["labels"] for d in detections])):
                d["masks"] = m
        return detections

    def select(self, boxes: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """postprocess_detections for one image's class-agnostic boxes: every (box, class) pair
        above the score threshold, non-empty, NMS per class, the top `detections_per_img`."""
        n, c = probs.shape
        labels = torch.arange(1, c, device=probs.device).expand(n, c - 1).reshape(-1)
        scores = probs[:, 1:].reshape(-1)
        boxes = boxes[:, None].expand(n, c - 1, 4).reshape(-1, 4)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
