"""The Open Images Detection Challenge's AP50 (`tasks.<t>.evaluation: oid_challenge`), as the
TensorFlow Object Detection API's `OpenImagesChallengeEvaluator` computes it (GPPF Table 1's
"Open AP50"):

- **Hierarchy expansion** (`oid_hierarchical_labels_expansion.py`): every ground-truth box also
  counts for each ancestor of its class in the class hierarchy (the root, "Entity", excluded); a
  verified positive image-level label expands to its ancestors, a verified negative one to its
  descendants. Detections are expanded to their ancestors as well (`expand_detections`, on by
  default): the challenge scores parent classes, which a detector trained on leaf labels only
  reports this way.
- **Only verified labels count**: on each image, detections of a class that is neither among
  its verified image-level labels (positive or negative) nor among its box classes are ignored.
- **Group-of boxes**: detections are matched greedily by score to non-group-of boxes at IoU >= 0.5
  (a box matched once; further matches are false positives); unmatched detections whose
  intersection over their own area with a group-of box is >= 0.5 go to it, and each group-of box
  with any counts as one true positive at the highest score among them (the rest are ignored).
  A group-of box counts once in the ground truth.
- **AP** per class over all images (precision envelope, all recall points), averaged over the
  classes with ground truth (a class without any has no AP, NaN, and is left out).

The ground truth comes from `gppf.tools.openimages_to_coco` (categories with their Open Images
`label_name`, images with `pos_category_ids` / `neg_category_ids` of their verified image-level
labels, group-of boxes as `iscrowd`); the hierarchy from the challenge's JSON
(`challenge-2019-label500-hierarchy.json`), named by `tasks.<t>.oid_hierarchy`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from gppf.io import storage

IOU = 0.5
ROOT = "/m/0bl9f"  # "Entity", the hierarchy's root: never a label


def load_hierarchy(path: str) -> dict[str, Any]:
    p = storage.path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Open Images class hierarchy {path} does not exist")
    return json.loads(p.read_text())


def ancestors(hierarchy: dict[str, Any]) -> dict[str, set[str]]:
    """{label: every ancestor label} of the hierarchy's tree (a label under several parents has
    all of their ancestors), the root left out."""
    out: dict[str, set[str]] = defaultdict(set)

    def walk(node: dict[str, Any], above: tuple[str, ...]) -> None:
        name = node["LabelName"]
        if name != ROOT:
            out[name].update(above)
        below = above + ((name,) if name != ROOT else ())
        for child in node.get("Subcategory", []):
            walk(child, below)

    walk(hierarchy, ())
    return dict(out)


def descendants(up: dict[str, set[str]]) -> dict[str, set[str]]:
    down: dict[str, set[str]] = defaultdict(set)
    for label, parents in up.items():
        for p in parents:
            down[p].add(label)
    return dict(down)


def _xyxy(boxes: Iterable[list[float]]) -> np.ndarray:
    b = np.asarray(list(boxes), dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    return wh[..., 0] * wh[..., 1]


def _area(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def image_tp_fp(
    det: np.ndarray, scores: np.ndarray, gt: np.ndarray, group_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One image and class: (scores, tp weights) of the detections that count (per_image_evaluation's
    `_compute_tp_fp_for_single_class`): IoU matching to non-group-of boxes, then IoA matching to
    group-of boxes, one entry per group-of box that was hit."""
    order = np.argsort(-scores, kind="stable")
    det, scores = det[order], scores[order]
    n = len(det)
    if len(gt) == 0:
        return scores, np.zeros(n)
    tp = np.zeros(n, dtype=bool)
    boxes, groups = gt[~group_of], gt[group_of]
    if len(boxes):
        inter = _intersection(det, boxes)
        iou = inter / (_area(det)[:, None] + _area(boxes)[None] - inter)
        best = iou.argmax(1)
        taken = np.zeros(len(boxes), dtype=bool)
        for i in range(n):
            if iou[i, best[i]] >= IOU and not taken[best[i]]:
                tp[i] = taken[best[i]] = True
    in_group = np.zeros(n, dtype=bool)
    group_scores = np.zeros(len(groups))
    if len(groups):
        ioa = _intersection(det, groups) / np.maximum(_area(det)[:, None], 1e-12)
        best = ioa.argmax(1)
        for i in range(n):
            if not tp[i] and ioa[i, best[i]] >= IOU:
                in_group[i] = True
                group_scores[best[i]] = max(group_scores[best[i]], scores[i])
    hit = group_scores > 0
    keep = ~in_group
    return (
        np.concatenate([scores[keep], group_scores[hit]]),
        np.concatenate([tp[keep].astype(float), np.ones(int(hit.sum()))]),
    )


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: float) -> float:
    """metrics.compute_precision_recall + compute_average_precision of the TF OD API."""
    order = np.argsort(scores, kind="stable")[::-1]
    tp = tp[order]
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum((tp <= 0).astype(float))
    precision = cum_tp / np.maximum(cum_tp + cum_fp, 1e-12)
    recall = cum_tp / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


