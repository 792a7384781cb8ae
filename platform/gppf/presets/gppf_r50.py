"""The configs behind jobs/gppf_r50.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from pathlib import Path

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    LegoConfig,
    OptimConfig,
    ScalingConfig,
    StageConfig,
    TrainConfig,
)
from gppf.engine.epochs import epochs_to_steps
from gppf.io import storage
from gppf.io.storage import UriPath

# COCO-Stuff 164k label PNGs hold 0-based ids 0..181 (255 = unlabeled); these 11 COCO thing ids
# are unused, and the other 171 map to contiguous classes (as MMSegmentation's conversion does).
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_MAP = {raw: i for i, raw in enumerate(r for r in range(182) if r not in COCO_STUFF_UNUSED)}


# GPPF's classification recipe (App. D.1, with timm): RandAugment, Random Erasing, Mixup, CutMix,
# label smoothing; IN-1K finetuning uses it too (App. D.2).
IN21K_RECIPE = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "reprob": 0.25,
    "mixup": 0.8,
    "cutmix": 1.0,
    "label_smoothing": 0.1,
    "crop_scale_min": 0.08,
}


def voc_task(root: Path) -> dict:
    """Pascal VOC 2012 segmentation with SBD's train_aug list (VOCdevkit/VOC2012 under root)."""
    return {
        "type": "segmentation",
        "data_root": str(root / "VOCdevkit" / "VOC2012"),
        "num_classes": 21,
        "sampling_weight": 1.0,
        "batch_size": 8,
        "input_size": 512,
        "train_images": "JPEGImages",
        "train_labels": "SegmentationClassAug",
        "val_images": "JPEGImages",
        "val_labels": "SegmentationClassAug",
        "train_list": "ImageSets/Segmentation/train_aug.txt",
        "val_list": "ImageSets/Segmentation/val.txt",
    }


