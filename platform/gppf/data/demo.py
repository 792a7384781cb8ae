"""Deterministic, small, learnable demo data written in the formats real datasets use.

- `classification/` : ImageFolder (train/<class>/*.png, val/<class>/*.png), images of varying size
- `classification_parquet/` : the same kind of data as Parquet shards (image bytes + label)
- `segmentation/` : {train,val}/images/*.jpg + {train,val}/labels/*.png, ignore index 255
- `detection/` : COCO layout (train2017/, val2017/, annotations/instances_{train,val}2017.json) with
  boxes and polygon masks of discs, squares and triangles (category ids 1, 2, 4: not contiguous)
- `depth/` : KITTI-style {train,val}/images/*.jpg + {train,val}/depth/*.png (uint16, metres x 256,
  0 = no measurement): a ground plane and boxes standing on it, ~60 % of pixels dropped like LiDAR
- `multihead/` : partially labelled segmentation + depth on the same images (NYUD-style),
  {train,val}/images/*.jpg + {train,val}/seg/*.png (class ids) + {train,val}/depth/*.png (uint16);
  ~40 % of images lack the seg label and ~30 % the depth map, none lacks both

Each class is a coloured shape on a noisy background, so a small network measurably improves on
it within a few hundred steps, but not trivially at step 0.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gppf.io import storage
from gppf.io.storage import UriPath

SHAPES = ("disc", "square", "triangle", "bar")
SEG_CLASSES = ("background", "disc", "square", "triangle")
# Each class has its own colour (jittered) as well as its shape: a network trained from scratch
# picks up colour within a few hundred steps and shape later, so progress is measurable early.
PALETTE = ((220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 30))
VERSION = 5
DET_CATEGORIES = ((1, "disc"), (2, "square"), (4, "triangle"))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # a horizontal bar
        h = max(2, (y1 - y0) // 4)
        cy = (y0 + y1) // 2
        draw.rectangle((x0, cy - h, x1, cy + h), fill=fill)


def shape_polygon(shape: str, box: tuple[int, int, int, int]) -> list[float]:
    """The outline drawn for `shape` in `box`, as a flat COCO polygon [x0, y0, x1, y1, ...]."""
    x0, y0, x1, y1 = box
    if shape == "disc":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)
    else:
        pts = np.array([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], dtype=float)
    return [round(float(v), 2) for v in pts.flatten()]


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    base = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 25, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def classification_image(rng: np.random.Generator, label: int) -> Image.Image:
    h, w = (int(v) for v in rng.integers(48, 80, size=2))
    img = _background(rng, h, w)
    s = int(rng.integers(min(h, w) // 3, int(min(h, w) * 0.8)))
    x0 = int(rng.integers(0, w - s + 1))
    y0 = int(rng.integers(0, h - s + 1))
    colour = tuple(int(c) for c in np.clip(np.array(PALETTE[label]) + rng.integers(-40, 41, size=3), 0, 255))
    _draw(ImageDraw.Draw(img), SHAPES[label], (x0, y0, x0 + s - 1, y0 + s - 1), colour)
    return img


def segmentation_pair(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    h, w = (int(v) for v in rng.integers(56, 88, size=2))
    img = _background(rng, h, w)
    label = Image.new("L", (w, h), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(label)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(SEG_CLASSES)))
        s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        x0 = int(rng.integers(0, w - s + 1))
        y0 = int(rng.integers(0, h - s + 1))
        box = (x0, y0, x0 + s - 1, y0 + s - 1)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        _draw(di, SEG_CLASSES[cls], box, colour)
        _draw(dl, SEG_CLASSES[cls], box, cls)
    # Mark a thin frame as "ignore", the way real datasets mark void borders.
    arr = np.array(label)
    arr[:1, :] = 255
    arr[-1:, :] = 255
    return img, Image.fromarray(arr)


def detection_image(rng: np.random.Generator, image_id: int, ann_id: int) -> tuple[Image.Image, list[dict]]:
    """2-4 non-overlapping coloured shapes; annotations carry polygon, box and area."""
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in rng.integers(96, 144, size=2))
    img = _background(rng, h, w)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    anns = []
    for _ in range(int(rng.integers(2, 5))):
        for _try in range(20):
            s = int(rng.integers(18, 52))
            x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            box = (x0, y0, x0 + s, y0 + s)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        k = int(rng.integers(0, len(DET_CATEGORIES)))
        cat_id, shape = DET_CATEGORIES[k]
        colour = np.clip(np.array(PALETTE[k]) + rng.integers(-40, 41, size=3), 0, 255)
        poly = shape_polygon(shape, box)
        draw.polygon(list(zip(poly[::2], poly[1::2])), fill=tuple(int(c) for c in colour))
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "id": ann_id + len(anns),
                "image_id": image_id,
                "category_id": cat_id,
                "segmentation": [poly],
                "area": float(mask_utils.area(rle)),
                "bbox": [x, y, bw, bh],
                "iscrowd": 0,
            }
        )
    return img, anns


def write_detection(root: Path, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 4])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            image_id = 1000 + i  # not 0-based: ids are keys, not positions
            img, a = detection_image(rng, image_id, ann_id)
            ann_id += len(a)
            name = f"{image_id:012d}.jpg"
            img.save(root / split / name, quality=95)
            images.append({"id": image_id, "file_name": name, "height": img.height, "width": img.width})
            anns.extend(a)
        cats = [{"id": c, "name": n, "supercategory": "shape"} for c, n in DET_CATEGORIES]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def write_classification(root: Path, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 1])
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = i % len(SHAPES)
            d = root / split / SHAPES[label]
            d.mkdir(parents=True, exist_ok=True)
            classification_image(rng, label).save(d / f"{i:05d}.png")


def write_classification_parquet(root: Path, n_train: int, n_val: int, seed: int, shards: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, 2])
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            label = i % len(SHAPES)
            buf = io.BytesIO()
            classification_image(rng, label).save(buf, format="PNG")
            rows.append((f"{split}/{i:05d}", buf.getvalue(), label))
        per = max(1, -(-n // shards))
        for s in range(0, n, per):
            chunk = rows[s : s + per]
            table = pa.table(
                {
                    "key": [r[0] for r in chunk],
                    "image": pa.array([r[1] for r in chunk], type=pa.binary()),
                    "label": pa.array([r[2] for r in chunk], type=pa.int64()),
                }
            )
            pq.write_table(table, root / split / f"part-{s // per:03d}.parquet")


def write_segmentation(root: Path, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 3])
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = segmentation_pair(rng)
            img.save(root / split / "images" / f"{i:05d}.jpg", quality=95)
            label.save(root / split / "labels" / f"{i:05d}.png")


def depth_pair(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A road scene seen by a pinhole camera: sky (no depth), a ground plane whose depth grows
    towards the horizon as 1 / (row - horizon), and 1-3 boxes standing on it, each at one depth, as
    tall as that depth makes them. Colours fade into haze with distance (aerial perspective), so
    depth is learnable from local colour as well as from geometry. Returns (image, depth in metres
    as float32 with 0 where there is no measurement)."""
    h, w = int(rng.integers(48, 65)), int(rng.integers(96, 129))
    horizon = float(rng.uniform(0.3, 0.45)) * h
    cam = 2.0 * (h - 1 - horizon)  # focal length x camera height: 2 m at the bottom row
    rows = np.arange(h, dtype=np.float32)[:, None]
    depth = np.where(rows > horizon + 0.5, cam / np.maximum(rows - horizon, 1e-3), 0.0)
    depth = np.clip(depth, 0.0, 79.0) * np.ones((1, w), dtype=np.float32)
    ground = np.array([90, 110, 70], np.float32) + rng.integers(-20, 21, size=3)
    colour = np.broadcast_to(ground, (h, w, 3)).copy()
    for _ in range(int(rng.integers(1, 4))):  # far to near, so nearer boxes cover farther ones
        z = float(rng.uniform(4.0, 40.0))
        bottom = horizon + cam / z
        height = cam / z * float(rng.uniform(0.8, 1.6))  # 1.3-2.6 m tall for a 1.6 m camera
        width = height * float(rng.uniform(0.6, 1.8))
        x0 = float(rng.uniform(-width / 2, w - width / 2))
        y0, y1 = int(max(0, bottom - height)), int(min(h, bottom))
        c0, c1 = int(max(0, x0)), int(min(w, x0 + width))
        if y1 <= y0 or c1 <= c0:
            continue
        depth[y0:y1, c0:c1] = z
        colour[y0:y1, c0:c1] = PALETTE[int(rng.integers(0, len(PALETTE)))]
    haze = np.exp(-depth / 25.0)[..., None]
    sky = np.array([150, 180, 230], np.float32)
    img = np.where(depth[..., None] > 0, colour * haze + sky * (1 - haze), sky)
    img = np.clip(img + rng.normal(0, 8, size=img.shape), 0, 255).astype(np.uint8)
    depth[rng.random((h, w)) < 0.6] = 0.0  # sparse, like projected LiDAR
    return Image.fromarray(img), depth


