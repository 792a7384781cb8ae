"""A tiny fake copy of the eight GPPF datasets, each in its real release's directory layout and
annotation format (see jobs/gppf_r50.py's full_config). Images are a few dozen pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from gppf.data.demo import classification_image, detection_image
from gppf.tools.openimages_to_coco import main as openimages_to_coco


def _seg_pair(rng: np.random.Generator, values: np.ndarray) -> tuple[Image.Image, Image.Image]:
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    return img, Image.fromarray(rng.choice(values, size=(40, 48)).astype(np.uint8))


def _coco_split(root: Path, split: str, n: int, rng, first_id: int, masks: bool = True):
    """COCO-style images + records; returns (images, annotations)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        image_id = first_id + i
        img, a = detection_image(rng, image_id, first_id * 100 + len(anns))
        name = f"{image_id:012d}.jpg"
        img.save(root / split / name)
        images.append({"id": image_id, "file_name": name, "height": img.height, "width": img.width})
        if not masks:
            for x in a:
                del x["segmentation"]
        anns.extend(a)
    return images, anns


CATS = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}, {"id": 4, "name": "triangle"}]


def make_paper_layouts(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    # ImageNet-21K: ImageFolder with WordNet ids as class folders.
    for split in ("train", "val"):
        for k, wnid in enumerate(("n00004475", "n00005787", "n00006024", "n00006484")):
            d = root / "imagenet21k" / split / wnid
            d.mkdir(parents=True)
            for i in range(3):
                classification_image(rng, k).save(d / f"{wnid}_{i}.JPEG", format="JPEG")

    # COCO 2017 (instances with polygon masks).
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    splits = {}
    for split, first in (("train2017", 1), ("val2017", 500)):
        imgs, anns = _coco_split(coco, split, 4, rng, first)
        splits[split] = imgs
        doc = {"images": imgs, "annotations": anns, "categories": CATS}
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))

    # LVIS v1: COCO's images named by coco_url; its val mixes COCO train and val images; no iscrowd.
    (root / "lvis").mkdir()
    for split, sources in (("train", ["train2017"]), ("val", ["train2017", "val2017"])):
        images, anns = [], []
        for src in sources:
            doc = json.loads((coco / "annotations" / f"instances_{src}.json").read_text())
            present: dict[int, set] = {}
            for a in doc["annotations"]:
                present.setdefault(a["image_id"], set()).add(a["category_id"])
            for im in doc["images"]:
                url = f"http://images.cocodataset.org/{src}/{im['file_name']}"
                cats = present.get(im["id"], set())
                images.append(
                    {
                        "id": im["id"],
                        "coco_url": url,
                        "height": im["height"],
                        "width": im["width"],
                        # The federated keys: verified absent, and annotated but not exhaustively.
                        "neg_category_ids": [c["id"] for c in CATS if c["id"] not in cats][:1],
                        "not_exhaustive_category_ids": sorted(cats)[:1],
                    }
                )
            anns.extend({k: v for k, v in a.items() if k != "iscrowd"} for a in doc["annotations"])
        lvis_cats = [{**c, "frequency": f} for c, f in zip(CATS, "rcf")]
        lvis = {"images": images, "annotations": anns, "categories": lvis_cats}
        (root / "lvis" / f"lvis_v1_{split}.json").write_text(json.dumps(lvis))

    # Objects365 v2: boxes only, file names with patch sub-directories.
    o365 = root / "objects365"
    (o365 / "annotations").mkdir(parents=True)
    for split, first in (("train", 1000), ("val", 2000)):
        # The archives unpack to <split>/patchN/; the JSON names files "images/v1/patchN/...".
        imgs, anns = _coco_split(o365 / split, "patch0", 3, rng, first, masks=False)
        for im in imgs:
            im["file_name"] = f"images/v1/patch0/{im['file_name']}"
        doc = {"images": imgs, "annotations": anns, "categories": CATS}
        (o365 / "annotations" / f"zhiyuan_objv2_{split}.json").write_text(json.dumps(doc))

    # Open Images: CSV boxes (fractions of the image size) converted by the shipped script.
    oi = root / "openimages"
    (oi / "annotations").mkdir(parents=True)
    labels = ["/m/01", "/m/02", "/m/03"]
    with open(oi / "annotations" / "class-descriptions-boxable.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [["LabelName", "DisplayName"], *[[m, n["name"]] for m, n in zip(labels, CATS)]]
        )
    # The challenge's class hierarchy (Entity > /m/01 > /m/02, Entity > /m/03) and, for the
    # validation split, human-verified image-level labels (its box classes positive, one negative).
    hierarchy = {
        "LabelName": "/m/0bl9f",
        "Subcategory": [
            {"LabelName": "/m/01", "Subcategory": [{"LabelName": "/m/02"}]},
            {"LabelName": "/m/03"},
        ],
    }
    (oi / "annotations" / "challenge-2019-label500-hierarchy.json").write_text(json.dumps(hierarchy))
    for split, out_name, first in (("train", "train", 3000), ("validation", "val", 4000)):
        (oi / split).mkdir()
        rows = []
        for i in range(3):
            img, anns = detection_image(rng, first + i, 1)
            image_id = f"{first + i:016x}"
            img.save(oi / split / f"{image_id}.jpg")
            for a in anns:
                x, y, w, h = a["bbox"]
                label = labels[[c["id"] for c in CATS].index(a["category_id"])]
                rows.append(
                    [
                        image_id,
                        "xclick",
                        label,
                        1,
                        x / img.width,
                        (x + w) / img.width,
                        y / img.height,
                        (y + h) / img.height,
                        0,
                        0,
                        0,
                        0,
                        0,
                    ]
                )
        csv_path = oi / "annotations" / f"{split}-annotations-bbox.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "ImageID",
                    "Source",
                    "LabelName",
                    "Confidence",
                    "XMin",
                    "XMax",
                    "YMin",
                    "YMax",
                    "IsOccluded",
                    "IsTruncated",
                    "IsGroupOf",
                    "IsDepiction",
                    "IsInside",
                ]
            )
            w.writerows(rows)
        verified = []
        if split == "validation":
            labels_csv = oi / "annotations" / "validation-human-imagelabels.csv"
            pos = sorted({(r[0], r[2]) for r in rows})
            neg = [
                (image_id, m)
                for image_id in sorted({r[0] for r in rows})
                for m in labels
                if (image_id, m) not in pos
            ]
            with open(labels_csv, "w", newline="") as f:
                csv.writer(f).writerows(
                    [["ImageID", "Source", "LabelName", "Confidence"]]
                    + [[i, "verification", m, 1] for i, m in pos]
                    + [[i, "verification", m, 0] for i, m in neg[:1]]
                )
            verified = ["--image-labels", str(labels_csv)]
        openimages_to_coco(
            [
                "--boxes",
                str(csv_path),
                "--classes",
                str(oi / "annotations" / "class-descriptions-boxable.csv"),
                "--images",
                str(oi / split),
                "--out",
                str(oi / "annotations" / f"openimages_{out_name}_bbox.json"),
                *verified,
            ]
        )

    # ADE20K: 0 = other, 1..150 = classes.
    ade = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            img, lbl = _seg_pair(rng, np.array([0, 1, 7, 150]))
            img.save(ade / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            lbl.save(ade / "annotations" / split / f"ADE_{split}_{i:08d}.png")

    # COCO-Stuff 164k: 0-based raw ids 0..181 (some unused), 255 = unlabeled.
    stuff = root / "coco_stuff"
    for split in ("train2017", "val2017"):
        (stuff / "images" / split).mkdir(parents=True)
        (stuff / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            img, lbl = _seg_pair(rng, np.array([0, 12, 91, 181, 255]))
            img.save(stuff / "images" / split / f"{i:012d}.jpg")
            lbl.save(stuff / "annotations" / split / f"{i:012d}.png")

    # Pascal VOC 2012 + SBD "aug": image lists under ImageSets.
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    stems = [f"2007_{i:06d}" for i in range(6)]
    for stem in stems:
        img, lbl = _seg_pair(rng, np.array([0, 1, 20, 255]))
        img.save(voc / "JPEGImages" / f"{stem}.jpg")
        lbl.save(voc / "SegmentationClassAug" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(stems[:4]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems[4:]) + "\n")
    return root


def make_transfer_layouts(root: Path, demo_root: Path, seed: int = 0) -> Path:
    """Tiny copies of GPPF App. D.2's transfer datasets in the layouts jobs/finetune.py's targets
    read: uodb/voc (COCO JSON), kitti (BTS's Eigen split files, raw drives, annotated depth, frames
    of KITTI's size), imagenet and downstream (ImageFolder). Images come from the demo data."""
    import shutil

    rng = np.random.default_rng([seed, 23])
    voc = root / "uodb" / "voc"
    (voc / "annotations").mkdir(parents=True)
    shutil.copytree(demo_root / "detection" / "train2017", voc / "images")
    ann = (demo_root / "detection" / "annotations" / "instances_train2017.json").read_text()
    for split in ("train", "val"):
        (voc / "annotations" / f"{split}.json").write_text(ann)
    for name in ("imagenet", "downstream"):
        shutil.copytree(demo_root / "classification", root / name)
    kitti = root / "kitti"
    for split, stems in (("train", ("0000000005", "0000000006")), ("test", ("0000000069", "0000000070"))):
        lines = []
        for stem in stems:
            drive = f"2011_09_26_drive_{'0001' if split == 'train' else '0002'}_sync"
            img_rel = f"2011_09_26/{drive}/image_02/data/{stem}.png"
            gt_rel = f"{drive}/proj_depth/groundtruth/image_02/{stem}.png"
            h, w = (375, 1242) if stem.endswith(("5", "9")) else (370, 1224)  # KITTI's frame sizes
            for path in (kitti / "raw" / img_rel, kitti / "data_depth_annotated" / gt_rel):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(kitti / "raw" / img_rel)
            depth = np.where(rng.random((h, w)) < 0.2, rng.uniform(3.0, 70.0, (h, w)), 0.0)
            depth[: h // 3] = 0.0  # no LiDAR returns in the sky
            Image.fromarray(np.round(depth * 256).astype(np.uint16)).save(
                kitti / "data_depth_annotated" / gt_rel
            )
            lines.append(f"{img_rel} {gt_rel} 721.5377")
        lines.append("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000099.png None 721.5377")
        (kitti / f"eigen_{split}_files_with_gt.txt").write_text("\n".join(lines) + "\n")
    return root
