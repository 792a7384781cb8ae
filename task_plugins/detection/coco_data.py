"""Reading and validating COCO-format annotation files (COCO, LVIS, Objects365, converted Open Images).

Errors name the file and the record. What is skipped instead of refused is documented here,
counted in `CocoIndex.skipped` and logged once per file:

- an annotation whose box, clipped to its image, has zero width or height (zero-area boxes and
  boxes entirely outside the image): dropped from training and from the evaluation ground truth;
- a crowd annotation (`iscrowd: 1`): not a training target; kept in the evaluation ground truth,
  where COCOeval treats it as "ignore";
- an image without annotations: kept (a negative image for training, counted);
- a polygon with fewer than 3 points or an odd number of coordinates: dropped from its
  annotation; an annotation left with no polygon is skipped (as detectron2 does).

Refused with an error: a missing file or key, an annotation whose image id or category id is not
declared, a file with no annotations at all, an image record without a file name, a duplicate
image id, a value of the wrong type (a box coordinate that is not a number, ...), a segmentation
that is neither polygons nor RLE, an RLE whose size is not its image's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gppf.io import storage


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


_LVIS_IMAGE_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")
_OID_IMAGE_KEYS = ("pos_category_ids", "neg_category_ids")  # verified image-level labels (optional)


def _need(rec: dict, keys: tuple[str, ...], what: str, path: Path) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise CocoFormatError(f"{path}: {what} has no {', '.join(repr(k) for k in missing)} key")


@contextlib.contextmanager
def _record(path: Path, what: str) -> Iterator[None]:
    """A value of the wrong type in a record (a string box, a null height) becomes an error that
    names the file and the record instead of a bare TypeError from deep inside the parse."""
    try:
        yield
    except CocoFormatError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise CocoFormatError(f"{path}: {what}: {type(e).__name__}: {e}") from None


def _clean_segmentation(seg: Any, img: dict, where: str) -> Any:
    """Polygons without the unusable ones (None if none is left), or an RLE checked against its
    image's size. Raises CocoFormatError (with `where`) for anything else."""
    if isinstance(seg, list):
        if not all(isinstance(poly, list) for poly in seg):
            raise CocoFormatError(f"{where}: segmentation must be a list of polygons or an RLE dict")
        polys = [[float(v) for v in poly] for poly in seg if len(poly) >= 6 and len(poly) % 2 == 0]
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [img["height"], img["width"]]:
            raise CocoFormatError(
                f"{where}: RLE size {seg['size']} is not its image's [height, width] "
                f"[{img['height']}, {img['width']}]"
            )
        return seg
    raise CocoFormatError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {seg!r:.80}")