def write_depth(root: Path, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 5])
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, depth = depth_pair(rng)
            img.save(root / split / "images" / f"{i:05d}.jpg", quality=95)
            png = Image.fromarray(np.round(depth * 256.0).astype(np.uint16))  # KITTI: metres x 256
            png.save(root / split / "depth" / f"{i:05d}.png")


def multihead_depth(label: np.ndarray) -> np.ndarray:
    """A dense depth map (metres) for a segmentation demo label: the background recedes from 4 m
    at the bottom row to 20 m at the top, each shape class stands at its own depth, void is 0."""
    h = label.shape[0]
    rows = np.linspace(20.0, 4.0, h, dtype=np.float32)[:, None]
    depth = np.broadcast_to(rows, label.shape).copy()
    for cls, z in ((1, 3.0), (2, 6.0), (3, 9.0)):
        depth[label == cls] = z
    depth[label == 255] = 0.0
    return depth


def write_multihead(root: Path, n_train: int, n_val: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 6])
    for split, n in (("train", n_train), ("val", n_val)):
        for d in ("images", "seg", "depth"):
            (root / split / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = segmentation_pair(rng)
            img.save(root / split / "images" / f"{i:05d}.jpg", quality=95)
            missing = rng.random()  # < 0.4: no seg label, 0.4-0.7: no depth map, else both
            if missing >= 0.4:
                label.save(root / split / "seg" / f"{i:05d}.png")
            if not 0.4 <= missing < 0.7:
                depth = multihead_depth(np.asarray(label))
                png = Image.fromarray(np.round(depth * 256.0).astype(np.uint16))
                png.save(root / split / "depth" / f"{i:05d}.png")


def generate(root: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> Path | UriPath:
    """Write all demo datasets under `root` (skipped when an identical set is already there). A
    URI root (object storage, gppf.io.storage) gets them generated locally and uploaded."""
    meta = {"version": VERSION, "n_train": n_train, "n_val": n_val, "seed": seed}
    if storage.is_uri(root):
        target = storage.path(root)
        stamp = target / "demo.json"
        if stamp.exists() and json.loads(stamp.read_text()) == meta:
            return target
        with tempfile.TemporaryDirectory() as d:
            generate(d, n_train, n_val, seed)
            print(f"[gppf] uploading the demo data to {storage.display(target)}", flush=True)
            (Path(d) / "demo.json").unlink()  # written last: a partial upload is not taken as done
            storage.copy_tree(d, target)
        stamp.write_text(json.dumps(meta))
        return target
    root = Path(root)
    stamp = root / "demo.json"
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return root
    print(f"[gppf] writing demo data to {root} ({n_train} train / {n_val} val images per task)", flush=True)
    write_classification(root / "classification", n_train, n_val, seed)
    write_classification_parquet(root / "classification_parquet", n_train, n_val, seed)
    write_segmentation(root / "segmentation", n_train, n_val, seed)
    write_detection(root / "detection", n_train, n_val, seed)
    write_depth(root / "depth", n_train, n_val, seed)
    write_multihead(root / "multihead", n_train, n_val, seed)
    stamp.write_text(json.dumps(meta))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="output directory")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    generate(args.root, args.train, args.val, args.seed)


if __name__ == "__main__":
    main()
