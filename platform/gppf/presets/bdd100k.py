"""BDD100K as three GPPF tasks (detection, semantic segmentation, drivable area), read in the
release's own layout: the archives (bdd100k_images_100k.zip, bdd100k_images_10k.zip,
bdd100k_det_20_labels_trainval.zip, bdd100k_sem_seg_labels_trainval.zip,
bdd100k_drivable_labels_trainval.zip) all unpack into one `bdd100k/` directory under `root`:

    bdd100k/images/100k/{train,val}/<stem>.jpg           70k / 10k frames, 1280x720
    bdd100k/images/10k/{train,val}/<stem>.jpg            7k / 1k frames (semantic segmentation)
    bdd100k/labels/det_20/det_{train,val}.json           Scalabel boxes
    bdd100k/labels/sem_seg/masks/{train,val}/<stem>.png  train ids 0..18 (Cityscapes'), 255 = ignore
    bdd100k/labels/drivable/masks/{train,val}/<stem>.png 0 direct, 1 alternative, 2 background
    bdd100k/annotations/bdd100k_det_{train,val}.json     made by gppf.tools.bdd100k_to_coco:

    python -m gppf.tools.bdd100k_to_coco --labels bdd100k/labels/det_20/det_train.json \\
        --out bdd100k/annotations/bdd100k_det_train.json     (and det_val.json -> ..._val.json)

Tasks (`bdd100k_tasks(root)`; add them to a JobConfig's `tasks`):

- `bdd_det`: detection (Faster R-CNN, `masks: false`), the 10 classes of `CATEGORIES` below;
- `bdd_seg`: segmentation, 19 classes, images from images/10k, labels from labels/sem_seg/masks;
- `bdd_drivable`: segmentation, 3 classes, images from images/100k, labels from labels/drivable/masks.

Label PNGs have their image's stem, so the segmentation plugin's image/label directory keys
express the layout directly. The colormaps/, polygons/ and rles/ label variants are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gppf.tools.bdd100k_to_coco import CATEGORIES

# The 19 Cityscapes train ids BDD100K's sem_seg masks use (255 = unknown / ignore).
SEM_SEG_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
DRIVABLE_CLASSES = ("direct", "alternative", "background")
# What the language-guided adapters prompt with (gppf.models.language): words, not label codes.
DRIVABLE_NAMES = ("directly drivable area", "alternatively drivable area", "background")

# The release's training-set sizes, which epoch counts are stated in (gppf.engine.epochs): the 100k
# images' train split (70,000; 69,863 of them carry detection labels) and the 10k images' (7,000).
TRAIN_IMAGES = {"bdd_det": 69_863, "bdd_seg": 7_000, "bdd_drivable": 70_000}

__all__ = ["CATEGORIES", "DRIVABLE_CLASSES", "SEM_SEG_CLASSES", "TRAIN_IMAGES", "bdd100k_tasks"]


def bdd100k_tasks(
    root: str | Path,
    *,
    det_batch_size: int = 8,
    seg_batch_size: int = 8,
    drivable_batch_size: int = 8,
    det_input_size: int = 1024,
    seg_input_size: int = 512,
    drivable_input_size: int = 512,
    sampling_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict]:
    """Task entries `bdd_det`, `bdd_seg`, `bdd_drivable` for the release layout under
    `root`/bdd100k (see the module docstring). `overrides` maps a task name to keys merged over its
    entry (e.g. `{"bdd_det": {"head": {"anchor_size": 16}}}`); sampling weights are in that order."""
    data_root = str(Path(root) / "bdd100k")
    w_det, w_seg, w_drivable = sampling_weights
    tasks: dict[str, dict] = {
        "bdd_det": {
            "type": "detection",
            "data_root": data_root,
            "sampling_weight": w_det,
            "batch_size": det_batch_size,
            "input_size": det_input_size,
            "masks": False,
            "train_images": "images/100k/train",
            "val_images": "images/100k/val",
            "train_annotations": "annotations/bdd100k_det_train.json",
            "val_annotations": "annotations/bdd100k_det_val.json",
        },
        "bdd_seg": {
            "type": "segmentation",
            "data_root": data_root,
            "num_classes": len(SEM_SEG_CLASSES),
            "class_names": list(SEM_SEG_CLASSES),
            "ignore_index": 255,
            "sampling_weight": w_seg,
            "batch_size": seg_batch_size,
            "input_size": seg_input_size,
            "train_images": "images/10k/train",
            "train_labels": "labels/sem_seg/masks/train",
            "val_images": "images/10k/val",
            "val_labels": "labels/sem_seg/masks/val",
        },
        "bdd_drivable": {
            "type": "segmentation",
            "data_root": data_root,
            "num_classes": len(DRIVABLE_CLASSES),
            "class_names": list(DRIVABLE_NAMES),
            "sampling_weight": w_drivable,
            "batch_size": drivable_batch_size,
            "input_size": drivable_input_size,
            "train_images": "images/100k/train",
            "train_labels": "labels/drivable/masks/train",
            "val_images": "images/100k/val",
            "val_labels": "labels/drivable/masks/val",
        },
    }
    for name, extra in (overrides or {}).items():
        if name not in tasks:
            raise ValueError(f"bdd100k_tasks: overrides name task {name!r}; the tasks are {', '.join(tasks)}")
        tasks[name] = _merge(tasks[name], extra)
    return tasks


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
