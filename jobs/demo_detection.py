"""Single-task Mask R-CNN: the demo shapes by default, COCO with --data-root.

    python jobs/demo_detection.py                      # demo: ResNet-18, 2 CPU workers
    python jobs/demo_detection.py --data-root /data     # COCO 2017 under /data/coco, ResNet-50
    python jobs/demo_detection.py --set tasks.demo_det.head.cascade=true   # Cascade Mask R-CNN

The demo trains a ResNet-18 from scratch to box AP50 >= 50 on the held-out demo split (figures in
docs/benchmarks.md). It is the single-task baseline of the detection plugin: the same task entry
as in jobs/gppf_r50.py's embedded default, alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "platform"),
    str(Path(__file__).resolve().parents[1]),
]

from gppf_r50 import demo_detection_task  # noqa: E402  (jobs/ is on the path of a job script)

from gppf import storage  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.cli import main  # noqa: E402
from gppf.job_config import JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402


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


if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
