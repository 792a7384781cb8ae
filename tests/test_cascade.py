"""Cascade R-CNN (task_plugins.detection.cascade): the stages' IoU thresholds, box coders and loss weights,
stage k+1 training on stage k's refined boxes, and test-time scores averaged over the stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gppf.api.task import FeatureInfo
from task_plugins.detection.cascade import CascadeRoIHeads
from task_plugins.detection.rcnn import RCNNConfig, RCNNHead

S = 128  # input size
FEATS = [FeatureInfo(16, r) for r in (4, 8, 16, 32)]


def _head(**kw) -> RCNNHead:
    torch.manual_seed(0)
    cfg = RCNNConfig(
        fpn_channels=32,
        conv_channels=32,
        fc_channels=64,
        anchor_size=8,
        rpn_post_nms_train=200,
        rpn_post_nms_test=100,
        roi_batch_per_image=64,
        cascade=True,
        **kw,
    )
    return RCNNHead(FEATS, 3, True, cfg)


def _inputs():
    g = torch.Generator().manual_seed(1)
    fm = [torch.randn(2, 16, S // r, S // r, generator=g) for r in (4, 8, 16, 32)]
    masks = np.zeros((2, 3, S, S), np.uint8)
    masks[:, 0, 10:50, 20:70] = 1
    masks[:, 1, 60:120, 5:45] = 1
    boxes = torch.tensor([[20.0, 10, 70, 50], [5, 60, 45, 120], [0, 0, 0, 0]]).expand(2, 3, 4).clone()
    batch = {
        "image": torch.zeros(2, 3, S, S),
        "size": torch.tensor([[S, S], [S, S]]),
        "labels": torch.tensor([[0, 2, -1], [1, -1, -1]]),
        "boxes": boxes,
        "masks": torch.from_numpy(np.packbits(masks.reshape(2, 3, -1), axis=-1)),
    }
    return fm, batch


def _record(rh: CascadeRoIHeads) -> tuple[list, list]:
    """Hooks that record the RoIs each stage pools and what each stage outputs, call by call."""
    pooled, outputs = [], []
    rh.box_roi_pool.register_forward_hook(lambda m, args, out: pooled.append([b.detach() for b in args[1]]))
    for s in rh.stages:
        s.register_forward_hook(lambda m, args, out: outputs.append([t.detach() for t in out]))
    return pooled, outputs


def test_stages_thresholds_coders_and_loss_weights():
    head = _head()
    rh = head.roi_heads
    assert isinstance(rh, CascadeRoIHeads)
    assert [s.iou for s in rh.stages] == [0.5, 0.6, 0.7]
    assert [(s.matcher.high_threshold, s.matcher.low_threshold) for s in rh.stages] == [
        (0.5, 0.5),
        (0.6, 0.6),
        (0.7, 0.7),
    ]
    assert [s.coder.weights for s in rh.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert rh.loss_weights == (1.0, 0.5, 0.25)
    assert all(s.bbox_pred.out_features == 4 for s in rh.stages)  # class-agnostic regression
    # The weights scale each stage's losses: the same step with weights 1, 1, 1 gives 2x and 4x.
    fm, batch = _inputs()
    torch.manual_seed(5)
    weighted = head.train()(fm, batch)
    flat = _head(cascade_loss_weights=(1.0, 1.0, 1.0)).train()
    torch.manual_seed(5)
    plain = flat(fm, batch)
    for k, w in enumerate((1.0, 0.5, 0.25)):
        for name in (f"loss_classifier_{k}", f"loss_box_reg_{k}"):
            assert float(weighted[name]) == pytest.approx(w * float(plain[name]), rel=1e-6), name
    assert float(plain["loss_box_reg_2"]) > 0 and "loss_mask" in weighted
    with pytest.raises(ValueError, match="same length"):
        RCNNConfig(cascade=True, cascade_loss_weights=(1.0, 0.5))


def test_each_stage_trains_on_the_previous_stages_refined_boxes():
    head = _head().train()
    rh = head.roi_heads
    pooled, outputs = _record(rh)
    fm, batch = _inputs()
    losses = head(fm, batch)
    # The refined boxes are detached: the later stages' losses send no gradient into stage 0.
    sum(v for k, v in losses.items() if k.endswith(("_1", "_2"))).backward()
    assert all(p.grad is None for p in rh.stages[0].parameters())
    assert all(p.grad is not None for p in rh.stages[1].parameters())
    assert len(pooled) == 3 and len(outputs) == 3
    gt = head.targets(batch)
    for k in range(2):
        refined = rh.refine(rh.stages[k], outputs[k][1], pooled[k], [(S, S), (S, S)])
        for i in range(2):
            nxt = pooled[k + 1][i]
            is_gt = (nxt[:, None, :] == gt[i]["boxes"][None]).all(-1).any(-1)
            assert is_gt.any() and (~is_gt).sum() > 10
            # Every RoI of stage k+1 that is not a ground-truth box is one of stage k's refined
            # boxes, and refinement really moved them.
            match = (nxt[~is_gt][:, None, :] - refined[i][None]).abs().amax(-1) < 1e-5
            assert match.any(1).all()
            assert not torch.allclose(refined[i], pooled[k][i])


def test_test_time_scores_are_the_mean_over_stages_on_the_last_stages_boxes():
    head = _head().eval()
    rh = head.roi_heads
    pooled, outputs = _record(rh)
    fm, batch = _inputs()
    with torch.no_grad():
        dets = head(fm, batch)
    probs = torch.stack([torch.softmax(o[0], -1) for o in outputs]).mean(0)
    final = rh.refine(rh.stages[2], outputs[2][1], pooled[2], [(S, S), (S, S)])
    # Stage k+1 runs on stage k's refined boxes at test time too.
    assert torch.allclose(pooled[1][0], rh.refine(rh.stages[0], outputs[0][1], pooled[0], [(S, S)] * 2)[0])
    start = 0
    for i, d in enumerate(dets):
        n = len(pooled[2][i])
        assert len(d["boxes"]) > 0 and d["masks"].shape[1:] == (1, 28, 28)
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"]):
            row = ((final[i] - box).abs().amax(-1) < 1e-5).nonzero()[:, 0]
            assert len(row) and any(
                abs(float(probs[start + r, int(label) + 1]) - float(score)) < 1e-6 for r in row
            )
        start += n


def test_gppf_swint_uses_cascade_on_its_four_detection_tasks():
    from gppf.config.base import from_dict
    from task_plugins.detection.task import DetectionConfig
    from tests.test_jobs import load_job

    root = Path(__file__).resolve().parents[1] / "jobs"
    swint = load_job(root / "gppf_swint.py").full_config("/data/gppf")
    r50 = load_job(root / "gppf_r50.py").full_config("/data/gppf")
    det = ("coco", "lvis", "objects365", "openimages")
    for name in det:
        cfg = from_dict(DetectionConfig, {k: v for k, v in swint.tasks[name].items() if k != "type"})
        assert cfg.head.cascade and cfg.head.cascade_ious == (0.5, 0.6, 0.7)
        assert not r50.tasks[name].get("head", {}).get("cascade", False)  # Mask R-CNN stays R50's
    assert swint.tasks["lvis"]["head"]["detections_per_image"] == 300  # LVIS's cap kept
