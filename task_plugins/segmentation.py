"""Semantic segmentation: image + PNG label pairs, UperNet + auxiliary FCN head, mIoU.

Layout (relative to data_root, configurable): train/images/<stem>.{jpg,png} with
train/labels/<stem>.png, and the same under val/. `train_list` / `val_list` name a text file of
stems instead of listing the image directory (Pascal VOC's ImageSets). Label pixels are class ids,
`ignore_index` (255) marks void. `label_map` remaps raw ids first (ADE20K's 0 = "other", COCO-Stuff's
sparse ids); raw ids missing from a non-empty map become ignore.

Pseudo-labels (gppf.pseudo_labels) are written in this layout: the teacher's class where its
softmax is >= `confidence` (0.3), ignore_index elsewhere, in raw ids when there is a label_map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from gppf import storage
from gppf.data.images import BadSampleError, open_image, random_resized_crop_box, sample_rng, to_chw_uint8
from gppf.data.stream import items_dataset
from gppf.registry import register_task
from gppf.task import DataSource, Evaluator, FeatureInfo, Task, TaskConfig
from task_plugins.pseudo_label_formats import confident_labels, label_image, link_image, raw_label_ids
from task_plugins.upernet import UperNetWithAux

if TYPE_CHECKING:
    from gppf.pseudo_labels import PseudoLabelConfig
    from gppf.storage import UriPath

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


@dataclass
class SegmentationConfig(TaskConfig):
    num_classes: int = 0  # required
    ignore_index: int = 255
    train_images: str = "train/images"
    train_labels: str = "train/labels"
    val_images: str = "val/images"
    val_labels: str = "val/labels"
    train_list: str = ""  # optional: a file of image stems, one per line (relative to data_root)
    val_list: str = ""
    label_map: dict[int, int] = field(default_factory=dict)
    head: str = "upernet"  # "upernet" (UperNet + auxiliary FCN, GPPF §4.1) or "simple" (light FPN)
    head_channels: int = 512  # MMSeg's UperNet width
    aux_channels: int = 256
    aux_weight: float = 0.4  # MMSeg's UperNet configs: auxiliary FCN loss weight 0.4
    aux_index: int = -2  # the backbone output the auxiliary head reads: res4 of a ResNet


def match_size(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the mask's resolution (an input size that is not a multiple of the stride)."""
    if logits.shape[-2:] == mask.shape[-2:]:
        return logits
    return F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)


def paired_files(
    task: str, data_root: str, img_dir: Path | UriPath, other_dir: Path | UriPath, listing: str, key: str
) -> list[dict]:
    """One split's items `{"image": <image>, key: other_dir/<stem>.png}`: every image of `img_dir`,
    or the stems a list file names (`listing`, relative to `data_root`; VOC's lists hold one stem
    per line, SBD-style lists "image label" path pairs). Segmentation labels and depth maps alike."""
    if not img_dir.is_dir():
        return []
    if not listing:
        images = [f for f in sorted(img_dir.iterdir()) if f.suffix in IMAGE_EXTS]
    else:
        path = storage.path(data_root) / listing
        if not path.is_file():
            raise FileNotFoundError(f"task {task!r}: image list {path} does not exist")
        stems = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
        images = []
        for stem in stems:
            found = [img_dir / f"{stem}{ext}" for ext in IMAGE_EXTS if (img_dir / f"{stem}{ext}").is_file()]
            if not found:
                raise FileNotFoundError(
                    f"task {task!r}: {listing} names {stem!r}, but {img_dir} has no such image"
                )
            images.append(found[0])
    return [{"image": str(f), key: str(other_dir / f"{f.stem}.png")} for f in images]


class MIoUEvaluator(Evaluator):
    """mIoU from a confusion matrix accumulated over all pixels not equal to ignore_index."""

    primary = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int):
        self.n = num_classes
        self.ignore = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        pred = match_size(outputs, batch["mask"]).argmax(1).flatten().cpu()
        gt = batch["mask"].flatten().cpu()
        keep = gt != self.ignore
        idx = gt[keep].long() * self.n + pred[keep].long()
        self.conf += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n).double()

    def state(self) -> torch.Tensor:
        return self.conf.flatten().clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.conf = state.to(torch.float64).reshape(self.n, self.n).clone()

    def compute(self) -> dict[str, float]:
        tp = self.conf.diag()
        union = self.conf.sum(0) + self.conf.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        acc = tp.sum() / self.conf.sum().clamp(min=1)
        return {
            "mIoU": 100.0 * (iou.mean().item() if present.any() else 0.0),
            "pixel_acc": 100.0 * acc.item(),
        }


