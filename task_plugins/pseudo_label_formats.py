"""Pseudo-labels in the tasks' own label formats: which predictions survive, and how they are written.

Thresholds follow the self-training baseline of LV-Adapter §3.2 (after Ghiasi et al.) and VTD
App. H.2: a segmentation pixel keeps the teacher's class where its largest softmax probability is
at least 0.3 and is `ignore_index` elsewhere; a detection keeps the boxes scoring at least 0.5.
The functions here are pure (arrays and dicts in and out) apart from the two writers at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def confident_labels(probs: np.ndarray, threshold: float, ignore_index: int) -> np.ndarray:
    """[C, H, W] class probabilities -> [H, W] int64 class ids: the arg-max where its probability
    is >= threshold, `ignore_index` elsewhere."""
    if probs.ndim != 3:
        raise ValueError(f"probabilities must be [classes, height, width], got shape {probs.shape}")
    ids = probs.argmax(0).astype(np.int64)
    ids[probs.max(0) < threshold] = ignore_index
    return ids


def raw_label_ids(ids: np.ndarray, label_map: dict[int, int], ignore_index: int) -> np.ndarray:
    """Class ids as the label files store them: a task with a `label_map` (raw id -> class) reads
    raw ids, so each class is written as the smallest raw id mapping to it. Ignored pixels stay
    `ignore_index`, which every map keeps as ignore."""
    if not label_map:
        return ids
    inverse: dict[int, int] = {}
    for raw, cls in sorted((int(k), int(v)) for k, v in label_map.items()):
        inverse.setdefault(cls, raw)
    present = [int(c) for c in np.unique(ids) if c != ignore_index]
    unmapped = [c for c in present if c not in inverse]
    if unmapped:
        raise ValueError(f"class {unmapped[0]} has no raw id in the task's label_map")
    out = np.full_like(ids, ignore_index)
    for cls in present:
        out[ids == cls] = inverse[cls]
    return out


def label_image(ids: np.ndarray) -> Image.Image:
    """A single-channel label image: 8-bit when every id fits, 16-bit otherwise."""
    if ids.min() < 0 or ids.max() > 65535:
        raise ValueError(f"label ids must be in [0, 65535], got {ids.min()}..{ids.max()}")
    return Image.fromarray(ids.astype(np.uint8 if ids.max() <= 255 else np.uint16))


def confident_annotations(results: list[dict[str, Any]], score_threshold: float) -> list[dict[str, Any]]:
    """COCO results of one image (gppf's `detections_to_coco`: bbox [x, y, w, h] in original pixels,
    score, optionally an RLE segmentation) -> the annotations of those scoring >= score_threshold,
    with area (the mask's where there is one) and iscrowd 0. Ids are given by `coco_document`."""
    out = []
    for r in results:
        if r["score"] < score_threshold:
            continue
        ann = {
            "image_id": int(r["image_id"]),
            "category_id": int(r["category_id"]),
            "bbox": [float(v) for v in r["bbox"]],
            "score": float(r["score"]),
            "iscrowd": 0,
        }
        if "segmentation" in r:
            seg = r["segmentation"]
            ann["segmentation"] = seg
            ann["area"] = float(mask_utils.area({"size": seg["size"], "counts": seg["counts"].encode()}))
        else:
            ann["area"] = ann["bbox"][2] * ann["bbox"][3]
        out.append(ann)
    return out


def coco_document(
    images: list[dict[str, Any]], annotations: list[dict[str, Any]], categories: list[dict[str, Any]]
) -> dict[str, Any]:
    """A COCO annotation file: annotation ids 1..N in the given order."""
    return {
        "images": images,
        "annotations": [{**a, "id": i + 1} for i, a in enumerate(annotations)],
        "categories": categories,
    }


def link_image(src: str | Path, dst: Path) -> None:
    """Put the image at `dst`: a hard link where the filesystem allows one, a copy otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
