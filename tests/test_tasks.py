"""Every registered task: builds on a tiny backbone, one training step, finite loss, gradients
reach every parameter it should train, its evaluator runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import task_plugins  # noqa: F401
from gppf.api.registry import _REGISTRY, build_task
from gppf.config.job import StreamConfig
from gppf.data.stream import TaskStream, eval_batches
from gppf.models.backbone import Backbone
from gppf.models.model import MultiTaskModel
from tests.tasks_for_tests import task_entries

NAMES = [
    *("cls_folder", "cls_parquet", "cls_augs", "seg", "seg_simple"),
    *("depth", "multihead", "det", "det_boxes", "rotation", "moco", "densecl"),
]


def test_every_registered_task_has_a_test_config(tmp_path):
    covered = {e["type"] for e in task_entries(tmp_path).values()}
    assert set(_REGISTRY) <= covered, f"add a test config for {set(_REGISTRY) - covered}"


@pytest.mark.parametrize("name", NAMES)
def test_task_trains_one_step_and_evaluates(name, demo_root, ray_session):
    task = build_task(name, task_entries(demo_root)[name])
    task.check_data()
    torch.manual_seed(0)
    model = MultiTaskModel(Backbone("resnet10t"), [task])
    stream = TaskStream(task, seed=0, rank=0, world=1, cfg=StreamConfig(min_rows_per_pass=16))
    batch, _ = stream.next()
    assert batch["image"].shape == (task.cfg.batch_size, 3, task.cfg.input_size, task.cfg.input_size)
    batch = task.train_batch(task.to_device(batch, torch.device("cpu")), np.random.default_rng(0))
    out, tie = model(batch["image"], name, batch)
    loss = task.loss(out, batch)
    assert math.isfinite(loss.item())
    (loss + tie).backward()
    # (MoCo's momentum encoder has no gradient by design: it follows the trunk by EMA.)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    stream.close()

    model.eval()
    ev = task.evaluator()
    with torch.no_grad():
        for b in eval_batches(task, 0, 1):
            b = task.to_device(b, torch.device("cpu"))
            ev.update(model(b["image"], name, b)[0], b)
    ev.synchronize(torch.device("cpu"))
    metrics = ev.compute()
    assert ev.primary in metrics and 0.0 <= metrics[ev.primary] <= 100.0


def test_randaugment_posterize_at_the_top_magnitude(demo_root):
    """ "inc1" posterize keeps 0 bits at magnitude 10 (m9 with noise gets there): a black image, as
    older Pillow gave; Pillow 12+ raises ValueError for 0 bits inside timm."""
    from PIL import Image

    task = build_task("cls_augs", task_entries(demo_root)["cls_augs"])
    (op,) = [o for o in task._randaugment().ops if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))