class SimpleSegHead(nn.Module):
    """Lateral 1x1 convs, upsample-and-sum to stride 4, conv-GN-ReLU, classifier (GroupNorm: no
    cross-task BN in heads)."""

    def __init__(self, features: list[FeatureInfo], num_classes: int, channels: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(f.channels, channels, 1) for f in features)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(min(32, channels // 4) or 1, channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.stride = features[0].reduction

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
            for lat, f in zip(self.lateral, feats)
        )
        logits = self.classifier(self.fuse(x))
        return F.interpolate(logits, scale_factor=self.stride, mode="bilinear", align_corners=False)


@register_task("segmentation")
class SegmentationTask(Task):
    config_cls = SegmentationConfig
    cfg: SegmentationConfig

    def _mask_dtype(self) -> type:
        """The smallest integer type holding every class id and the ignore index: masks travel
        through the object store in it (int64 masks outweighed the uint8 images 8 to 3) and
        become int64 on the device (`to_device`), as cross_entropy wants."""
        top = max(self.cfg.num_classes - 1, self.cfg.ignore_index)
        return np.uint8 if top <= 255 else np.int16 if top <= 32767 else np.int32

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        out = super().to_device(batch, device)
        if "mask" in out:
            out["mask"] = out["mask"].long()
        return out

    def _dirs(self, split: str) -> tuple[Path | UriPath, Path | UriPath]:
        root = storage.path(self.cfg.data_root)
        if split == "train":
            return root / self.cfg.train_images, root / self.cfg.train_labels
        return root / self.cfg.val_images, root / self.cfg.val_labels

    def _pairs(self, split: str) -> list[dict]:
        listing = self.cfg.train_list if split == "train" else self.cfg.val_list
        return paired_files(self.name, self.cfg.data_root, *self._dirs(split), listing, "label")

    def check_config(self) -> None:
        """The config's own errors, no files (a multihead task checks its heads with this)."""
        if self.cfg.num_classes <= 0:
            raise ValueError(f"tasks.{self.name}.num_classes must be set (> 0) for a segmentation task")

    def check_data(self) -> None:
        self.check_config()
        for split in ("train", "val"):
            d = self._dirs(split)[0]
            pairs = self._pairs(split)
            if not d.is_dir():
                raise FileNotFoundError(f"task {self.name!r}: {split} image directory {d} does not exist")
            if not pairs:
                raise FileNotFoundError(f"task {self.name!r}: {split} image directory {d} holds no images")
            missing = storage.missing([p["label"] for p in pairs])
            if missing:
                raise FileNotFoundError(
                    f"task {self.name!r}: {len(missing)} {split} images have no label PNG, e.g. {missing[0]}"
                )

    def source(self, split: str) -> DataSource:
        return DataSource(units=self._pairs(split), read=items_dataset)

    def _load_label(self, path: str, size: tuple[int, int], image_path: str) -> np.ndarray:
        lbl = open_image(path, self.name, f"label {path}", mode="")
        if lbl.size != size:
            raise BadSampleError(
                f"task {self.name!r}: label {path} is {lbl.size[0]}x{lbl.size[1]} but its image "
                f"{image_path} is {size[0]}x{size[1]}"
            )
        arr = np.asarray(lbl)
        if arr.ndim != 2:
            raise BadSampleError(f"task {self.name!r}: label {path} must be a single-channel PNG")
        arr = arr.astype(np.int64)
        if self.cfg.label_map:
            lut = np.full(max(256, arr.max() + 1), self.cfg.ignore_index, dtype=np.int64)
            for k, v in self.cfg.label_map.items():
                lut[int(k)] = v
            lut[self.cfg.ignore_index] = self.cfg.ignore_index
            arr = lut[arr]
        bad = (arr >= self.cfg.num_classes) & (arr != self.cfg.ignore_index)
        if bad.any():
            raise BadSampleError(
                f"task {self.name!r}: label {path} has class id {int(arr[bad][0])} outside "
                f"[0, {self.cfg.num_classes}) (ignore index {self.cfg.ignore_index})"
            )
        return arr.astype(np.int32)  # int32 PIL images ("I") resize with NEAREST; uint8 would wrap ids > 255

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        size = self.cfg.input_size
        n = len(batch["image"])
        images = np.empty((n, 3, size, size), dtype=np.uint8)
        masks = np.empty((n, size, size), dtype=self._mask_dtype())
        for i in range(n):
            ipath, lpath = str(batch["image"][i]), str(batch["label"][i])
            img = open_image(ipath, self.name, f"image {ipath}")
            lbl = Image.fromarray(self._load_label(lpath, img.size, ipath))
            if train:
                rng = sample_rng(seed, ipath)
                box = random_resized_crop_box(rng, *img.size, scale=(0.3, 1.0))
                img = img.resize((size, size), Image.BILINEAR, box=box)
                lbl = lbl.resize((size, size), Image.NEAREST, box=box)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                    lbl = lbl.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                img = img.resize((size, size), Image.BILINEAR)
                lbl = lbl.resize((size, size), Image.NEAREST)
            images[i] = to_chw_uint8(img)
            masks[i] = np.asarray(lbl)
        return {"image": images, "mask": masks}

    # -- pseudo-labels: image + label PNG (class id where the teacher is confident, else ignore) --
    def pseudo_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size, n = self.cfg.input_size, len(batch["path"])
        images = np.empty((n, 3, size, size), dtype=np.uint8)
        orig = np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            path = str(batch["path"][i])
            img = open_image(path, self.name, f"image {path}")
            orig[i] = (img.height, img.width)
            images[i] = to_chw_uint8(img.resize((size, size), Image.BILINEAR))  # as evaluation resizes
        return {"image": images, "orig_size": orig, "path": np.asarray(batch["path"])}

    def write_pseudo_labels(
        self, outputs: torch.Tensor, inputs: dict[str, np.ndarray], out: Path, cfg: PseudoLabelConfig
    ) -> list[dict[str, Any]]:
        records = []
        for i, logits in enumerate(outputs.float().cpu()):
            h, w = (int(v) for v in inputs["orig_size"][i])
            logits = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)
            ids = confident_labels(logits[0].softmax(0).numpy(), cfg.confidence, self.cfg.ignore_index)
            src = Path(str(inputs["path"][i]))
            link_image(src, out / self.cfg.train_images / src.name)
            png = out / self.cfg.train_labels / f"{src.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            label_image(raw_label_ids(ids, self.cfg.label_map, self.cfg.ignore_index)).save(png)
            records.append({"stem": src.stem, "kept": float((ids != self.cfg.ignore_index).mean())})
        return records

    def finish_pseudo_labels(self, records: list[dict[str, Any]], out: Path) -> dict[str, float]:
        if self.cfg.train_list:  # a listed layout (Pascal VOC's ImageSets) lists the labelled stems
            listing = out / self.cfg.train_list
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(f"{r['stem']}\n" for r in records))
        kept = [r["kept"] for r in records]
        return {"images": len(records), "labelled_pixels_pct": 100.0 * float(np.mean(kept)) if kept else 0.0}

    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        if self.cfg.head == "upernet":
            return UperNetWithAux(
                features,
                self.cfg.num_classes,
                self.cfg.head_channels,
                self.cfg.aux_channels,
                self.cfg.aux_index,
            )
        if self.cfg.head == "simple":
            return SimpleSegHead(features, self.cfg.num_classes, self.cfg.head_channels)
        raise ValueError(f"tasks.{self.name}.head must be 'upernet' or 'simple', got {self.cfg.head!r}")

    def _ce(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = match_size(logits, mask)
        # Sum / valid pixels: a crop that is all void gives 0, not NaN (which would stop the run).
        valid = (mask != self.cfg.ignore_index).sum().clamp(min=1)
        return F.cross_entropy(logits, mask, ignore_index=self.cfg.ignore_index, reduction="sum") / valid

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(outputs, tuple):  # UperNet in training: (main, auxiliary FCN)
            main, aux = outputs
            return self._ce(main, batch["mask"]) + self.cfg.aux_weight * self._ce(aux, batch["mask"])
        return self._ce(outputs, batch["mask"])

    def evaluator(self) -> Evaluator:
        return MIoUEvaluator(self.cfg.num_classes, self.cfg.ignore_index)
