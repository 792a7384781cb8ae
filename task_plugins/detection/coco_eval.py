"""COCO box and mask AP: detections in COCO's result format, scored by COCOeval.

Two scorers give the same numbers (tests/test_coco_eval.py): faster-coco-eval's C++ COCOeval (the
default: an Objects365-sized split scores many times faster) and pycocotools' (the reference, and
`tasks.<name>.coco_eval: pycocotools` selects it).

LVIS is scored as LVIS is (`tasks.<name>.evaluation: lvis`, `lvis_ap`): federated AP over at most
300 detections an image, a detection of a category neither annotated nor listed negative for its
image is dropped, an unmatched one of a `not_exhaustive_category_ids` category is not a false
positive, and AP is also reported per frequency group (APr, APc, APf). faster-coco-eval's LVIS mode
computes it; tests/test_lvis_eval.py holds it equal to the `lvis` package's LVISEval (why not that
one directly: docs/design.md)."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import paste_masks_in_image

from gppf.api.task import Evaluator
from gppf.dist.eval_group import eval_group


def detections_to_coco(
    det: dict[str, torch.Tensor],
    image_id: int,
    scale: float,
    orig_hw: tuple[int, int],
    label_to_category: list[int],
) -> list[dict[str, Any]]:
    """One image's detections (input pixels, 0-based labels) as COCO results in original pixels."""
    boxes = det["boxes"].float().cpu() / scale
    h, w = orig_hw
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    rles = None
    if "masks" in det and len(boxes):
        # Paste the 28x28 mask probabilities straight into the original image: no resize of a
        # binarised mask, so mask AP is not blurred by the input scaling.
        pasted = paste_masks_in_image(det["masks"].float().cpu(), boxes, (h, w))[:, 0] > 0.5
        rles = mask_utils.encode(np.asfortranarray(pasted.numpy().astype(np.uint8).transpose(1, 2, 0)))
    out = []
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        r = {
            "image_id": int(image_id),
            "category_id": int(label_to_category[labels[k]]),
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(scores[k]),
        }
        if rles is not None:
            r["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        out.append(r)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pycocotools' prints. (Swapping `print` rather than stdout: Ray Train patches
    `print` to also log each line, which a stdout redirect would not catch.)"""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = saved


SCORERS = ("faster_coco_eval", "pycocotools")


def _scorer(name: str) -> tuple[type, type]:
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        # Its summary goes through `print_function`, which it takes as an argument.
        return FasterCOCO, lambda gt, dt, iou: COCOeval_faster(
            gt, dt, iou, print_function=lambda *a, **k: None
        )
    if name == "pycocotools":
        return COCO, COCOeval
    raise ValueError(f"unknown COCO scorer {name!r}; one of {', '.join(SCORERS)}")


def coco_ap(
    gt: dict,
    results: list[dict],
    iou_types: tuple[str, ...],
    image_ids: list[int] | None = None,
    scorer: str = "faster_coco_eval",
) -> dict[str, float]:
    """COCOeval's AP and AP50 (in %) for each IoU type; 0 when there are no detections.

    `image_ids`: the images the model was run on (all of `gt` when None). A capped evaluation
    (`train.eval_max_batches`) must be scored on those only: every other image's objects would
    count as missed. `scorer`: one of SCORERS."""
    out: dict[str, float] = {}
    prefix = {"bbox": "box", "segm": "mask"}
    coco_cls, eval_cls = _scorer(scorer)
    with _quiet():  # pycocotools' COCOeval prints its whole summary
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else None
        for iou_type in iou_types:
            if coco_dt is None:
                stats = np.zeros(12)
            else:
                ev = eval_cls(coco_gt, coco_dt, iou_type)
                if image_ids is not None:
                    ev.params.imgIds = sorted(set(image_ids))
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                stats = ev.stats
            out[f"{prefix[iou_type]}_AP"] = 100.0 * max(0.0, float(stats[0]))
            out[f"{prefix[iou_type]}_AP50"] = 100.0 * max(0.0, float(stats[1]))
    return out


LVIS_MAX_DETS = 300  # detections kept per image, as LVISResults does (the LVIS paper's protocol)
_FREQUENCIES = ("r", "c", "f")  # rare, common, frequent: LVIS's bins of training-image counts


def top_per_image(results: list[dict], k: int) -> list[dict]:
    """The `k` highest-scoring results of each image (LVISResults.limit_dets_per_image)."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out = []
    for rs in by_image.values():
        out.extend(rs if len(rs) <= k else sorted(rs, key=lambda r: r["score"], reverse=True)[:k])
    return out


