"""Convert Open Images box annotations (CSV) into a COCO JSON file the detection plugin reads.

    python -m gppf.tools.openimages_to_coco \\
        --boxes   /data/openimages/annotations/oidv6-train-annotations-bbox.csv \\
        --classes /data/openimages/annotations/oidv7-class-descriptions-boxable.csv \\
        --images  /data/openimages/train \\
        --out     /data/openimages/annotations/openimages_train_bbox.json

For the challenge's AP50 (`evaluation: oid_challenge`, task_plugins.detection.oid_eval), convert the
validation split with the challenge's files and its human-verified image-level labels:

    python -m gppf.tools.openimages_to_coco \
        --boxes   challenge-2019-validation-detection-bbox.csv \
        --classes challenge-2019-classes-description-500.csv \
        --image-labels challenge-2019-validation-detection-human-imagelabels.csv \
        --images  /data/openimages/validation --out .../openimages_val_bbox.json

Open Images gives boxes as fractions of the image size (XMin, XMax, YMin, YMax), so each image's
size is read from its file header (Pillow does not decode the pixels). `IsGroupOf` boxes become
COCO crowd annotations (ignored by training and by COCOeval's matching, as in COCO; the
challenge's group-of boxes). Categories get ids 1..N in the order of the class-descriptions file
and keep their Open Images MID as `label_name`. With --image-labels, each image gets
`pos_category_ids` / `neg_category_ids`: its verified labels of confidence 1 / 0 (the only
image-level labels the challenge counts); images with labels but no box are kept. Boxes of a
class the class file does not list are an error naming the line, unless --skip-unlisted (the
601 boxable classes' boxes against the challenge's 500). Images listed in the CSV but missing on
disk are an error naming the image id, unless --skip-missing (then they are counted and reported).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from PIL import Image


def read_classes(path: Path) -> list[tuple[str, str]]:
    """(LabelName, DisplayName) rows; V7 files have a header row, V6 files do not."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0] == "LabelName":
        rows = rows[1:]
    return [(r[0], r[1]) for r in rows]


def convert(
    boxes_csv: Path,
    classes_csv: Path,
    image_dir: Path,
    skip_missing: bool = False,
    image_labels_csv: Path | None = None,
    skip_unlisted: bool = False,
) -> dict:
    classes = read_classes(classes_csv)
    cat_id = {label: i + 1 for i, (label, _) in enumerate(classes)}
    images: dict[str, dict] = {}
    annotations = []
    missing: list[str] = []
    unlisted = 0

    def image(image_id: str, where: str) -> dict:
        """The image record (its size from the file header); {} for a missing, skipped one."""
        if image_id not in images:
            path = image_dir / f"{image_id}.jpg"
            if not path.is_file():
                if not skip_missing:
                    raise FileNotFoundError(f"{where}: image {image_id} has no file {path}")
                missing.append(image_id)
                images[image_id] = {}
                return {}
            with Image.open(path) as im:
                w, h = im.size
            images[image_id] = {"id": len(images) + 1, "file_name": path.name, "width": w, "height": h}
        return images[image_id]

    with open(boxes_csv, newline="") as f:
        reader = csv.DictReader(f)
        need = {"ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"{boxes_csv}: expected columns {sorted(need)}, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["LabelName"] not in cat_id:
                if skip_unlisted:
                    unlisted += 1
                    continue
                raise ValueError(f"{boxes_csv}:{line}: label {row['LabelName']} is not in {classes_csv}")
            img = image(row["ImageID"], f"{boxes_csv}:{line}")
            if not img:
                continue
            try:
                x0, x1 = float(row["XMin"]) * img["width"], float(row["XMax"]) * img["width"]
                y0, y1 = float(row["YMin"]) * img["height"], float(row["YMax"]) * img["height"]
            except (TypeError, ValueError):
                coords = {k: row[k] for k in ("XMin", "XMax", "YMin", "YMax")}
                raise ValueError(f"{boxes_csv}:{line}: box coordinates must be numbers: {coords}") from None
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": cat_id[row["LabelName"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(row.get("IsGroupOf", "0") == "1"),
                }
            )
    if image_labels_csv is not None:
        _add_image_labels(image_labels_csv, cat_id, image)
    if missing:
        print(f"skipped {len(missing)} images missing from {image_dir}, e.g. {missing[0]}", file=sys.stderr)
    if unlisted:
        print(f"skipped {unlisted} boxes of classes not in {classes_csv}", file=sys.stderr)
    return {
        "images": [v for v in images.values() if v],
        "annotations": annotations,
        "categories": [{"id": cat_id[label], "name": name, "label_name": label} for label, name in classes],
    }


def _add_image_labels(path: Path, cat_id: dict[str, int], image) -> None:
    """Verified image-level labels (ImageID, LabelName, Confidence 1 or 0) into each image's
    pos_category_ids / neg_category_ids; labels of unlisted classes are left out."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"ImageID", "LabelName", "Confidence"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["LabelName"] not in cat_id:
                continue
            try:
                confidence = float(row["Confidence"])
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: Confidence must be 0 or 1, got {row['Confidence']!r}"
                ) from None
            if confidence not in (0.0, 1.0):
                raise ValueError(f"{path}:{line}: Confidence must be 0 or 1, got {row['Confidence']!r}")
            img = image(row["ImageID"], f"{path}:{line}")
            if img:
                key = "pos_category_ids" if confidence == 1.0 else "neg_category_ids"
                ids = img.setdefault(key, [])
                if cat_id[row["LabelName"]] not in ids:
                    ids.append(cat_id[row["LabelName"]])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=Path, required=True, help="*-annotations-bbox.csv")
    ap.add_argument("--classes", type=Path, required=True, help="class-descriptions-boxable.csv")
    ap.add_argument("--images", type=Path, required=True, help="directory of <ImageID>.jpg")
    ap.add_argument("--out", type=Path, required=True, help="COCO JSON to write")
    ap.add_argument("--skip-missing", action="store_true", help="skip images missing on disk")
    ap.add_argument("--image-labels", type=Path, help="human-verified image-level labels CSV (challenge AP)")
    ap.add_argument("--skip-unlisted", action="store_true", help="skip boxes of classes --classes lacks")
    args = ap.parse_args(argv)
    doc = convert(
        args.boxes, args.classes, args.images, args.skip_missing, args.image_labels, args.skip_unlisted
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc))
    print(f"wrote {args.out}: {len(doc['images'])} images, {len(doc['annotations'])} boxes")


if __name__ == "__main__":
    main()