def _file_name(img: dict, key: str, components: int) -> str | None:
    value = img.get(key)
    if value is None:
        return None
    # LVIS names images by URL (coco_url, ".../train2017/000000391895.jpg") and its val split mixes
    # COCO's train and val images: the file is "<split dir>/<name>" under the image directory.
    # Objects365's file names ("images/v1/patch8/x.jpg") carry a prefix its archives do not have.
    components = components or (2 if key.endswith("url") else 0)
    return "/".join(value.split("/")[-components:]) if components else value


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    task: str,
    image_key: str = "file_name",
    masks: bool = True,
    keep_gt: bool = True,
    path_components: int = 0,
    lvis: bool = False,
    oid: bool = False,
) -> CocoIndex:
    """Parse `ann_file`, validate every record and index annotations by image.

    `keep_gt=False` (a training split) leaves `CocoIndex.gt` without annotations: only evaluation
    needs that second copy, which for Objects365 is millions of records. `path_components` > 0
    keeps only the last that many components of each image's file name (or URL; 2 for URLs).
    `lvis`: the file must carry LVIS's federated keys (an image's negative and not-exhaustive
    category ids, a category's frequency), which the ground truth keeps for LVIS's AP. `oid`: each
    category must carry its Open Images `label_name`, and an image's verified image-level labels
    (`pos_category_ids`, `neg_category_ids`) are kept, for the challenge's AP
    (task_plugins.detection.oid_eval)."""
    path = storage.path(ann_file)
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
        with _record(path, f"categories[{i}]"):
            extra = (("frequency",) if lvis else ()) + (("label_name",) if oid else ())
            _need(c, ("id", *extra), f"categories[{i}]", path)
            cat = {"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
            if oid:
                cat["label_name"] = str(c["label_name"])
            if lvis:
                if c["frequency"] not in ("r", "c", "f"):
                    raise CocoFormatError(
                        f"{path}: categories[{i}] has frequency {c['frequency']!r}; LVIS's are 'r', 'c', 'f'"
                    )
                cat["frequency"] = c["frequency"]
            cats.append(cat)
    cats.sort(key=lambda c: c["id"])
    if not cats:
        raise CocoFormatError(f"{path}: 'categories' is empty")
    label_of = {c["id"]: i for i, c in enumerate(cats)}

    images: dict[int, dict] = {}
    for i, img in enumerate(doc["images"]):
        with _record(path, f"images[{i}]"):
            _need(img, ("id", "height", "width") + (_LVIS_IMAGE_KEYS if lvis else ()), f"images[{i}]", path)
            name = _file_name(img, image_key, path_components)
            if not name:
                raise CocoFormatError(f"{path}: images[{i}] (id {img['id']}) has no {image_key!r} key")
            if int(img["id"]) in images:
                raise CocoFormatError(f"{path}: images[{i}] repeats image id {img['id']}")
            images[int(img["id"])] = {
                "image_id": int(img["id"]),
                "path": str(storage.path(image_dir) / name),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "anns": [],
            }
            if lvis:
                images[int(img["id"])]["gt_keys"] = {k: [int(c) for c in img[k]] for k in _LVIS_IMAGE_KEYS}
            if oid:
                images[int(img["id"])]["gt_keys"] = {
                    k: [int(c) for c in img.get(k, [])] for k in _OID_IMAGE_KEYS
                }
    if not doc["annotations"]:
        raise CocoFormatError(f"{path}: 'annotations' is empty")

    skipped: Counter = Counter()
    example: dict[str, Any] = {}
    gt_anns = []
    ann_keys = ("image_id", "category_id", "bbox") + (("segmentation",) if masks else ())
    for i, a in enumerate(doc["annotations"]):
        rec = f"annotations[{i}] (id {a.get('id', '?') if isinstance(a, dict) else '?'})"
        with _record(path, rec):
            gt_out = gt_anns if keep_gt else None
            skip = _annotation(a, i, rec, path, images, label_of, masks, ann_keys, gt_out)
        if skip:
            skipped[skip] += 1
            example.setdefault(skip, a.get("id", i))

    empty = sum(1 for img in images.values() if not img["anns"])
    if empty:
        skipped["image without annotations (kept as a negative)"] = empty
    if skipped and os.environ.get("GPPF_QUIET_DATA") != "1":
        parts = [
            f"{n} {what}" + (f", e.g. annotation id {example[what]}" if what in example else "")
            for what, n in skipped.items()
        ]
        print(f"[gppf] task {task!r}: {path.name}: " + "; ".join(parts), file=sys.__stdout__, flush=True)
    gt = {  # for COCOeval
        "images": [
            {"id": v["image_id"], "height": v["height"], "width": v["width"], **v.pop("gt_keys", {})}
            for v in images.values()
        ],
        "annotations": gt_anns,
        "categories": cats,
    }
    return CocoIndex(categories=cats, images=list(images.values()), gt=gt, skipped=skipped)


def _annotation(
    a: Any,
    i: int,
    rec: str,
    path: Path,
    images: dict[int, dict],
    label_of: dict[int, int],
    masks: bool,
    keys: tuple[str, ...],
    gt_anns: list[dict] | None,
) -> str | None:
    """Validate annotation `a` and add it to its image (and to `gt_anns`); returns why it was
    skipped, or None."""
    if not isinstance(a, dict):
        raise CocoFormatError(f"{path}: {rec} is not an object")
    _need(a, keys, rec, path)
    img = images.get(int(a["image_id"]))
    if img is None:
        raise CocoFormatError(f"{path}: {rec} refers to image id {a['image_id']}, not in 'images'")
    if int(a["category_id"]) not in label_of:
        cats = list(label_of)
        raise CocoFormatError(
            f"{path}: {rec} has category id {a['category_id']}, not in 'categories' "
            f"(ids {', '.join(str(c) for c in cats[:10])}{', ...' if len(cats) > 10 else ''})"
        )
    bbox = a["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise CocoFormatError(f"{path}: {rec} has bbox {bbox!r}; expected [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return "zero-area box (after clipping to the image)"
    crowd = int(a.get("iscrowd", 0))
    seg = a.get("segmentation") if masks else None
    if masks and not crowd:  # crowd regions are only "ignore" areas for COCOeval
        seg = _clean_segmentation(seg, img, f"{path}: {rec}")
        if seg is None:
            return "annotation without a valid polygon"
    if gt_anns is not None:
        clean = {"segmentation": seg} if masks and not crowd else {}
        area = a.get("area", w * h)
        gt_anns.append({**a, **clean, "id": a.get("id", i + 1), "iscrowd": crowd, "area": area})
    if crowd:
        return "crowd annotation"
    img["anns"].append([x0, y0, x1, y1, label_of[int(a["category_id"])], seg])
    return None