def oid_challenge_ap(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    hierarchy: dict[str, Any],
    image_ids: list[int] | None = None,
    expand_detections: bool = True,
) -> dict[str, float]:
    """The challenge's mean AP50 (in %, `box_AP50`) and the number of classes it averages
    (`oid_classes`) over the images evaluated (all of `gt`'s when `image_ids` is None)."""
    cats = {c["id"]: c for c in gt["categories"]}
    missing = [c["id"] for c in cats.values() if "label_name" not in c]
    if missing:
        raise ValueError(
            f"oid_challenge: category {missing[0]} has no 'label_name' (its Open Images MID); "
            "convert the annotations with gppf.tools.openimages_to_coco"
        )
    by_label = {c["label_name"]: cid for cid, c in cats.items()}
    up = ancestors(hierarchy)
    down = descendants(up)

    def expand(cid: int, relatives: dict[str, set[str]]) -> set[int]:
        names = relatives.get(cats[cid]["label_name"], set())
        return {cid} | {by_label[n] for n in names if n in by_label}

    evaluated = set(image_ids) if image_ids is not None else {im["id"] for im in gt["images"]}
    gt_boxes: dict[tuple[int, int], list[tuple[list[float], bool]]] = defaultdict(list)
    labels: dict[int, set[int]] = defaultdict(set)  # image -> evaluatable classes
    for im in gt["images"]:
        if im["id"] not in evaluated:
            continue
        for cid in im.get("pos_category_ids", []):
            labels[im["id"]] |= expand(cid, up)
        for cid in im.get("neg_category_ids", []):
            labels[im["id"]] |= expand(cid, down)
    for a in gt["annotations"]:
        if a["image_id"] not in evaluated:
            continue
        for cid in expand(a["category_id"], up):
            gt_boxes[(a["image_id"], cid)].append((a["bbox"], bool(a.get("iscrowd", 0))))
            labels[a["image_id"]].add(cid)
    dets: dict[tuple[int, int], list[tuple[list[float], float]]] = defaultdict(list)
    for r in results:
        if r["image_id"] not in evaluated:
            continue
        classes = expand(r["category_id"], up) if expand_detections else {r["category_id"]}
        for cid in classes & labels[r["image_id"]]:  # only verified classes of the image count
            dets[(r["image_id"], cid)].append((r["bbox"], r["score"]))

    num_gt: dict[int, float] = defaultdict(float)
    for (_, cid), boxes in gt_boxes.items():
        num_gt[cid] += len(boxes)  # a group-of box counts once (group_of_weight 1)
    scores: dict[int, list[np.ndarray]] = defaultdict(list)
    tps: dict[int, list[np.ndarray]] = defaultdict(list)
    for (image, cid), found in dets.items():
        g = gt_boxes.get((image, cid), [])
        s, tp = image_tp_fp(
            _xyxy(b for b, _ in found),
            np.asarray([sc for _, sc in found], dtype=np.float64),
            _xyxy(b for b, _ in g),
            np.asarray([grp for _, grp in g], dtype=bool),
        )
        scores[cid].append(s)
        tps[cid].append(tp)
    aps = [
        average_precision(
            np.concatenate(scores[cid]) if scores[cid] else np.zeros(0),
            np.concatenate(tps[cid]) if tps[cid] else np.zeros(0),
            n,
        )
        for cid, n in sorted(num_gt.items())
        if n > 0
    ]
    return {"box_AP50": 100.0 * float(np.mean(aps)) if aps else 0.0, "oid_classes": float(len(aps))}
