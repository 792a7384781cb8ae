"""Reading and validating COCO-format annotation files (COCO, LVIS, Objects365, converted Open Images).

Errors name the file and the record. What is skipped instead of refused is documented here,
counted in `CocoIndex.skipped` and logged once per file:

- an annotation whose box, clipped to its image, has zero width or height (zero-area boxes and
  boxes entirely outside the image): dropped from training and from the evaluation ground truth;
- a crowd annotation (`iscrowd: 1`): not a training target; kept in the evaluation ground truth,
  where COCOeval treats it as "ignore";
- an image without annotations: kept (a negative image for training, counted).

Refused with an error: a missing file or key, an annotation whose image id or category id is not
declared, a file with no annotations at all, an image record without a file name.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CocoFormatError(ValueError):
    """A COCO annotation file that cannot be used; the message names the file and the record."""


@dataclass
class CocoIndex:
    categories: list[dict]  # sorted by id; label i (0-based, background excluded) = categories[i]
    images: list[dict]  # {"image_id", "path", "height", "width", "anns": [[x0, y0, x1, y1, label, seg]]}
    gt: dict  # the cleaned file for COCOeval (iscrowd and area filled in where absent)
    skipped: Counter = field(default_factory=Counter)

    @property
    def label_to_category(self) -> list[int]:
        return [c["id"] for c in self.categories]


def _need(rec: dict, keys: tuple[str, ...], what: str, path: Path) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise CocoFormatError(f"{path}: {what} has no {', '.join(repr(k) for k in missing)} key")


def _file_name(img: dict, key: str) -> str | None:
    value = img.get(key)
    if value is None:
        return None
    # LVIS names images by URL (coco_url, ".../train2017/000000391895.jpg") and its val split mixes
    # COCO's train and val images: the file is "<split dir>/<name>" under the image directory.
    return "/".join(value.rsplit("/", 2)[-2:]) if key.endswith("url") else value


def load_coco(
    ann_file: str | Path, image_dir: str | Path, task: str, image_key: str = "file_name", masks: bool = True
) -> CocoIndex:
    """Parse `ann_file`, validate every record and index annotations by image."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: annotation file {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CocoFormatError(f"{path}: the top level must be an object with images, annotations, categories")
    _need(doc, ("images", "annotations", "categories"), "the top level", path)

    cats = []
    for i, c in enumerate(doc["categories"]):
        _need(c, ("id",), f"categories[{i}]", path)
        cats.append({"id": int(c["id"]), "name": str(c.get("name", c["id"]))})
    cats.sort(key=lambda c: c["id"])
    if not cats:
        raise CocoFormatError(f"{path}: 'categories' is empty")
    label_of = {c["id"]: i for i, c in enumerate(cats)}

    images: dict[int, dict] = {}
    for i, img in enumerate(doc["images"]):
        _need(img, ("id", "height", "width"), f"images[{i}]", path)
        name = _file_name(img, image_key)
        if not name:
            raise CocoFormatError(f"{path}: images[{i}] (id {img['id']}) has no {image_key!r} key")
        images[int(img["id"])] = {
            "image_id": int(img["id"]),
            "path": str(Path(image_dir) / name),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "anns": [],
        }
    if not doc["annotations"]:
        raise CocoFormatError(f"{path}: 'annotations' is empty")

    skipped: Counter = Counter()
    example: dict[str, Any] = {}
    gt_anns = []
    ann_keys = ("image_id", "category_id", "bbox") + (("segmentation",) if masks else ())
    for i, a in enumerate(doc["annotations"]):
        rec = f"annotations[{i}] (id {a.get('id', '?')})"
        _need(a, ann_keys, rec, path)
        img = images.get(int(a["image_id"]))
        if img is None:
            raise CocoFormatError(f"{path}: {rec} refers to image id {a['image_id']}, not in 'images'")
        if int(a["category_id"]) not in label_of:
            raise CocoFormatError(
                f"{path}: {rec} has category id {a['category_id']}, not in 'categories' "
                f"(ids {', '.join(str(c['id']) for c in cats[:10])}{', ...' if len(cats) > 10 else ''})"
            )
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise CocoFormatError(f"{path}: {rec} has bbox {bbox!r}; expected [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            skipped["zero-area box (after clipping to the image)"] += 1
            example.setdefault("zero-area box (after clipping to the image)", a.get("id", i))
            continue
        crowd = int(a.get("iscrowd", 0))
        gt_anns.append({**a, "id": a.get("id", i + 1), "iscrowd": crowd, "area": a.get("area", w * h)})
        if crowd:
            skipped["crowd annotation"] += 1
            continue
        seg = a.get("segmentation") if masks else None
        img["anns"].append([x0, y0, x1, y1, label_of[int(a["category_id"])], seg])

    empty = sum(1 for img in images.values() if not img["anns"])
    if empty:
        skipped["image without annotations (kept as a negative)"] = empty
    if skipped and os.environ.get("GPPF_QUIET_DATA") != "1":
        parts = [
            f"{n} {what}" + (f", e.g. annotation id {example[what]}" if what in example else "")
            for what, n in skipped.items()
        ]
        print(f"[gppf] task {task!r}: {path.name}: " + "; ".join(parts), file=sys.__stdout__, flush=True)
    gt = {
        "images": [
            {"id": v["image_id"], "height": v["height"], "width": v["width"]} for v in images.values()
        ],
        "annotations": gt_anns,
        "categories": cats,
    }
    return CocoIndex(categories=cats, images=list(images.values()), gt=gt, skipped=skipped)
