"""The configs behind jobs/compl.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from pathlib import Path

from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig
from gppf.presets.gppf_r50 import voc_task

AUX = "densecl"


def densecl(data_root: str, images: list[str], target: str, input_size: int, **extra) -> dict:
    """DenseCL on `images` under data_root, attached to `target` (composite mode)."""
    return {
        "type": "densecl",
        "data_root": data_root,
        "images": images,
        "composite_with": target,
        "loss_weight": 0.2,
        "batch_size": 8,
        "input_size": input_size,
        **extra,
    }


def full_config(data_root: str) -> JobConfig:
    voc = voc_task(Path(data_root))
    voc["label_fraction"] = 1.0  # CompL's tables: 0.01 ... 1.0
    return JobConfig(
        name="compl_voc_densecl",
        tasks={
            "voc": voc,
            # Every JPEG of VOC: the unlabelled rest of a label fraction included (val images too:
            # restrict with `images` to a folder of train images if that matters for your study).
            AUX: densecl(voc["data_root"], ["JPEGImages"], "voc", 512, key_size=512),
        },
        backbone=BackboneConfig(name="resnet50"),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=500),
        train=TrainConfig(steps=40_000, log_every=50, checkpoint_every=5000, eval_every=5000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def demo_config(demo_root: str) -> JobConfig:
    """The demo segmentation task at 10 % of its labels, with DenseCL on all its training images."""
    seg = str(Path(demo_root) / "segmentation")
    return JobConfig(
        name="compl_demo",
        tasks={
            "demo_seg": {
                "type": "segmentation",
                "data_root": seg,
                "num_classes": 4,
                "batch_size": 8,
                "input_size": 64,
                "head_channels": 32,
                "aux_channels": 16,
                "label_fraction": 0.1,
            },
            AUX: densecl(seg, ["train/images"], "demo_seg", 64, val_images=["val/images"], queue_size=1024),
        },
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, warmup_steps=30),
        train=TrainConfig(steps=300, log_every=50, checkpoint_every=0),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )
