"""GPPF-R50: SIMT multi-task pre-training of a ResNet-50 on the paper's eight datasets.

Submit to a Ray cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/gppf_r50.py --data-root /data/gppf

or run locally with no arguments for the embedded default: a local Ray instance, generated demo
data (classification + segmentation), a small lego ResNet (hard routing) and a shrunken schedule;
it ends with a per-task table of validation metrics at step 0 and at the end, and writes the
selection plots (selection.png, selection_history.png) into the run directory.
`--set backbone.kind=static` trains the static backbone instead.

Settings are GPPF App. D.1: sampling weights 4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0 and per-GPU
batch sizes 96, 8, 8, 12, 12, 8, 8, 8 for IN21K, COCO, LVIS, Objects365, Open Images, ADE20K,
COCO-Stuff and Pascal VOC; SGD lr 0.16, momentum 0.9, weight decay 5e-4; 500k iterations,
cosine with 50k warmup; 7 x 8 GPUs. Override anything with --set key=value, pick a subset with
--tasks in21k,ade20k.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / "platform"),
    str(Path(__file__).resolve().parents[1]),
]

from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.cli import main  # noqa: E402
from gppf.job_config import JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402
from gppf.lego import LegoConfig  # noqa: E402


def full_config(data_root: str) -> JobConfig:
    root = Path(data_root)
    det = {"type": "detection"}  # refused with a clear message until detection lands
    return JobConfig(
        name="gppf_r50",
        tasks={
            "in21k": {
                "type": "classification",
                "data_root": str(root / "imagenet21k"),
                "sampling_weight": 4.0,
                "batch_size": 96,
                "input_size": 224,
                "label_smoothing": 0.1,
            },
            "coco": {**det, "data_root": str(root / "coco"), "sampling_weight": 2.5, "batch_size": 8},
            "lvis": {**det, "data_root": str(root / "lvis"), "sampling_weight": 2.5, "batch_size": 8},
            "objects365": {
                **det,
                "data_root": str(root / "objects365"),
                "sampling_weight": 4.0,
                "batch_size": 12,
            },
            "openimages": {
                **det,
                "data_root": str(root / "openimages"),
                "sampling_weight": 4.0,
                "batch_size": 12,
            },
            "ade20k": {
                "type": "segmentation",
                "data_root": str(root / "ade20k"),
                "num_classes": 150,
                "sampling_weight": 1.0,
                "batch_size": 8,
                "input_size": 512,
                "train_images": "images/training",
                "train_labels": "annotations/training",
                "val_images": "images/validation",
                "val_labels": "annotations/validation",
                # ADE20K labels: 0 = "other" (ignored), 1..150 = classes
                "label_map": {i: i - 1 for i in range(1, 151)},
            },
            "cocostuff": {
                "type": "segmentation",
                "data_root": str(root / "coco_stuff"),
                "num_classes": 171,
                "sampling_weight": 2.0,
                "batch_size": 8,
                "input_size": 512,
                "train_images": "images/train2017",
                "train_labels": "annotations/train2017",
                "val_images": "images/val2017",
                "val_labels": "annotations/val2017",
            },
            "voc": {
                "type": "segmentation",
                "data_root": str(root / "voc2012_aug"),
                "num_classes": 21,
                "sampling_weight": 1.0,
                "batch_size": 8,
                "input_size": 512,
                "train_images": "train/images",
                "train_labels": "train/labels",
                "val_images": "val/images",
                "val_labels": "val/labels",
            },
        },
        # Lego ResNet-50, N=2 units per layer, soft Gumbel-softmax, τ 5.0 -> 0.01 at 90 % (App. D.1).
        # (The paper also used gradient checkpointing; lego + checkpointing is not supported yet.)
        backbone=BackboneConfig(name="resnet50", kind="lego", lego=LegoConfig(num_units=2, mode="soft")),
        optim=OptimConfig(name="sgd", lr=0.16, momentum=0.9, weight_decay=5e-4, warmup_steps=50_000),
        train=TrainConfig(steps=500_000, log_every=50, checkpoint_every=5000),
        scaling=ScalingConfig(num_workers=56, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def demo_detection_task(root: Path) -> dict:
    """Mask R-CNN on the demo shapes: small images, so anchors start at 8 px and the head is narrow."""
    return {
        "type": "detection",
        "data_root": str(root / "detection"),
        "sampling_weight": 1.0,
        "batch_size": 4,
        "input_size": 128,
        "lsj_scale": [0.5, 1.5],
        "head": {
            "fpn_channels": 64,
            "conv_channels": 32,
            "fc_channels": 256,
            "anchor_size": 8,
            "rpn_pre_nms_train": 512,
            "rpn_post_nms_train": 256,
            "rpn_pre_nms_test": 256,
            "rpn_post_nms_test": 128,
            "roi_batch_per_image": 64,
        },
    }


def demo_config(demo_root: str) -> JobConfig:
    """The embedded default: same code path, tiny model and data, about three minutes on 2 CPUs."""
    root = Path(demo_root)
    return JobConfig(
        name="gppf_r50_demo",
        tasks={
            "demo_cls": {
                "type": "classification",
                "data_root": str(root / "classification"),
                "sampling_weight": 1.0,
                "batch_size": 16,
                "input_size": 64,
            },
            "demo_seg": {
                "type": "segmentation",
                "data_root": str(root / "segmentation"),
                "num_classes": 4,
                "sampling_weight": 1.0,
                "batch_size": 8,
                "input_size": 64,
            },
        },
        # Hard routing keeps the demo's cost at that of a static network (soft runs every unit).
        backbone=BackboneConfig(
            name="resnet18", kind="lego", lego=LegoConfig(num_units=2, mode="hard", controller_lr=0.5)
        ),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_steps=20),
        train=TrainConfig(steps=300, log_every=25, checkpoint_every=100),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )


if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
