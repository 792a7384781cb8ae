"""The configs behind jobs/demo_detection.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig
from gppf.io import storage
from gppf.presets.gppf_r50 import demo_detection_task


def full_config(data_root: str) -> JobConfig:
    """COCO 2017 Mask R-CNN, LSJ at 1024, 16 images per step over 8 GPUs."""
    return JobConfig(
        name="mask_rcnn_coco",
        tasks={
            "coco": {"type": "detection", "data_root": str(storage.path(data_root) / "coco"), "batch_size": 2}
        },
        backbone=BackboneConfig(name="resnet50"),
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=4e-5, warmup_steps=1000),
        train=TrainConfig(steps=90_000, log_every=50, checkpoint_every=5000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def demo_config(demo_root: str) -> JobConfig:
    return JobConfig(
        name="demo_detection",
        tasks={"demo_det": demo_detection_task(storage.path(demo_root))},
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=100),
        train=TrainConfig(steps=400, log_every=50, checkpoint_every=200),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )
