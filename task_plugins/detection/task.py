"""Object detection and instance segmentation on COCO-format data (COCO, LVIS, Objects365, Open Images).

`pre`: large-scale jitter (torchvision transforms v2 `ScaleJitter` + `RandomCrop`) to a square
`input_size`, horizontal flip and copy-paste between the images of a batch (Ghiasi et al.; not in
torchvision's library, so `copy_paste` below). `net`: FPN + Faster/Mask R-CNN heads
(task_plugins.detection.rcnn). `loss`: torchvision's RPN and RoI losses, summed. Metric: COCO box /
mask AP (task_plugins.detection.coco_eval), or LVIS's federated AP with `evaluation: lvis`.

Layout (relative to data_root, COCO's by default): `train_images`/, `val_images`/ and the two
annotation files. Boxes only (Objects365, Open Images): `masks: false` gives Faster R-CNN.

Training batches carry fixed-size images and every instance of each: boxes, labels and masks
are ragged columns (their count differs per image, gppf.io.batches), masks bit-packed
(input_size² / 8 bytes per instance). No instance is ever dropped; an image with more than
`max_instances` (1000) objects after augmentation is an error that names it.

Pseudo-labels (gppf.tools.pseudo_labels): the images and one COCO file, at the train paths of this
layout, of the detections scoring >= `score` (0.5), with their masks as RLE when `masks` is on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from gppf.api.registry import register_task
from gppf.api.task import DataSource, Evaluator, FeatureInfo, Task
from gppf.config.base import ConfigError
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.batches import pad_stack
from gppf.io.images import IMAGENET_MEAN, BadSampleError, open_image, sample_rng
from task_plugins.detection.coco_data import CocoIndex, load_coco
from task_plugins.detection.coco_eval import SCORERS, CocoEvaluator, detections_to_coco
from task_plugins.detection.oid_eval import load_hierarchy
from task_plugins.detection.rcnn import RCNNConfig, RCNNHead, class_balanced_weights
from task_plugins.pseudo_label_formats import coco_document, confident_annotations, link_image

if TYPE_CHECKING:
    from gppf.api.task import Task
    from gppf.config.cpf import PseudoLabelConfig


EVALUATIONS = ("coco", "lvis", "oid_challenge")


@dataclass
class DetectionConfig(TaskConfig):
    input_size: int = 1024  # LSJ output (square); a multiple of 32
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    image_key: str = "file_name"  # LVIS: "coco_url" (the file is the URL's last component)
    # > 0: only the file name's last N components locate the image (Objects365: 2, "patchN/x.jpg")
    path_components: int = 0
    masks: bool = True  # Mask R-CNN; false: Faster R-CNN (box-only datasets)
    # A hard limit on a training image's objects after augmentation (copy-paste adds some): more is
    # an error naming the image, never a silent drop. 0: no limit. (LVIS's densest images hold
    # several hundred; each object travels as an input_size^2 / 8-byte mask.)
    max_instances: int = 1000
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    copy_paste: float = 0.5  # probability that an image receives the objects of another (masks only)
    coco_eval: str = "faster_coco_eval"  # the COCOeval: faster_coco_eval (C++) or pycocotools
    # "coco": COCOeval's AP; "lvis": LVIS's federated AP with APr/APc/APf (the val file must carry
    # LVIS's keys; set head.detections_per_image: 300, LVIS's cap); "oid_challenge": the Open Images
    # challenge's AP50 (task_plugins.detection.oid_eval; annotations from gppf.tools.openimages_to_coco)
    evaluation: str = "coco"
    oid_hierarchy: str = ""  # oid_challenge: the class-hierarchy JSON, relative to data_root
    # > 0: evaluate with the shorter side at test_size and the longer at most test_max_size
    # (MMDetection's test scale; GPPF's UODB finetuning tests at 800, DeepLesion at 512); 0: the
    # longer side at input_size, padded to a square (the LSJ setting)
    test_size: int = 0
    test_max_size: int = 1333
    head: RCNNConfig = field(default_factory=RCNNConfig)


# LSJ pads small crops with the mean colour, which normalises to ~0 on the device (what torchvision's
# and detectron2's detectors pad with); evaluation pads with it too, so padding looks the same to the model.
_PAD_FILL = {tv_tensors.Image: tuple(int(round(255 * float(m))) for m in IMAGENET_MEAN), tv_tensors.Mask: 0}


def decode_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, or compressed or uncompressed RLE) as an [h, w] uint8 mask."""
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = {
            "size": seg["size"],
            "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"],
        }
    return mask_utils.decode(rle)


def copy_paste(
    images: list[torch.Tensor],
    masks: list[torch.Tensor],
    labels: list[torch.Tensor],
    p: float,
    rng: np.random.Generator,
) -> None:
    """Simple copy-paste within a batch (in place): image i receives a random subset of image
    i+1's objects with probability p; covered parts of its own masks are removed."""
    n = len(images)
    if n < 2:
        return
    src = [(m.clone(), lab.clone(), img.clone()) for img, m, lab in zip(images, masks, labels)]
    for i in range(n):
        m_src, l_src, img_src = src[(i + 1) % n]
        if rng.random() >= p or len(l_src) == 0:
            continue
        pick = torch.from_numpy(rng.random(len(l_src)) < 0.5)
        if not pick.any():
            pick[int(rng.integers(len(l_src)))] = True
        pasted = m_src[pick].bool()
        cover = pasted.any(0)
        images[i] = torch.where(cover, img_src, images[i])
        masks[i] = torch.cat([masks[i] * (~cover), pasted.to(masks[i].dtype)])
        labels[i] = torch.cat([labels[i], l_src[pick]])


@register_task("detection")
class DetectionTask(Task):
    config_cls = DetectionConfig
    cfg: DetectionConfig

    def __init__(self, name: str, cfg: DetectionConfig):
        super().__init__(name, cfg)
        if cfg.coco_eval not in SCORERS:
            raise ConfigError(
                f"tasks.{name}.coco_eval must be one of {', '.join(SCORERS)}, got {cfg.coco_eval!r}"
            )
        if cfg.evaluation not in EVALUATIONS:
            raise ConfigError(
                f"tasks.{name}.evaluation must be one of {', '.join(EVALUATIONS)}, got {cfg.evaluation!r}"
            )
        if cfg.evaluation == "oid_challenge" and (cfg.masks or not cfg.oid_hierarchy):
            raise ConfigError(
                f"tasks.{name}: evaluation 'oid_challenge' scores boxes with the class hierarchy: set "
                f"masks: false and oid_hierarchy (the hierarchy JSON, relative to data_root)"
            )
        if cfg.evaluation == "lvis" and cfg.coco_eval != "faster_coco_eval":
            raise ConfigError(
                f"tasks.{name}: evaluation 'lvis' is scored by faster_coco_eval's LVIS mode; "
                f"coco_eval {cfg.coco_eval!r} has no federated AP"
            )
        self._index: dict[str, CocoIndex] = {}

    def __getstate__(self) -> dict:  # Ray ships the task to every decode task: not the index
        return {**self.__dict__, "_index": {}}

    def index(self, split: str) -> CocoIndex:
        if split not in self._index:
            cfg = self.cfg
            root = storage.path(cfg.data_root)
            ann = cfg.train_annotations if split == "train" else cfg.val_annotations
            images = cfg.train_images if split == "train" else cfg.val_images
            self._index[split] = load_coco(
                root / ann,
                root / images,
                self.name,
                cfg.image_key,
                cfg.masks,
                keep_gt=split != "train",
                path_components=cfg.path_components,
                lvis=split != "train" and cfg.evaluation == "lvis",
                oid=split != "train" and cfg.evaluation == "oid_challenge",
            )
        return self._index[split]

    @property
    def num_classes(self) -> int:
        return len(self.index("train").categories)

    def class_names(self) -> list[str]:
        if self.cfg.class_names:
            return list(self.cfg.class_names)
        return [str(c.get("name", c["id"])) for c in self.index("train").categories]

    # -- data -----------------------------------------------------------------------------
    def check_data(self) -> None:
        if self.cfg.input_size % 32:
            raise ValueError(
                f"tasks.{self.name}.input_size must be a multiple of 32, got {self.cfg.input_size}"
            )
        root = storage.path(self.cfg.data_root)
        if self.cfg.evaluation == "oid_challenge" and not (root / self.cfg.oid_hierarchy).is_file():
            raise FileNotFoundError(
                f"task {self.name!r}: oid_hierarchy {root / self.cfg.oid_hierarchy} does not exist (the "
                "challenge's class-hierarchy JSON, e.g. challenge-2019-label500-hierarchy.json)"
            )
        for split, images in (("train", self.cfg.train_images), ("val", self.cfg.val_images)):
            if not (root / images).is_dir():
                raise FileNotFoundError(
                    f"task {self.name!r}: {split} image directory {root / images} does not exist"
                )
            idx = self.index(split)
            missing = set(storage.missing([img["path"] for img in idx.images]))
            for img in idx.images:
                if img["path"] in missing:
                    raise FileNotFoundError(
                        f"task {self.name!r}: image id {img['image_id']} of the {split} annotations has no "
                        f"file {img['path']}"
                    )
        train_ids = [c["id"] for c in self.index("train").categories]
        val_ids = [c["id"] for c in self.index("val").categories]
        if train_ids != val_ids:
            raise ValueError(
                f"task {self.name!r}: train and val annotation files declare different categories"
            )

    def source(self, split: str) -> DataSource:
        units = [
            {
                "path": img["path"],
                "image_id": img["image_id"],
                "height": img["height"],
                "width": img["width"],
                "anns": json.dumps(img["anns"]),  # ragged: one string column keeps Arrow simple
            }
            for img in self.index(split).images
        ]
        return DataSource(units=units, read=items_dataset)

    def _load(self, batch: dict[str, np.ndarray], i: int) -> tuple[torch.Tensor, list]:
        path = str(batch["path"][i])
        img = open_image(path, self.name, f"image {path}")
        h, w = int(batch["height"][i]), int(batch["width"][i])
        if img.size != (w, h):
            raise BadSampleError(
                f"task {self.name!r}: image {path} is {img.size[0]}x{img.size[1]} but its annotation "
                f"record (id {int(batch['image_id'][i])}) says {w}x{h}"
            )
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), json.loads(str(batch["anns"][i]))

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        return self._train_batch(batch, seed) if train else self._eval_batch(batch)

    def _train_batch(self, batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        s, n = self.cfg.input_size, len(batch["path"])
        lsj = v2.Compose(
            [
                v2.ScaleJitter((s, s), scale_range=tuple(self.cfg.lsj_scale)),
                v2.RandomCrop((s, s), pad_if_needed=True, fill=_PAD_FILL),
                v2.RandomHorizontalFlip(),
            ]
        )
        images, masks, labels, boxes = [], [], [], []
        for i in range(n):
            img, anns = self._load(batch, i)
            h, w = img.shape[-2:]
            rng = sample_rng(seed, str(batch["path"][i]))
            torch.manual_seed(int(rng.integers(2**62)))  # v2 transforms draw from torch's global RNG
            sample = {
                "image": tv_tensors.Image(img),
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor([a[:4] for a in anns], dtype=torch.float32).reshape(-1, 4),
                    format="XYXY",
                    canvas_size=(h, w),
                ),
                "labels": torch.tensor([a[4] for a in anns], dtype=torch.int64),
            }
            if self.cfg.masks:
                m = [decode_mask(a[5], h, w) for a in anns]
                sample["masks"] = tv_tensors.Mask(
                    torch.from_numpy(np.stack(m)) if m else torch.zeros(0, h, w, dtype=torch.uint8)
                )
            out = lsj(sample)
            images.append(out["image"].as_subclass(torch.Tensor))
            labels.append(out["labels"])
            boxes.append(out["boxes"].as_subclass(torch.Tensor))
            if self.cfg.masks:
                masks.append(out["masks"].as_subclass(torch.Tensor))
        if self.cfg.masks:
            copy_paste(
                images, masks, labels, self.cfg.copy_paste, sample_rng(seed, str(batch["path"][0]) + "cp")
            )
            # Boxes from the (cropped, occluded) masks: tight, as detectron2's LSJ recomputes them.
            for i in range(n):
                keep = masks[i].flatten(1).sum(1) > 0
                masks[i], labels[i] = masks[i][keep], labels[i][keep]
                boxes[i] = (
                    masks_to_boxes(masks[i]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
                    if len(labels[i])
                    else torch.zeros(0, 4)
                )
        return self._pack(images, boxes, labels, masks, batch)

    def _pack(self, images, boxes, labels, masks, batch) -> dict[str, np.ndarray]:
        """Fixed-size images and, per image, all of its instances: `boxes` [k, 4], `labels` [k]
        and bit-packed `masks` [k, s*s/8] are ragged columns (k differs per image, gppf.io.batches),
        so no object is ever dropped (a dropped object would train as background). An image with
        more than `max_instances` objects is an error naming it."""
        s, n = self.cfg.input_size, len(images)
        out = {
            "image": np.empty((n, 3, s, s), dtype=np.uint8),
            "boxes": np.empty(n, dtype=object),
            "labels": np.empty(n, dtype=object),
            "size": np.full((n, 2), s, dtype=np.int64),
        }
        if self.cfg.masks:
            out["masks"] = np.empty(n, dtype=object)
        for i in range(n):
            out["image"][i] = images[i].numpy()
            b = boxes[i]
            wh = b[:, 2:] - b[:, :2]
            keep = torch.nonzero((wh >= 1).all(1)).flatten()  # boxes the crop cut to under a pixel
            k = len(keep)
            if self.cfg.max_instances and k > self.cfg.max_instances:
                raise BadSampleError(
                    f"task {self.name!r}: image {batch['path'][i]} has {k} objects after augmentation, "
                    f"more than tasks.{self.name}.max_instances={self.cfg.max_instances}; raise the limit "
                    "(each object costs input_size^2 / 8 bytes of mask in transport) or remove the image"
                )
            out["boxes"][i] = b[keep].numpy().astype(np.float32).reshape(k, 4)
            out["labels"][i] = labels[i][keep].numpy().astype(np.int64)
            if self.cfg.masks:  # k = 0: the crop left no object (a negative image)
                bits = masks[i][keep].numpy().astype(bool).reshape(k, s * s)
                out["masks"][i] = np.packbits(bits, axis=1).reshape(k, s * s // 8)
        return out

    def _eval_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The longer side to input_size, padded to a square with the mean colour (the LSJ
        evaluation setting); or with `test_size` MMDetection's / detectron2's test scale, the
        shorter side to test_size and the longer at most test_max_size, each image at its own size
        (a ragged column, padded on the device)."""
        s, n, ragged = self.cfg.input_size, len(batch["path"]), bool(self.cfg.test_size)
        out = {
            "image": np.empty(n, dtype=object) if ragged else np.empty((n, 3, s, s), dtype=np.uint8),
            "size": np.zeros((n, 2), dtype=np.int64),
            "scale": np.zeros(n, dtype=np.float32),
            "image_id": np.asarray(batch["image_id"], dtype=np.int64),
            "orig_size": np.zeros((n, 2), dtype=np.int64),
        }
        for i in range(n):
            img, _ = self._load(batch, i)
            h, w = img.shape[-2:]
            if ragged:
                scale = min(self.cfg.test_size / min(h, w), self.cfg.test_max_size / max(h, w))
                nh, nw = round(h * scale), round(w * scale)
            else:
                scale = s / max(h, w)
                nh, nw = min(s, round(h * scale)), min(s, round(w * scale))
            img = v2.functional.resize(img, [nh, nw], antialias=True).numpy()
            if ragged:
                out["image"][i] = img
            else:
                out["image"][i] = np.asarray(_PAD_FILL[tv_tensors.Image], dtype=np.uint8)[:, None, None]
                out["image"][i, :, :nh, :nw] = img
            out["size"][i], out["scale"][i], out["orig_size"][i] = (nh, nw), scale, (h, w)
        return out

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        out = super().to_device(batch, device)
        if isinstance(out.get("image"), list):  # test_size: images of their own sizes
            out["image"], _ = pad_stack(out["image"], 0.0, divisor=32)  # 0: the mean colour
        return out

    def check_extra_root(self, other: Task) -> None:
        mine, theirs = self.index("train").categories, other.index("train").categories
        if [c["id"] for c in mine] != [c["id"] for c in theirs]:
            raise ValueError(
                f"task {self.name!r}: extra train root {other.cfg.data_root} declares categories "
                f"{[c['id'] for c in theirs]}, data_root {[c['id'] for c in mine]}: labels would not match"
            )

    # -- pseudo-labels: images + one COCO file of the boxes (and masks) scoring >= cfg.score --------
    def pseudo_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        sizes = []
        for path in paths:
            with Image.open(storage.open_input(path)) as img:  # the header only: _eval_batch decodes
                sizes.append(img.size)
        records = {
            "path": np.asarray(paths, dtype=object),
            "image_id": np.asarray(batch["index"], dtype=np.int64) + 1,
            "width": np.asarray([w for w, _ in sizes], dtype=np.int64),
            "height": np.asarray([h for _, h in sizes], dtype=np.int64),
            "anns": np.asarray(["[]"] * len(paths), dtype=object),
        }
        return {**self._eval_batch(records), "path": records["path"]}

    def write_pseudo_labels(
        self,
        outputs: list[dict[str, torch.Tensor]],
        inputs: dict[str, np.ndarray],
        out: Path,
        cfg: PseudoLabelConfig,
    ) -> list[dict[str, Any]]:
        label_to_category = self.index("train").label_to_category
        records = []
        for i, det in enumerate(outputs):
            image_id = int(inputs["image_id"][i])
            h, w = (int(v) for v in inputs["orig_size"][i])
            results = detections_to_coco(det, image_id, float(inputs["scale"][i]), (h, w), label_to_category)
            src = Path(str(inputs["path"][i]))
            link_image(src, out / self.cfg.train_images / src.name)
            image = {"id": image_id, "file_name": src.name, "height": h, "width": w}
            if self.cfg.image_key != "file_name":  # LVIS-style keys locate the image by that key
                image[self.cfg.image_key] = src.name
            records.append({"image": image, "annotations": confident_annotations(results, cfg.score)})
        return records

    def finish_pseudo_labels(self, records: list[dict[str, Any]], out: Path) -> dict[str, float]:
        annotations = [a for r in records for a in r["annotations"]]
        if not annotations:  # a COCO file without annotations is refused by load_coco
            raise ValueError(
                f"task {self.name!r}: no detection of the {len(records)} images scores at least the "
                "pseudo-label threshold: a weak teacher, or a threshold too high"
            )
        doc = coco_document([r["image"] for r in records], annotations, self.index("train").categories)
        path = out / self.cfg.train_annotations
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return {"images": len(records), "boxes_per_image": len(annotations) / max(1, len(records))}

    # -- model ----------------------------------------------------------------------------
    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        return RCNNHead(features, self.num_classes, self.cfg.masks, self.cfg.head)

    def enter_stage(self, head: nn.Module, options: dict[str, Any], where: str) -> None:
        """`class_balanced_beta` (in (0, 1)): the head trains its classifier (a cascade: each
        stage's) with the class-balanced loss, from this task's per-class training-instance
        counts (LVIS's second stage); without it, the usual losses."""
        beta = options.get("class_balanced_beta")
        head.class_weights = (
            None if beta is None else class_balanced_weights(self.instance_counts(), float(beta))
        )

    def check_stage_options(self, options: dict[str, Any], where: str) -> None:
        unknown = sorted(set(options) - {"class_balanced_beta"})
        if unknown:
            raise ConfigError(
                f"{where}: task_options.{self.name}.{unknown[0]} is not a detection stage option "
                "(known: class_balanced_beta)"
            )
        beta = options.get("class_balanced_beta")
        if beta is not None and not (isinstance(beta, (int, float)) and 0 < float(beta) < 1):
            raise ConfigError(
                f"{where}: task_options.{self.name}.class_balanced_beta must be in (0, 1), got {beta}"
            )

    def instance_counts(self) -> list[int]:
        """Training instances of each class (contiguous label order), from the train annotations."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for img in self.index("train").images:
            for a in img["anns"]:
                counts[a[4]] += 1
        return counts.tolist()

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(outputs.values())

    def evaluator(self) -> Evaluator:
        idx = self.index("val")
        hierarchy = None
        if self.cfg.evaluation == "oid_challenge":
            hierarchy = load_hierarchy(str(storage.path(self.cfg.data_root) / self.cfg.oid_hierarchy))
        return CocoEvaluator(
            idx.gt, idx.label_to_category, self.cfg.masks, self.cfg.coco_eval, self.cfg.evaluation, hierarchy
        )
