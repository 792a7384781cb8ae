"""The platform's COCO AP equals pycocotools' COCOeval run directly on the annotation file."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gppf.dist.local_dist import run_distributed
from task_plugins.detection.coco_data import load_coco
from task_plugins.detection.coco_eval import CocoEvaluator, coco_ap, detections_to_coco


def _predictions(ann_file: Path, seed: int = 0) -> list[dict]:
    """Noisy copies of the ground truth (jittered boxes, eroded/shifted masks, random scores,
    some wrong classes) plus false positives: AP lands well inside (0, 100)."""
    rng = np.random.default_rng(seed)
    doc = json.loads(ann_file.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    cats = [c["id"] for c in doc["categories"]]
    out = []
    for a in doc["annotations"]:
        h, w = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
        # Inside the image, as a detector's boxes are (torchvision clips them).
        x0, y0 = max(0.0, x + jitter[0]), max(0.0, y + jitter[1])
        x1, y1 = min(w, x0 + max(1.0, bw + jitter[2])), min(h, y0 + max(1.0, bh + jitter[3]))
        box = [x0, y0, x1 - x0, y1 - y0]
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
        m = np.roll(m, int(rng.integers(-3, 4)), axis=1)
        rle = mask_utils.encode(np.asfortranarray(m))
        cat = a["category_id"] if rng.random() > 0.15 else int(rng.choice(cats))
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": cat,
                "bbox": box,
                "score": float(rng.random()),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
        if rng.random() < 0.3:  # a false positive somewhere else in the image
            fx, fy = float(rng.uniform(0, w - 10)), float(rng.uniform(0, h - 10))
            fm = np.zeros((h, w), dtype=np.uint8)
            fm[int(fy) : int(fy) + 10, int(fx) : int(fx) + 10] = 1
            frle = mask_utils.encode(np.asfortranarray(fm))
            out.append(
                {
                    "image_id": a["image_id"],
                    "category_id": int(rng.choice(cats)),
                    "bbox": [fx, fy, 10.0, 10.0],
                    "score": float(rng.random()),
                    "segmentation": {"size": frle["size"], "counts": frle["counts"].decode()},
                }
            )
    return out


def _reference(ann_file: Path, results: list[dict]) -> dict[str, float]:
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(results)
        for iou, name in (("bbox", "box"), ("segm", "mask")):
            ev = COCOeval(gt, dt, iou)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[f"{name}_AP"], out[f"{name}_AP50"] = 100 * ev.stats[0], 100 * ev.stats[1]
    return out


def _as_model_outputs(results: list[dict], image_id: int, scale: float, label_of: dict[int, int]) -> dict:
    """One image's results as the detection head emits them: boxes in input pixels (xyxy)."""
    mine = [r for r in results if r["image_id"] == image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
    return {
        "boxes": boxes * scale,
        "scores": torch.tensor([r["score"] for r in mine]),
        "labels": torch.tensor([label_of[r["category_id"]] for r in mine], dtype=torch.int64),
    }


def test_platform_ap_equals_cocoeval(demo_root):
    ann = demo_root / "detection" / "annotations" / "instances_val2017.json"
    results = _predictions(ann)
    ref = _reference(ann, results)
    assert 20 < ref["box_AP"] < 95 and 20 < ref["mask_AP"] < 95, ref

    idx = load_coco(ann, demo_root / "detection" / "val2017", "det")
    assert coco_ap(idx.gt, results, ("bbox", "segm"), scorer="pycocotools") == ref
    fast = coco_ap(idx.gt, results, ("bbox", "segm"))  # faster-coco-eval, the default
    assert fast.keys() == ref.keys() and all(abs(fast[k] - ref[k]) < 1e-4 for k in ref), (fast, ref)

    # Box AP through the evaluator: outputs in input pixels at a per-image scale, mapped back.
    label_of = {c: i for i, c in enumerate(idx.label_to_category)}
    ev = CocoEvaluator(idx.gt, idx.label_to_category, masks=False)
    for img in idx.images:
        scale = 128 / max(img["height"], img["width"])
        det = _as_model_outputs(results, img["image_id"], scale, label_of)
        batch = {
            "image_id": torch.tensor([img["image_id"]]),
            "scale": torch.tensor([scale]),
            "orig_size": torch.tensor([[img["height"], img["width"]]]),
        }
        ev.update([det], batch)
    got = ev.compute()
    assert abs(got["box_AP"] - ref["box_AP"]) < 1e-6 and abs(got["box_AP50"] - ref["box_AP50"]) < 1e-6


def test_pasted_mask_lands_in_its_box():
    """A 28x28 all-ones mask for a box covers that box's pixels in the original image (within the
    one-pixel border torchvision's paste_masks_in_image interpolates into)."""
    det = {
        "boxes": torch.tensor([[20.0, 10.0, 60.0, 30.0]]),  # input pixels at scale 2
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([0]),
        "masks": torch.ones(1, 1, 28, 28),
    }
    (r,) = detections_to_coco(det, 7, 2.0, (40, 50), [3])
    m = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
    assert r["category_id"] == 3 and r["bbox"] == [10.0, 5.0, 20.0, 10.0]
    ys, xs = np.nonzero(m)
    assert m[5:15, 10:30].all()
    assert 9 <= xs.min() <= 10 and 29 <= xs.max() <= 30 and 4 <= ys.min() <= 5 and 14 <= ys.max() <= 15


def _rank_eval(rank: int, world: int, ann: str, image_dir: str, score_delay_s: float = 0.0) -> dict:
    if score_delay_s:  # rank 0 scores slowly (a large split): the others wait in a collective
        import task_plugins.detection.coco_eval as coco_eval
        from gppf.dist.eval_group import init_eval_group

        init_eval_group(timeout_s=60)
        scored = coco_eval.coco_ap

        def slow_coco_ap(*args, **kwargs):
            time.sleep(score_delay_s)
            return scored(*args, **kwargs)

        coco_eval.coco_ap = slow_coco_ap
    idx = load_coco(ann, image_dir, "det")
    results = _predictions(Path(ann))
    label_of = {c: i for i, c in enumerate(idx.label_to_category)}
    ev = CocoEvaluator(idx.gt, idx.label_to_category, masks=False)
    for img in idx.images[rank::world]:  # each rank sees its share, as in evaluation
        det = _as_model_outputs(results, img["image_id"], 1.0, label_of)
        ev.update(
            [det],
            {
                "image_id": torch.tensor([img["image_id"]]),
                "scale": torch.tensor([1.0]),
                "orig_size": torch.tensor([[img["height"], img["width"]]]),
            },
        )
    ev.synchronize(torch.device("cpu"))
    return ev.compute()


def test_distributed_evaluation_equals_single_process(demo_root):
    ann = demo_root / "detection" / "annotations" / "instances_val2017.json"
    ref = _reference(ann, _predictions(ann))
    per_rank = run_distributed(_rank_eval, 2, str(ann), str(demo_root / "detection" / "val2017"))
    for got in per_rank:
        assert abs(got["box_AP"] - ref["box_AP"]) < 1e-6


def test_ranks_wait_for_a_slow_rank_0_under_the_evaluation_timeout(demo_root):
    """The training group times out after 2 s here; rank 0 scores for 5 s. The other rank waits on
    the evaluation group (60 s) and gets the numbers."""
    ann = demo_root / "detection" / "annotations" / "instances_val2017.json"
    ref = _reference(ann, _predictions(ann))
    args = (str(ann), str(demo_root / "detection" / "val2017"), 5.0)
    for got in run_distributed(_rank_eval, 2, *args, pg_timeout_s=2):
        assert abs(got["box_AP"] - ref["box_AP"]) < 1e-4


def test_capped_evaluation_scores_only_the_images_it_ran(demo_root):
    """`eval_max_batches` runs the model on some images: AP is COCOeval's on exactly those, not on
    the whole split (where every image never run would count as all misses)."""
    ann = demo_root / "detection" / "annotations" / "instances_val2017.json"
    idx = load_coco(ann, demo_root / "detection" / "val2017", "det")
    ran = [img["image_id"] for img in idx.images[:4]]  # of 16
    results = [r for r in _predictions(ann) if r["image_id"] in ran]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = sorted(ran)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    label_of = {c: i for i, c in enumerate(idx.label_to_category)}
    evaluator = CocoEvaluator(idx.gt, idx.label_to_category, masks=False)
    for image_id in ran:
        img = next(i for i in idx.images if i["image_id"] == image_id)
        batch = {
            "image_id": torch.tensor([image_id]),
            "scale": torch.tensor([1.0]),
            "orig_size": torch.tensor([[img["height"], img["width"]]]),
        }
        evaluator.update([_as_model_outputs(results, image_id, 1.0, label_of)], batch)
    got = evaluator.compute()
    assert abs(got["box_AP"] - 100 * ev.stats[0]) < 1e-6 and abs(got["box_AP50"] - 100 * ev.stats[1]) < 1e-6
    whole_split = coco_ap(idx.gt, results, ("bbox",))["box_AP"]
    assert got["box_AP"] > 2 * whole_split, (got, whole_split)
