"""Demo configurations of every bundled task type, used by the parametrized task tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ssl(root: Path) -> dict[str, Any]:
    return {
        "data_root": str(root / "segmentation"),
        "images": ["train/images"],
        "val_images": ["val/images"],
        "batch_size": 4,
        "input_size": 32,
    }


# A new task type must add an entry here: test_every_registered_task_has_a_test_config checks it.
def task_entries(root: Path) -> dict[str, dict[str, Any]]:
    return {
        "cls_folder": {
            "type": "classification",
            "data_root": str(root / "classification"),
            "batch_size": 8,
            "input_size": 32,
        },
        "cls_parquet": {
            "type": "classification",
            "data_root": str(root / "classification_parquet"),
            "batch_size": 8,
            "input_size": 32,
        },
        "cls_augs": {  # GPPF's ImageNet-21K augmentations (timm)
            "type": "classification",
            "data_root": str(root / "classification"),
            "batch_size": 8,
            "input_size": 32,
            "auto_augment": "rand-m9-mstd0.5-inc1",
            "reprob": 0.25,
            "mixup": 0.8,
            "cutmix": 1.0,
            "label_smoothing": 0.1,
        },
        "seg": {  # UperNet + auxiliary FCN
            "type": "segmentation",
            "data_root": str(root / "segmentation"),
            "num_classes": 4,
            "batch_size": 4,
            "input_size": 32,
            "head_channels": 16,
            "aux_channels": 8,
        },
        "seg_simple": {
            "type": "segmentation",
            "data_root": str(root / "segmentation"),
            "num_classes": 4,
            "batch_size": 4,
            "input_size": 32,
            "head": "simple",
            "head_channels": 16,
        },
        "depth": {  # KITTI-style sparse depth, SILog loss
            "type": "depth",
            "data_root": str(root / "depth"),
            "batch_size": 4,
            "input_size": 32,
            "head_channels": 16,
        },
        "multihead": {  # partially labelled seg + depth on the same images, zeroing loss
            "type": "multihead",
            "data_root": str(root / "multihead"),
            "batch_size": 4,
            "input_size": 32,
            "heads": {
                "seg": {"type": "segmentation", "num_classes": 4, "head_channels": 16, "aux_channels": 8},
                "depth": {"type": "depth", "head_channels": 16, "max_depth": 24.0, "max_depth_eval": 24.0},
            },
        },
        "det": {  # Mask R-CNN
            "type": "detection",
            "data_root": str(root / "detection"),
            "batch_size": 2,
            "input_size": 64,
            "head": {"fpn_channels": 16, "conv_channels": 16, "fc_channels": 32, "anchor_size": 8},
        },
        # CompL's self-supervised auxiliary tasks, on the segmentation images (no labels read)
        "rotation": {"type": "rotation", **_ssl(root)},
        "moco": {"type": "moco", **_ssl(root), "dim": 16, "queue_size": 32},
        "densecl": {"type": "densecl", **_ssl(root), "dim": 16, "queue_size": 32, "key_size": 24},
        "det_boxes": {  # Faster R-CNN (box-only datasets)
            "type": "detection",
            "data_root": str(root / "detection"),
            "batch_size": 2,
            "input_size": 64,
            "masks": False,
            "head": {"fpn_channels": 16, "conv_channels": 16, "fc_channels": 32, "anchor_size": 8},
        },
    }
