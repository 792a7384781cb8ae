"""Convert BDD100K detection labels (Scalabel JSON) into a COCO JSON file the detection plugin reads.

    python -m gppf.tools.bdd100k_to_coco \\
        --labels /data/gppf/bdd100k/labels/det_20/det_train.json \\
        --out    /data/gppf/bdd100k/annotations/bdd100k_det_train.json

and the same with det_val.json -> bdd100k_det_val.json (gppf.presets.bdd100k reads both).

The input is the official `labels/det_20/det_{train,val}.json`: a list of frames
`{"name": "<stem>.jpg", "labels": [{"id", "category", "box2d": {"x1", "y1", "x2", "y2"},
"attributes": {"occluded", "truncated", "crowd"}}, ...]}`; a frame without labels (no "labels" key,
or null) becomes an image without annotations (a negative). Categories get ids 1..10 in BDD100K's
official order (`CATEGORIES`); the 2018 release's names person, motor and bike count as pedestrian,
motorcycle and bicycle. Labels of any other category (det_20 has "other vehicle", "other person",
"trailer"; the 2018 files also hold lane and drivable-area polygons) are skipped, counted, reported
at the end and recorded in the output's "info". Boxes are Scalabel's inclusive pixel corners, so
the COCO box is [x1, y1, x2 - x1 + 1, y2 - y1 + 1] (as BDD100K's own to_coco). A label with
`crowd: true` becomes a COCO crowd annotation (ignored by training and by COCOeval's matching).

Every BDD100K image is 1280x720, the default `--image-size`. With `--images DIR` each image's size
is read from its file header instead (Pillow does not decode the pixels); a frame whose image is
missing is then an error naming the frame, unless --skip-missing (then it is counted and reported).
A malformed record (a label without a category or a box2d, a missing or non-numeric coordinate,
x2 < x1 or y2 < y1, a repeated frame name) is an error naming the file, the frame and the label id.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

CATEGORIES = (
    "pedestrian",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "traffic light",
    "traffic sign",
)
LEGACY_NAMES = {"person": "pedestrian", "motor": "motorcycle", "bike": "bicycle"}  # the 2018 release
IMAGE_SIZE = (1280, 720)
PROGRESS_EVERY = 10_000


def parse_size(text: str) -> tuple[int, int]:
    """ "1280x720" -> (1280, 720)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return w, h


def _box(label: dict, where: str) -> tuple[float, float, float, float]:
    box = label.get("box2d")
    if not isinstance(box, dict):
        raise ValueError(f"{where} has no box2d (got {box!r:.80})")
    missing = [k for k in ("x1", "y1", "x2", "y2") if k not in box]
    if missing:
        raise ValueError(f"{where}: box2d has no {', '.join(missing)} (got {box!r:.120})")
    coords = [box[k] for k in ("x1", "y1", "x2", "y2")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
        raise ValueError(f"{where}: box2d coordinates must be numbers: {box!r:.120}")
    x1, y1, x2, y2 = (float(v) for v in coords)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: box2d has x2 < x1 or y2 < y1: {box!r:.120}")
    return x1, y1, x2, y2


def convert(
    labels_json: Path,
    image_dir: Path | None = None,
    image_size: tuple[int, int] = IMAGE_SIZE,
    skip_missing: bool = False,
    progress: bool = True,
) -> dict:
    """The COCO document for `labels_json`; skipped labels and images are in doc["info"]."""
    labels_json = Path(labels_json)
    if not labels_json.is_file():
        raise FileNotFoundError(f"labels file {labels_json} does not exist")
    try:
        frames = json.loads(labels_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{labels_json}: not valid JSON: {e}") from None
    if not isinstance(frames, list):
        raise ValueError(
            f"{labels_json}: the top level must be a list of frames (Scalabel format), "
            f"got {type(frames).__name__}"
        )
    cat_id = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    cat_id.update({old: cat_id[new] for old, new in LEGACY_NAMES.items()})
    images: list[dict] = []
    annotations: list[dict] = []
    seen: set[str] = set()
    skipped: Counter = Counter()
    missing: list[str] = []
    for i, frame in enumerate(frames):
        if progress and i and i % PROGRESS_EVERY == 0:
            print(f"{labels_json.name}: {i}/{len(frames)} frames", file=sys.stderr, flush=True)
        if not isinstance(frame, dict) or not isinstance(frame.get("name"), str) or not frame["name"]:
            raise ValueError(f"{labels_json}: frame {i} has no 'name' (got {frame!r:.120})")
        name = frame["name"]
        if name in seen:
            raise ValueError(f"{labels_json}: frame {name!r} appears twice")
        seen.add(name)
        labels = frame.get("labels") or []
        if not isinstance(labels, list):
            raise ValueError(f"{labels_json}: frame {name!r}: 'labels' must be a list, got {labels!r:.80}")
        if image_dir is not None:
            path = image_dir / name
            if not path.is_file():
                if not skip_missing:
                    raise FileNotFoundError(f"{labels_json}: frame {name!r} has no image file {path}")
                missing.append(name)
                continue
            with Image.open(path) as im:
                w, h = im.size
        else:
            w, h = image_size
        img = {"id": len(images) + 1, "file_name": name, "width": w, "height": h}
        images.append(img)
        for j, label in enumerate(labels):
            lid = label.get("id", j) if isinstance(label, dict) else j
            where = f"{labels_json}: frame {name!r}, label id {lid}"
            if not isinstance(label, dict) or not isinstance(label.get("category"), str):
                raise ValueError(f"{where} has no category (got {label!r:.120})")
            category = label["category"]
            if category not in cat_id:
                skipped[category] += 1
                continue
            x1, y1, x2, y2 = _box(label, where)
            attributes = label.get("attributes") or {}
            w_box, h_box = x2 - x1 + 1, y2 - y1 + 1  # Scalabel's corners are inclusive pixels
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": cat_id[category],
                    "bbox": [x1, y1, w_box, h_box],
                    "area": w_box * h_box,
                    "iscrowd": int(bool(isinstance(attributes, dict) and attributes.get("crowd"))),
                }
            )
    if skipped:
        counts = ", ".join(f"{n} {c!r}" for c, n in skipped.most_common())
        print(f"skipped {sum(skipped.values())} labels of other categories: {counts}", file=sys.stderr)
    if missing:
        print(
            f"skipped {len(missing)} frames whose image is missing from {image_dir}, e.g. {missing[0]}",
            file=sys.stderr,
        )
    return {
        "info": {
            "description": f"BDD100K detection from {labels_json.name} (gppf.tools.bdd100k_to_coco)",
            "skipped_labels": dict(skipped),
            "skipped_images": len(missing),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=Path, required=True, help="labels/det_20/det_{train,val}.json")
    ap.add_argument("--out", type=Path, required=True, help="COCO JSON to write")
    ap.add_argument(
        "--images", type=Path, help="images/100k/{train,val}: read each image's size from its file"
    )
    ap.add_argument(
        "--image-size",
        type=parse_size,
        default=IMAGE_SIZE,
        metavar="WxH",
        help="size of every image when --images is not given (default 1280x720)",
    )
    ap.add_argument(
        "--skip-missing", action="store_true", help="with --images: skip frames whose image is missing"
    )
    args = ap.parse_args(argv)
    if args.skip_missing and args.images is None:
        ap.error("--skip-missing needs --images")
    doc = convert(args.labels, args.images, args.image_size, args.skip_missing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc))
    print(f"wrote {args.out}: {len(doc['images'])} images, {len(doc['annotations'])} boxes")
    return doc


if __name__ == "__main__":
    main()
