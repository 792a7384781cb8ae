"""Semantic segmentation: image + PNG label pairs, UperNet + auxiliary FCN head, mIoU, all at
MMSegmentation's protocol (GPPF §4.1 "follow[s] the training settings in MMSegmentation").

Layout (relative to data_root, configurable): train/images/<stem>.{jpg,png} with
train/labels/<stem>.png, and the same under val/. `train_list` / `val_list` name a text file of
stems instead of listing the image directory (Pascal VOC's ImageSets). Label pixels are class ids,
`ignore_index` (255) marks void. `reduce_zero_label` is MMSeg's (ADE20K: 0 = "other" becomes
ignore, every other id drops by one); `label_map` then remaps ids (COCO-Stuff's sparse ids); ids
missing from a non-empty map become ignore.

Training (task_plugins.segmentation.task.transforms): a keep-ratio resize to `scale` x a ratio from
`ratio_range`, a random `input_size` crop redrawn while one class covers >= `cat_max_ratio` of it,
a flip, MMSeg's photometric distortion, padding to the crop size (label: ignore). The loss is
MMSeg's cross-entropy, averaged over every pixel of the crop (`avg_non_ignore` false, MMSeg's
default). Evaluation: each image at its keep-ratio test size (`scale`), whole or sliding-window
(`eval_mode`), logits resized back to the label's original size, and mIoU accumulated there.
Evaluation batches are ragged (each image and label its own size, gppf.io.batches) and are
padded on the device.

Pseudo-labels (gppf.tools.pseudo_labels) are written in this layout at the images' original size: the
teacher's class where its softmax is >= `confidence` (0.3), ignore_index elsewhere, in raw ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.registry import register_task
from gppf.api.task import DataSource, Evaluator, FeatureInfo, Task
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.batches import pad_stack, rows
from gppf.io.images import IMAGENET_MEAN, BadSampleError, open_image, sample_rng, to_chw_uint8
from task_plugins.common import paired_files
from task_plugins.pseudo_label_formats import confident_labels, label_image, link_image, raw_label_ids
from task_plugins.segmentation import transforms as T
from task_plugins.segmentation.upernet import UperNetWithAux

if TYPE_CHECKING:
    from gppf.config.cpf import PseudoLabelConfig
    from gppf.io.storage import UriPath

EVAL_MODES = ("whole", "slide")
PAD_COLOUR = np.round(IMAGENET_MEAN * 255).astype(np.uint8)  # normalises to ~0


@dataclass
class SegmentationConfig(TaskConfig):
    num_classes: int = 0  # required
    ignore_index: int = 255
    input_size: int = 512  # the training crop (MMSeg's crop_size) and the sliding window
    train_images: str = "train/images"
    train_labels: str = "train/labels"
    val_images: str = "val/images"
    val_labels: str = "val/labels"
    train_list: str = ""  # optional: a file of image stems, one per line (relative to data_root)
    val_list: str = ""
    label_map: dict[int, int] = field(default_factory=dict)
    reduce_zero_label: bool = False  # MMSeg's: 0 -> ignore, id -> id - 1 (ADE20K), before label_map
    # MMSeg's ADE20K / COCO-Stuff 164k / VOC 2012 aug pipeline (task_plugins.segmentation.task.transforms):
    # keep-ratio resize bounds (long side, short side); empty: (4 x input_size, input_size),
    # MMSeg's (2048, 512) for its 512 crop
    scale: tuple[int, ...] = ()
    ratio_range: tuple[float, float] = (0.5, 2.0)  # training: scale x a ratio drawn from this
    cat_max_ratio: float = 0.75  # training crop: redrawn while one class covers this much of it
    flip_prob: float = 0.5
    photometric: bool = True  # MMSeg's PhotoMetricDistortion
    avg_non_ignore: bool = False  # MMSeg's CrossEntropyLoss: False = mean over every crop pixel
    eval_mode: str = "whole"  # "whole": one forward per image; "slide": input_size windows
    slide_stride: int = 341  # MMSeg's stride of 512-pixel windows
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


def original_logits(
    logits: torch.Tensor, batch: dict[str, Any], i: int, size: tuple[int, int]
) -> torch.Tensor:
    """Image i's [C, H, W] logits at its original size `size`, as MMSeg's postprocessing: resized
    to the (padded) network input, the padding cut off (`batch["size"]`, the image's own input
    size; absent: no padding), resized to the original size (bilinear, align_corners=False)."""
    x = logits[i : i + 1].float()
    if "image" in batch and torch.is_tensor(batch["image"]):
        x = match_size(x, batch["image"])
    if "size" in batch:
        h, w = (int(v) for v in batch["size"][i])
        x = x[..., :h, :w]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[0]


class MIoUEvaluator(Evaluator):
    """mIoU (MMSeg's IoUMetric) from a confusion matrix over every pixel of the labels at their
    original resolution, except `ignore_index`: each prediction is brought to its label's size
    (`original_logits`), never the label to the prediction's."""

    primary = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int):
        self.n = num_classes
        self.ignore = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        for i, gt in enumerate(rows(batch["mask"])):
            pred = original_logits(outputs, batch, i, tuple(gt.shape[-2:])).argmax(0).flatten()
            gt = gt.flatten().to(pred.device)
            keep = gt != self.ignore
            idx = gt[keep].long() * self.n + pred[keep].long()
            self.conf += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n).double().cpu()

    def state(self) -> torch.Tensor:
        return self.conf.flatten().clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.conf = state.to(torch.float64).reshape(self.n, self.n).clone()

    def compute(self) -> dict[str, float]:
        tp = self.conf.diag()
        union = self.conf.sum(0) + self.conf.sum(1) - tp
        present = union > 0  # MMSeg's nanmean: a class in neither labels nor predictions has no IoU
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

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Training crops arrive stacked. Evaluation images arrive ragged (each at its own test
        size): they are padded into one batch with 0, the mean colour after normalisation, and
        `size` keeps each one's (h, w); labels stay a list at their original sizes."""
        out = super().to_device(batch, device)
        if isinstance(out.get("image"), list):
            out["image"], sizes = pad_stack(out["image"], 0.0)
            out["size"] = sizes.to(device)
        if "mask" in out:
            m = out["mask"]
            out["mask"] = [x.long() for x in m] if isinstance(m, list) else m.long()
        return out

    @property
    def scale(self) -> tuple[int, int]:
        """(long, short) bounds of the keep-ratio resize (training multiplies them by a ratio)."""
        s = self.cfg.scale
        return (int(s[0]), int(s[1])) if s else (4 * self.cfg.input_size, self.cfg.input_size)

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
        c, where = self.cfg, f"tasks.{self.name}"
        if c.num_classes <= 0:
            raise ValueError(f"{where}.num_classes must be set (> 0) for a segmentation task")
        if c.scale and (len(c.scale) != 2 or min(c.scale) < 1):
            raise ValueError(f"{where}.scale must be two positive sizes (long, short side), got {c.scale}")
        if len(c.ratio_range) != 2 or not 0 < c.ratio_range[0] <= c.ratio_range[1]:
            raise ValueError(f"{where}.ratio_range must be (lo, hi) with 0 < lo <= hi, got {c.ratio_range}")
        if not 0 < c.cat_max_ratio <= 1:
            raise ValueError(f"{where}.cat_max_ratio must be in (0, 1] (1: off), got {c.cat_max_ratio}")
        if not 0 <= c.flip_prob <= 1:
            raise ValueError(f"{where}.flip_prob must be in [0, 1], got {c.flip_prob}")
        if c.eval_mode not in EVAL_MODES:
            raise ValueError(f"{where}.eval_mode must be one of {', '.join(EVAL_MODES)}, got {c.eval_mode!r}")
        if c.eval_mode == "slide" and not 0 < c.slide_stride <= c.input_size:
            raise ValueError(
                f"{where}.slide_stride must be in (0, input_size={c.input_size}], got {c.slide_stride}"
            )

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
        ignore = self.cfg.ignore_index
        if self.cfg.reduce_zero_label:  # MMSeg's LoadAnnotations(reduce_zero_label=True)
            arr = np.where(arr == 0, ignore, arr - 1)
            arr[arr == ignore - 1] = ignore
        if self.cfg.label_map:
            lut = np.full(max(256, arr.max() + 1), ignore, dtype=np.int64)
            for k, v in self.cfg.label_map.items():
                lut[int(k)] = v
            lut[ignore] = ignore
            arr = lut[arr]
        bad = (arr >= self.cfg.num_classes) & (arr != ignore)
        if bad.any():
            raise BadSampleError(
                f"task {self.name!r}: label {path} has class id {int(arr[bad][0])} outside "
                f"[0, {self.cfg.num_classes}) (ignore index {ignore})"
            )
        return arr.astype(self._mask_dtype())

    def _test_image(self, path: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image at its test size (MMSeg's Resize(scale, keep_ratio=True)) and its original (h, w)."""
        img = open_image(path, self.name, f"image {path}")
        w, h = img.size
        nw, nh = T.rescale_size(w, h, self.scale)
        return T.resize_image(torch.from_numpy(to_chw_uint8(img)), (nh, nw)), (h, w)

    def _train_sample(self, ipath: str, lpath: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        c, size = self.cfg, self.cfg.input_size
        rng = sample_rng(seed, ipath)
        img = open_image(ipath, self.name, f"image {ipath}")
        label = torch.from_numpy(self._load_label(lpath, img.size, ipath))
        nw, nh = T.rescale_size(*img.size, T.random_scale(rng, self.scale, tuple(c.ratio_range)))
        image = T.resize_image(torch.from_numpy(to_chw_uint8(img)), (nh, nw))
        label = T.resize_label(label, (nh, nw))
        y0, y1, x0, x1 = T.crop_box(rng, label.numpy(), size, c.cat_max_ratio, c.ignore_index)
        image, label = image[:, y0:y1, x0:x1], label[y0:y1, x0:x1]
        if rng.random() < c.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        if c.photometric:
            hwc = T.photometric_distortion(rng, hwc)
        out_img = np.empty((3, size, size), dtype=np.uint8)
        out_img[:] = PAD_COLOUR[:, None, None]  # 0 after normalisation, as MMSeg pads normalised images
        out_img[:, : hwc.shape[0], : hwc.shape[1]] = hwc.transpose(2, 0, 1)
        out_lbl = np.full((size, size), c.ignore_index, dtype=self._mask_dtype())
        out_lbl[: label.shape[0], : label.shape[1]] = label.numpy()
        return out_img, out_lbl

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        if train:
            size = self.cfg.input_size
            images = np.empty((n, 3, size, size), dtype=np.uint8)
            masks = np.empty((n, size, size), dtype=self._mask_dtype())
            for i in range(n):
                images[i], masks[i] = self._train_sample(str(batch["image"][i]), str(batch["label"][i]), seed)
            return {"image": images, "mask": masks}
        images, masks = np.empty(n, dtype=object), np.empty(n, dtype=object)
        for i in range(n):
            ipath, lpath = str(batch["image"][i]), str(batch["label"][i])
            image, (h, w) = self._test_image(ipath)
            images[i] = image.numpy()
            masks[i] = self._load_label(lpath, (w, h), ipath)  # the original resolution
        return {"image": images, "mask": masks}

    def infer(self, forward, batch: dict[str, Any]) -> torch.Tensor:
        """Logits at the (padded) input size: one forward (MMSeg's whole inference), or
        input_size windows every slide_stride pixels averaged where they overlap (slide)."""
        x = batch["image"]
        if self.cfg.eval_mode == "whole":
            return match_size(forward(x), x)
        n, _, h, w = x.shape
        total, count = None, x.new_zeros(1, 1, h, w)
        for y0, y1, x0, x1 in T.slide_windows(h, w, self.cfg.input_size, self.cfg.slide_stride):
            crop = x[:, :, y0:y1, x0:x1]
            logits = match_size(forward(crop), crop).float()
            if total is None:
                total = x.new_zeros(n, logits.shape[1], h, w, dtype=torch.float32)
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
        return total / count

    # -- pseudo-labels: image + label PNG (class id where the teacher is confident, else ignore) --
    def pseudo_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        images = np.empty(n, dtype=object)
        orig, size = np.empty((n, 2), dtype=np.int64), np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            image, orig[i] = self._test_image(str(batch["path"][i]))  # as evaluation sees images
            images[i], size[i] = image.numpy(), image.shape[-2:]
        # `size`: each image's own part of the padded batch, which `infer`'s logits cover
        return {"image": images, "size": size, "orig_size": orig, "path": np.asarray(batch["path"])}

    def write_pseudo_labels(
        self, outputs: torch.Tensor, inputs: dict[str, Any], out: Path, cfg: PseudoLabelConfig
    ) -> list[dict[str, Any]]:
        records = []
        for i in range(len(inputs["path"])):
            h, w = (int(v) for v in inputs["orig_size"][i])
            logits = original_logits(outputs, inputs, i, (h, w))
            ids = confident_labels(logits.softmax(0).cpu().numpy(), cfg.confidence, self.cfg.ignore_index)
            src = Path(str(inputs["path"][i]))
            link_image(src, out / self.cfg.train_images / src.name)
            png = out / self.cfg.train_labels / f"{src.stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            label_image(self._raw_ids(ids)).save(png)
            records.append({"stem": src.stem, "kept": float((ids != self.cfg.ignore_index).mean())})
        return records

    def _raw_ids(self, ids: np.ndarray) -> np.ndarray:
        """Class ids as this task's label files store them (the inverse of _load_label's maps)."""
        ignore = self.cfg.ignore_index
        ids = raw_label_ids(ids, self.cfg.label_map, ignore)
        if self.cfg.reduce_zero_label:
            ids = np.where(ids == ignore, ignore, ids + 1)
        return ids

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
        """MMSeg's CrossEntropyLoss: the sum over non-ignored pixels divided by every pixel of the
        batch (avg_non_ignore=False, its default) or by the non-ignored ones (True; then a crop
        that is all void gives 0, not NaN)."""
        logits = match_size(logits, mask)
        total = F.cross_entropy(logits, mask, ignore_index=self.cfg.ignore_index, reduction="sum")
        if self.cfg.avg_non_ignore:
            return total / (mask != self.cfg.ignore_index).sum().clamp(min=1)
        return total / mask.numel()

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(outputs, tuple):  # UperNet in training: (main, auxiliary FCN)
            main, aux = outputs
            return self._ce(main, batch["mask"]) + self.cfg.aux_weight * self._ce(aux, batch["mask"])
        return self._ce(outputs, batch["mask"])

    def evaluator(self) -> Evaluator:
        return MIoUEvaluator(self.cfg.num_classes, self.cfg.ignore_index)
