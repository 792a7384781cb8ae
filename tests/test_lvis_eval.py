"""LVIS is scored as LVIS is: the platform's federated AP equals the `lvis` package's LVISEval run
directly on the same annotation file and predictions (box and mask AP, AP50, APr, APc, APf)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from task_plugins.detection.coco_data import CocoFormatError, load_coco
from task_plugins.detection.coco_eval import LVIS_MAX_DETS, CocoEvaluator, top_per_image

# Two categories of each frequency; category 6 is annotated nowhere (its APf part is -1 in LVISEval).
CATS = [{"id": i, "name": f"c{i}", "frequency": f} for i, f in enumerate("rrccff", start=1)]


def _square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _fixture(root: Path) -> tuple[Path, list[dict]]:
    """An LVIS-format file (6 images, 64x80) with negative and not-exhaustive category lists, and
    predictions that exercise the federated rules: noisy true positives, false positives of
    annotated and of negative categories (counted), detections of categories neither annotated
    nor negative for their image (dropped), unmatched detections of a not-exhaustive category (not
    false positives), and one image with more than 300 detections (the per-image cap)."""
    rng = np.random.default_rng(3)
    h, w = 64, 80
    images, anns = [], []
    for i in range(1, 7):
        present = sorted(rng.choice([1, 2, 3, 4, 5], size=2, replace=False).tolist())
        absent = [c for c in (1, 2, 3, 4, 5) if c not in present]
        images.append(
            {
                "id": i,
                "height": h,
                "width": w,
                "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
                "neg_category_ids": absent[:1],  # the others are unknown for this image
                "not_exhaustive_category_ids": present[:1],
            }
        )
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                s = float(rng.uniform(8, 30))
                x, y = float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": c,
                        "bbox": [x, y, s, s],
                        "area": s * s,
                        "segmentation": _square(x, y, s),
                    }
                )
    ann_file = root / "lvis_v1_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))

    def det(image_id: int, cat: int, x: float, y: float, s: float, score: float) -> dict:
        m = np.zeros((h, w), dtype=np.uint8)
        m[int(y) : int(y + s), int(x) : int(x + s)] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        return {
            "image_id": image_id,
            "category_id": cat,
            "bbox": [x, y, s, s],
            "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        }

    preds = []
    for a in anns:
        x, y, s, _ = a["bbox"]
        j = rng.normal(0, 2.0, 3)
        preds.append(
            det(
                a["image_id"],
                a["category_id"],
                max(0, x + j[0]),
                max(0, y + j[1]),
                s + j[2],
                float(rng.random()),
            )
        )
    for im in images:
        for cat in (1, 2, 3, 4, 5):  # false positives of every category: some counted, some not
            s = float(rng.uniform(6, 20))
            preds.append(
                det(
                    im["id"],
                    cat,
                    float(rng.uniform(0, w - s)),
                    float(rng.uniform(0, h - s)),
                    s,
                    float(rng.random()),
                )
            )
    for _ in range(LVIS_MAX_DETS + 40):  # image 1: over the cap, so its weaker true positives are cut
        s = float(rng.uniform(4, 12))
        preds.append(
            det(
                1,
                int(rng.choice([1, 2, 3, 4, 5])),
                float(rng.uniform(0, w - s)),
                float(rng.uniform(0, h - s)),
                s,
                float(rng.uniform(0.3, 1.0)),
            )
        )
    return ann_file, preds


def _lvis_reference(ann_file: Path, preds: list[dict], iou_type: str, monkeypatch) -> dict[str, float]:
    lvis = pytest.importorskip("lvis")
    # lvis 0.5.3 (the newest on PyPI) casts with np.float, removed in NumPy 1.24.
    monkeypatch.setattr(np, "float", float, raising=False)
    gt = lvis.LVIS(str(ann_file))
    ev = lvis.LVISEval(gt, lvis.LVISResults(gt, [dict(p) for p in preds]), iou_type)
    ev.run()
    return {k: 100.0 * v for k, v in ev.get_results().items()}


def test_lvis_ap_equals_lvis_package(tmp_path, monkeypatch):
    ann_file, preds = _fixture(tmp_path)
    idx = load_coco(ann_file, tmp_path, "lvis", image_key="coco_url", masks=True, lvis=True)
    ev = CocoEvaluator(idx.gt, idx.label_to_category, masks=True, style="lvis")
    ev.results = [dict(p) for p in preds]
    ev.image_ids = [im["image_id"] for im in idx.images]
    ours = ev.compute()
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        ref = _lvis_reference(ann_file, preds, iou_type, monkeypatch)
        # The fixture reaches every rule: AP in (0, 100) and every frequency group scored.
        assert 5 < ref["AP"] < 95 and all(ref[k] >= 0 for k in ("APr", "APc", "APf")), ref
        for k in ("AP", "AP50", "APr", "APc", "APf"):
            assert ours[f"{prefix}_{k}"] == pytest.approx(ref[k], abs=1e-4), (iou_type, k)


def test_the_federated_rules_change_the_score(tmp_path):
    """The fixture is not one COCOeval would score the same: without the federated rules (COCO
    style on the same file) the AP differs."""
    ann_file, preds = _fixture(tmp_path)
    idx = load_coco(ann_file, tmp_path, "lvis", image_key="coco_url", masks=True, lvis=True)
    scores = {}
    for style in ("lvis", "coco"):
        ev = CocoEvaluator(idx.gt, idx.label_to_category, masks=False, style=style)
        ev.results = [dict(p) for p in preds]
        ev.image_ids = [im["image_id"] for im in idx.images]
        scores[style] = ev.compute()["box_AP"]
    assert abs(scores["lvis"] - scores["coco"]) > 1.0, scores


def test_top_per_image_keeps_the_highest_scores():
    rs = [{"image_id": 1, "score": s} for s in (0.1, 0.9, 0.5, 0.7)] + [{"image_id": 2, "score": 0.2}]
    kept = top_per_image(rs, 2)
    assert sorted(r["score"] for r in kept if r["image_id"] == 1) == [0.7, 0.9]
    assert [r["score"] for r in kept if r["image_id"] == 2] == [0.2]


def test_a_file_without_lvis_keys_is_refused_by_name(tmp_path):
    ann_file, _ = _fixture(tmp_path)
    doc = json.loads(ann_file.read_text())
    del doc["images"][2]["neg_category_ids"]
    ann_file.write_text(json.dumps(doc))
    with pytest.raises(CocoFormatError, match=r"lvis_v1_val.json: images\[2\] has no 'neg_category_ids'"):
        load_coco(ann_file, tmp_path, "lvis", image_key="coco_url", lvis=True)


def test_no_detections_score_zero_in_each_group_with_objects(tmp_path):
    ann_file, _ = _fixture(tmp_path)
    idx = load_coco(ann_file, tmp_path, "lvis", image_key="coco_url", masks=False, lvis=True)
    ev = CocoEvaluator(idx.gt, idx.label_to_category, masks=False, style="lvis")
    ev.image_ids = [im["image_id"] for im in idx.images]
    assert ev.compute() == {f"box_{k}": 0.0 for k in ("AP", "AP50", "APr", "APc", "APf")}