def lvis_ap(
    gt: dict, results: list[dict], iou_types: tuple[str, ...], image_ids: list[int] | None = None
) -> dict[str, float]:
    """LVIS's federated AP, AP50, APr, APc and APf (in %) for each IoU type.

    `gt` must carry LVIS's keys, as `load_coco(..., lvis=True)` checks and keeps them. A
    frequency group none of whose categories has a ground-truth object in the evaluated images
    has no AP (LVISEval's -1): it is left out."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    cats = sorted(gt["categories"], key=lambda c: c["id"])
    groups = {f: [i for i, c in enumerate(cats) if c["frequency"] == f] for f in _FREQUENCIES}
    prefix = {"bbox": "box", "segm": "mask"}
    out: dict[str, float] = {}
    coco_gt = FasterCOCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    results = top_per_image(results, LVIS_MAX_DETS)
    coco_dt = coco_gt.loadRes(results) if results else None
    evaluated = set(image_ids) if image_ids is not None else {im["id"] for im in gt["images"]}
    annotated = {a["category_id"] for a in gt["annotations"] if a["image_id"] in evaluated}
    for iou_type in iou_types:
        name = prefix[iou_type]
        if coco_dt is None:  # no detections: 0 wherever there was something to find
            out.update({f"{name}_AP": 0.0, f"{name}_AP50": 0.0})
            out.update(
                {
                    f"{name}_AP{f}": 0.0
                    for f in _FREQUENCIES
                    if any(cats[i]["id"] in annotated for i in groups[f])
                }
            )
            continue
        ev = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=lambda *a, **k: None)
        ev.params.maxDets = [LVIS_MAX_DETS]
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, category] at area "all"

        def mean(p: np.ndarray) -> float | None:
            p = p[p > -1]
            return 100.0 * float(p.mean()) if p.size else None

        values = {"AP": mean(precision), "AP50": mean(precision[:1])}
        values.update({f"AP{f}": mean(precision[:, :, groups[f]]) for f in _FREQUENCIES})
        for k, v in values.items():
            if v is not None or k in ("AP", "AP50"):  # no AP at all counts 0, as in coco_ap
                out[f"{name}_{k}"] = 0.0 if v is None else v
    return out


def score(
    gt: dict,
    results: list[dict],
    iou_types: tuple[str, ...],
    image_ids: list[int] | None,
    scorer: str,
    style: str,
    hierarchy: dict | None = None,
) -> dict[str, float]:
    """`coco_ap`, or `lvis_ap` for style "lvis", or the Open Images challenge's AP50
    (task_plugins.detection.oid_eval) for style "oid_challenge" with its class `hierarchy`."""
    if style == "lvis":
        return lvis_ap(gt, results, iou_types, image_ids)
    if style == "oid_challenge":
        from task_plugins.detection.oid_eval import oid_challenge_ap

        return oid_challenge_ap(gt, results, hierarchy or {"LabelName": "/m/0bl9f"}, image_ids)
    return coco_ap(gt, results, iou_types, image_ids, scorer)


class CocoEvaluator(Evaluator):
    """Collects every worker's detections on rank 0, which runs COCOeval and shares the numbers."""

    primary = "box_AP"

    def __init__(
        self,
        gt: dict,
        label_to_category: list[int],
        masks: bool,
        scorer: str = "faster_coco_eval",
        style: str = "coco",
        hierarchy: dict | None = None,
    ):
        self.gt = gt
        self.scorer = scorer
        self.style = style
        self.hierarchy = hierarchy
        if style == "oid_challenge":
            self.primary = "box_AP50"  # the challenge reports AP at IoU 0.5 only
        self.label_to_category = label_to_category
        self.iou_types = ("bbox", "segm") if masks else ("bbox",)
        self.results: list[dict] = []
        self.image_ids: list[int] = []  # the images evaluated (an image may have no detections)
        self.metrics: dict[str, float] | None = None

    def update(self, outputs: list[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> None:
        for i, det in enumerate(outputs):
            self.image_ids.append(int(batch["image_id"][i]))
            h, w = (int(v) for v in batch["orig_size"][i].tolist())
            self.results.extend(
                detections_to_coco(
                    det, int(batch["image_id"][i]), float(batch["scale"][i]), (h, w), self.label_to_category
                )
            )

    def synchronize(self, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # Only rank 0 receives the detections (an all-gather would copy all of them to every rank),
        # evaluates (COCOeval of a large split takes minutes), and broadcasts the numbers; the
        # others wait on the evaluation group, under its longer timeout (gppf.dist.eval_group).
        group = eval_group()
        rank0 = dist.get_rank() == 0
        gathered: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object((self.image_ids, self.results), gathered, dst=0, group=group)
        box: list[Any] = [None]
        if rank0:
            self.image_ids = [i for ids, _ in gathered for i in ids]
            self.results = [r for _, part in gathered for r in part]
            box = [self._score()]
        dist.broadcast_object_list(box, src=0, group=group)
        self.metrics = box[0]

    def compute(self) -> dict[str, float]:
        if self.metrics is None:
            self.metrics = self._score()
        return self.metrics

    def _score(self) -> dict[str, float]:
        return score(
            self.gt, self.results, self.iou_types, self.image_ids, self.scorer, self.style, self.hierarchy
        )
