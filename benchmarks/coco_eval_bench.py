"""COCO box AP of a synthetic Objects365-like split: faster-coco-eval's C++ COCOeval (the platform's
default scorer) against pycocotools' (the reference), same numbers, wall time of each.

    python benchmarks/coco_eval_bench.py [--images 5000] [--categories 365] [--per-image 8]

Ground truth: `--per-image` boxes per image over `--categories` categories. Detections: a jittered
copy of every box (15 % with a wrong class) plus as many false positives, random scores.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np

from task_plugins.detection.coco_eval import coco_ap


def synthetic(images: int, categories: int, per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    gt = {
        "images": [{"id": i, "width": 640, "height": 480} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, categories + 1)],
        "annotations": [],
    }
    dets = []
    for i in range(1, images + 1):
        for _ in range(per_image):
            w, h = rng.uniform(10, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(1, categories + 1))
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            jx, jy, jw, jh = rng.normal(0, 0.1, 4) * [w, h, w, h]
            wrong = rng.random() < 0.15
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, categories + 1)) if wrong else cat,
                    "bbox": [max(0.0, x + jx), max(0.0, y + jy), max(1.0, w + jw), max(1.0, h + jh)],
                    "score": float(rng.random()),
                }
            )
            fw, fh = rng.uniform(10, 200, 2)
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, categories + 1)),
                    "bbox": [float(rng.uniform(0, 640 - fw)), float(rng.uniform(0, 480 - fh)), fw, fh],
                    "score": float(rng.random()),
                }
            )
    return gt, dets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--categories", type=int, default=365)
    ap.add_argument("--per-image", type=int, default=8)
    args = ap.parse_args()
    gt, dets = synthetic(args.images, args.categories, args.per_image)
    boxes = len(gt["annotations"])
    print(f"{args.images} images, {args.categories} categories, {boxes} boxes, {len(dets)} detections")
    seconds, scores = {}, {}
    for scorer in ("faster_coco_eval", "pycocotools"):
        t0 = time.perf_counter()
        scores[scorer] = coco_ap(copy.deepcopy(gt), copy.deepcopy(dets), ("bbox",), scorer=scorer)
        seconds[scorer] = time.perf_counter() - t0
        print(f"  {scorer:17s} {seconds[scorer]:7.1f} s  {scores[scorer]}", flush=True)
    fast, ref = scores["faster_coco_eval"], scores["pycocotools"]
    diff = max(abs(fast[k] - ref[k]) for k in ref)
    speedup = seconds["pycocotools"] / seconds["faster_coco_eval"]
    print(f"speed-up {speedup:.1f}x, largest AP difference {diff:.2e}")


if __name__ == "__main__":
    main()
