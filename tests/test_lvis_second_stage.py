"""LVIS's second stage (GPPF Table 2 after Copy-Paste [29]): only the final classification layer
trains, with Cui et al.'s class-balanced loss; everything else stays bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gppf.config.base import ConfigError
from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, StageConfig, TrainConfig
from gppf.engine.trainer import Trainer
from gppf.io.batches import collate_numpy
from task_plugins.detection.rcnn import class_balanced_weights
from tests.tasks_for_tests import task_entries
from tests.test_trainer import FixedStream

CLS = "heads.det.roi_heads.box_predictor.cls_score.*"


def _config(demo_root, stages, **head) -> JobConfig:
    det = {**task_entries(demo_root)["det"], "input_size": 64, "copy_paste": 0.0}
    if head:
        det["head"] = {**det.get("head", {}), **head}
    return JobConfig(
        tasks={"det": det},
        backbone=BackboneConfig(name="resnet10t"),
        optim=OptimConfig(lr=0.05, warmup_steps=0, weight_decay=1e-3),
        train=TrainConfig(steps=sum(s.steps for s in stages)),
        stages=stages,
    )


def _trainer(cfg):
    t = Trainer(cfg, torch.device("cpu"))
    task = t.tasks[0]
    units = task.source("train").units[:2]
    raw = {k: np.array([u[k] for u in units]) for k in units[0]}
    t.streams["det"] = FixedStream(collate_numpy(task.preprocess(raw, train=True, seed=0)))
    return t


def _state(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def test_class_balanced_weights_follow_cui_et_al():
    w = class_balanced_weights([1000, 10, 1], beta=0.999)
    raw = [(1 - 0.999) / (1 - 0.999**n) for n in (1000, 10, 1)]
    assert w[0] == 1.0  # background
    assert torch.allclose(w[1:].double(), torch.tensor(raw, dtype=torch.float64) * 3 / sum(raw), atol=1e-6)
    assert w[1] < w[2] < w[3] and w[1:].mean().item() == pytest.approx(1.0)


def test_second_stage_trains_only_the_classifier_with_the_class_balanced_loss(demo_root):
    stages = [
        StageConfig("joint", 2),
        StageConfig(
            "lvis_cb",
            2,
            train_only=[CLS],
            task_options={"det": {"class_balanced_beta": 0.99}},
            lr_factor=0.1,
        ),
    ]
    t = _trainer(_config(demo_root, stages))
    head = t.model.heads["det"]
    assert head.class_weights is None
    t.train_step()
    t.train_step()
    t.enter_stage(1)
    before = _state(t)
    counts = t.tasks[0].instance_counts()
    assert sum(counts) > 0 and torch.equal(head.class_weights, class_balanced_weights(counts, 0.99))
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{CLS[:-2]}.weight", f"{CLS[:-2]}.bias"}

    losses = []
    for _ in range(2):
        out = t.train_step()
        losses.append(float(t.payload.view(out.stats, "loss")[0]))
    after = _state(t)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only the classifier moved; every other weight and every BN statistic is bit-identical.
    assert changed == {f"{CLS[:-2]}.weight", f"{CLS[:-2]}.bias"}
    assert any("running_mean" in k for k in before)
    assert all(np.isfinite(losses))


def test_balanced_loss_is_the_weighted_cross_entropy_of_the_sampled_rois(demo_root):
    t = _trainer(_config(demo_root, [StageConfig("cb", 1, train_only=[CLS])]))
    head = t.model.heads["det"]
    head.class_weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    batch = t.tasks[0].to_device(t.streams["det"].batch, torch.device("cpu"))
    captured = {}
    predictor = head.roi_heads.box_predictor
    sampler = head.roi_heads.select_training_samples

    def record_logits(module, args, output):
        captured["logits"] = output[0].detach()

    def record_labels(*args, **kwargs):
        out = sampler(*args, **kwargs)
        captured["labels"] = torch.cat(out[2])
        return out

    handle = predictor.register_forward_hook(record_logits)
    head.roi_heads.select_training_samples = record_labels
    torch.manual_seed(0)
    losses, _ = t.model(batch["image"], "det", batch)
    handle.remove()
    assert set(losses) == {"loss_classifier_balanced"}
    labels = captured["labels"]
    assert (labels > 0).any() and (labels == 0).any()  # foreground and background RoIs
    ce = F.cross_entropy(captured["logits"], labels, reduction="none")
    expected = (head.class_weights[labels] * ce).sum() / len(labels)
    assert losses["loss_classifier_balanced"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_stage_options_are_checked(demo_root):
    with pytest.raises(ConfigError, match=r"task_options\.det\.beta is not a detection stage option"):
        _trainer(_config(demo_root, [StageConfig("cb", 1, task_options={"det": {"beta": 0.9}})]))
    with pytest.raises(ConfigError, match=r"class_balanced_beta must be in \(0, 1\)"):
        _trainer(
            _config(demo_root, [StageConfig("cb", 1, task_options={"det": {"class_balanced_beta": 1.0}})])
        )
    with pytest.raises(ConfigError, match=r"task_options names task 'lvis'"):
        _trainer(_config(demo_root, [StageConfig("cb", 1, task_options={"lvis": {}})]))
    with pytest.raises(ConfigError, match=r"train_only pattern 'heads\.nope\.\*' matches no parameter"):
        _trainer(_config(demo_root, [StageConfig("cb", 1, train_only=["heads.nope.*"])]))


def test_cascade_second_stage_trains_each_stages_classifier_with_the_balanced_loss(demo_root):
    """GPPF-SwinT's LVIS head is a cascade: the second stage retrains the three stages' classifiers."""
    pattern = "heads.det.roi_heads.stages.*.cls_score.*"
    stages = [StageConfig("cb", 2, train_only=[pattern], task_options={"det": {"class_balanced_beta": 0.99}})]
    t = _trainer(_config(demo_root, stages, cascade=True))
    head = t.model.heads["det"]
    assert head.roi_heads.class_weights is not None and torch.equal(
        head.roi_heads.class_weights, head.class_weights
    )
    before = _state(t)
    t.train_step()
    after = _state(t)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        f"heads.det.roi_heads.stages.{k}.cls_score.{p}" for k in range(3) for p in ("weight", "bias")
    }
    # The weighted cross-entropy of a stage: sum_i w_{y_i} CE_i / N.
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    cls, _ = head.roi_heads.box_loss(logits, torch.zeros(6, 4), [labels], [torch.zeros(6, 4)])
    w = head.class_weights[labels]
    assert cls.item() == pytest.approx((w * F.cross_entropy(logits, labels, reduction="none")).mean().item())


def test_a_late_stages_options_are_checked_before_the_run(demo_root):
    """The LVIS stage comes after 500k steps: its options are checked on the driver, up front."""
    from gppf.launch.fit import validate

    stages = [
        StageConfig("joint", 5),
        StageConfig("cb", 1, task_options={"det": {"class_balanced_beta": 2.0}}),
    ]
    with pytest.raises(
        ConfigError, match=r"stages\[1\] \(cb\): task_options\.det\.class_balanced_beta must be"
    ):
        validate(_config(demo_root, stages))
    with pytest.raises(ConfigError, match=r"stages\[1\] \(cb\): task_options names task 'lvis'"):
        validate(
            _config(demo_root, [StageConfig("joint", 5), StageConfig("cb", 1, task_options={"lvis": {}})])
        )