def full_config(data_root: str) -> JobConfig:
    """The eight datasets of GPPF App. D.1, each in its own release's on-disk layout under data_root:

    imagenet21k/{train,val}/<wnid>/*.JPEG          (or */*.parquet; IN-21K has no official val:
                                                    hold some images out)
    coco/{train2017,val2017}/*.jpg, coco/annotations/instances_{train,val}2017.json
    lvis/lvis_v1_{train,val}.json                  (images: coco/train2017, coco/val2017 via coco_url)
    objects365/{train,val}/patchN/..., objects365/annotations/zhiyuan_objv2_{train,val}.json
    openimages/{train,validation}/<ImageID>.jpg,
    openimages/annotations/openimages_{train,val}_bbox.json   (made by gppf.tools.openimages_to_coco;
                                                    val with the challenge's --image-labels)
    openimages/annotations/challenge-2019-label500-hierarchy.json
    ADEChallengeData2016/{images,annotations}/{training,validation}/
    coco_stuff/images/{train2017,val2017}/*.jpg, coco_stuff/annotations/{train2017,val2017}/*.png
    VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug}, .../ImageSets/Segmentation/{train_aug,val}.txt
    """
    root = storage.path(data_root)
    # Copy-Paste [29] on every pair of images (its paper pastes on every pair; no probability)
    coco_layout = {"type": "detection", "sampling_weight": 2.5, "batch_size": 8, "copy_paste": 1.0}
    tasks = {
        "in21k": {
            "type": "classification",
            "data_root": str(root / "imagenet21k"),
            "sampling_weight": 4.0,
            "batch_size": 96,
            "input_size": 224,
            **IN21K_RECIPE,
        },
        "coco": {**coco_layout, "data_root": str(root / "coco")},
        "lvis": {
            **coco_layout,
            "data_root": str(root),
            "train_images": "coco",  # LVIS names images by coco_url: <split>/<file> under coco/
            "val_images": "coco",
            "train_annotations": "lvis/lvis_v1_train.json",
            "val_annotations": "lvis/lvis_v1_val.json",
            "image_key": "coco_url",
            # LVIS's own metric: federated AP (APr/APc/APf) over its 300 detections an image.
            "evaluation": "lvis",
            "head": {"detections_per_image": 300},
        },
        "objects365": {
            "type": "detection",
            "data_root": str(root / "objects365"),
            "sampling_weight": 4.0,
            "batch_size": 12,
            "masks": False,
            "train_images": "train",
            "val_images": "val",
            "train_annotations": "annotations/zhiyuan_objv2_train.json",
            "val_annotations": "annotations/zhiyuan_objv2_val.json",
            "path_components": 2,  # "images/v1/patch8/x.jpg" is train/patch8/x.jpg on disk
        },
        "openimages": {
            "type": "detection",
            "data_root": str(root / "openimages"),
            "sampling_weight": 4.0,
            "batch_size": 12,
            "masks": False,
            "train_images": "train",
            "val_images": "validation",
            "train_annotations": "annotations/openimages_train_bbox.json",
            "val_annotations": "annotations/openimages_val_bbox.json",
            # Table 1's "Open AP50": the challenge's metric (hierarchy, group-of, verified labels)
            "evaluation": "oid_challenge",
            "oid_hierarchy": "annotations/challenge-2019-label500-hierarchy.json",
        },
        "ade20k": {
            "type": "segmentation",
            "data_root": str(root / "ADEChallengeData2016"),
            "num_classes": 150,
            "sampling_weight": 1.0,
            "batch_size": 8,
            "input_size": 512,
            "train_images": "images/training",
            "train_labels": "annotations/training",
            "val_images": "images/validation",
            "val_labels": "annotations/validation",
            # ADE20K labels: 0 = "other" (ignored), 1..150 = classes (MMSeg's reduce_zero_label)
            "reduce_zero_label": True,
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
            "label_map": COCO_STUFF_MAP,
        },
        "voc": voc_task(root),
    }
    return JobConfig(
        name="gppf_r50",
        tasks=tasks,
        # Lego ResNet-50, N=2 units per layer, soft Gumbel-softmax, τ 5.0 -> 0.01 at 90 %, with
        # gradient checkpointing ("Model Checkpoint"): App. D.1. The stem is a lego layer too: the
        # tasks' sharing it is what App. B found, not a constraint.
        backbone=BackboneConfig(
            name="resnet50",
            kind="lego",
            lego=LegoConfig(num_units=2, mode="soft", shared_stem=False),
            grad_checkpointing=True,
        ),
        optim=OptimConfig(name="sgd", lr=0.16, momentum=0.9, weight_decay=5e-4, warmup_steps=50_000),
        train=TrainConfig(log_every=50, checkpoint_every=5000),
        stages=stages(500_000, 50_000, lvis_second_stage_steps(tasks, 56)),
        scaling=ScalingConfig(num_workers=56, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


# LVIS v1's training images; the second stage is counted in epochs of them (gppf.engine.epochs).
LVIS_TRAIN_IMAGES = 100_170
LVIS_CB_EPOCHS = 12  # unspecified by GPPF and Copy-Paste; the classifier-retraining papers' length
LVIS_CLASSIFIER = "heads.lvis.roi_heads.box_predictor.cls_score.*"


def lvis_second_stage_steps(tasks: dict, world: int, epochs: float = LVIS_CB_EPOCHS) -> int:
    return epochs_to_steps(epochs, "lvis", tasks, {"lvis": LVIS_TRAIN_IMAGES}, world, stage_tasks=["lvis"])


def stages(joint_steps: int, warmup_steps: int, lvis_steps: int) -> list[StageConfig]:
    """App. D.1's 500k SIMT steps (cosine with 50k warmup over them alone), then Table 2's second
    stage for LVIS [29]: every worker on LVIS, only the final classification layer trains, with
    the class-balanced loss [24] (Cui et al.'s beta 0.999), at a tenth of the lr on a cosine of its
    own; the trunk is frozen, so τ holds. LVIS's federated AP is reported after both stages."""
    return [
        StageConfig("joint", joint_steps, schedule="stage", warmup_steps=warmup_steps),
        StageConfig(
            "lvis_cb",
            lvis_steps,
            tasks=["lvis"],
            train_only=[LVIS_CLASSIFIER],
            task_options={"lvis": {"class_balanced_beta": 0.999}},
            lr_factor=0.1,
            schedule="stage",
            tau_decay=False,
        ),
    ]


def demo_detection_task(root: Path | UriPath) -> dict:
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
    """The embedded default: same code path, tiny model and data, about five minutes on 2 CPUs."""
    root = storage.path(demo_root)
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
            "demo_det": demo_detection_task(root),
            "demo_seg": {
                "type": "segmentation",
                "data_root": str(root / "segmentation"),
                "num_classes": 4,
                "class_names": ["background", "disc", "square", "triangle"],
                "sampling_weight": 1.0,
                "batch_size": 8,
                "input_size": 64,
                "head_channels": 32,
                "aux_channels": 16,
            },
        },
        # Hard routing keeps the demo's cost at that of a static network (soft runs every unit).
        backbone=BackboneConfig(
            name="resnet18", kind="lego", lego=LegoConfig(num_units=2, mode="hard", controller_lr=0.5)
        ),
        optim=OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=5e-4, warmup_steps=50),
        train=TrainConfig(steps=360, log_every=30, checkpoint_every=120),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )
