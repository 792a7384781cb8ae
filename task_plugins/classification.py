"""Image classification: ImageFolder or Parquet sources, GAP + linear head, top-1/top-5.

Augmentations at GPPF's ImageNet-21K settings come from timm: RandAugment (`auto_augment`, e.g.
"rand-m9-mstd0.5-inc1") and Random Erasing (`reprob`) per image in `pre`, Mixup/CutMix with label
smoothing (`mixup`, `cutmix`, `label_smoothing`) per batch on the worker. Per-sample randomness is
seeded from (stream seed, sample) and per-batch randomness from (seed, step, rank), so a resumed
run repeats them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.nn import functional as F

from gppf.api.registry import register_task
from gppf.api.task import DataSource, Evaluator, FeatureInfo, Task
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.images import (
    BadSampleError,
    center_crop_box,
    open_image,
    random_resized_crop_box,
    sample_rng,
    to_chw,
    to_chw_uint8,
)
from task_plugins.common import image_files


@dataclass
class ClassificationConfig(TaskConfig):
    format: str = "auto"  # "imagefolder" (split/<class>/<image>), "parquet" (split/*.parquet) or "auto"
    num_classes: int = 0  # 0: the number of class folders (ImageFolder) or max label + 1 (Parquet)
    train_split: str = "train"
    val_split: str = "val"
    image_column: str = "image"  # Parquet: encoded image bytes
    label_column: str = "label"  # Parquet: integer class id
    label_smoothing: float = 0.0
    crop_scale_min: float = 0.35
    auto_augment: str = ""  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" ("" = off)
    reprob: float = 0.0  # timm RandomErasing probability (mode "pixel")
    mixup: float = 0.0  # Mixup alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    # > 0: evaluation resizes the shorter side to this, then takes the centre input_size crop
    # (GPPF App. D.2's downstream protocol: 256, then 224); 0: the centre square of the shorter
    # side, resized to input_size
    eval_resize: int = 0


class TopKEvaluator(Evaluator):
    primary = "top1"

    def __init__(self, num_classes: int):
        self.k5 = num_classes >= 5
        self.counts = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@5, total

    def update(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        y = batch["label"].to(outputs.device)
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        self.counts[0] += (top[:, 0] == y).sum().item()
        self.counts[1] += (top == y[:, None]).any(1).sum().item()
        self.counts[2] += y.numel()

    def state(self) -> torch.Tensor:
        return self.counts.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.counts = state.to(torch.float64).clone()

    def compute(self) -> dict[str, float]:
        n = max(self.counts[2].item(), 1.0)
        out = {"top1": 100.0 * self.counts[0].item() / n}
        if self.k5:
            out["top5"] = 100.0 * self.counts[1].item() / n
        return out


class ClassificationHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(feats[-1].mean((2, 3)))


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, for 0 bits too. With "inc1" at the top magnitude (m9 + noise reaches 10)
    timm keeps 0 bits: older Pillow returned a black image, Pillow 12+ raises ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _class_names(root: Path) -> list[str]:
    return storage.subdirs(root)


def _list_imagefolder(root: Path, classes: list[str], task: str) -> list[dict]:
    """Items of one split; class ids come from the *train* split's folders, so a split missing a
    class (or with an extra one) cannot shift the labels."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for c in _class_names(root):
        if c not in index:
            raise FileNotFoundError(f"task {task!r}: class folder {root / c} is not in the train split")
        for f in image_files(root / c):
            items.append({"path": str(f), "label": index[c]})
    return items


@register_task("classification")
class ClassificationTask(Task):
    config_cls = ClassificationConfig
    cfg: ClassificationConfig

    def _split_dir(self, split: str) -> Path:
        name = self.cfg.train_split if split == "train" else self.cfg.val_split
        return storage.path(self.cfg.data_root) / name

    def _format(self) -> str:
        if self.cfg.format != "auto":
            if self.cfg.format not in ("imagefolder", "parquet"):
                raise ValueError(f"tasks.{self.name}.format must be imagefolder, parquet or auto")
            return self.cfg.format
        return "parquet" if any(self._split_dir("train").glob("*.parquet")) else "imagefolder"

    def check_data(self) -> None:
        for split in ("train", "val"):
            d = self._split_dir(split)
            if not d.is_dir():
                raise FileNotFoundError(f"task {self.name!r}: {split} split directory {d} does not exist")
            if not self.source(split).units:
                raise FileNotFoundError(f"task {self.name!r}: {split} split directory {d} holds no images")
        if self.cfg.num_classes <= 0:
            self.cfg.num_classes = self._infer_num_classes()
        if (self.cfg.mixup > 0 or self.cfg.cutmix > 0) and self.cfg.batch_size % 2:
            raise ValueError(
                f"tasks.{self.name}.batch_size must be even with Mixup/CutMix (timm pairs images)"
            )
        if self.cfg.auto_augment:
            self._randaugment()  # a malformed spec fails here, on the driver, naming the task

    def check_extra_root(self, other: Task) -> None:
        """An ImageFolder numbers its classes by its own folders: an extra root needs the same ones."""
        if self._format() != "imagefolder":
            return
        mine = _class_names(self._split_dir("train"))
        theirs = _class_names(other._split_dir("train"))
        if mine != theirs:
            raise ValueError(
                f"task {self.name!r}: extra train root {other.cfg.data_root} has {len(theirs)} class "
                f"folders, not data_root's {len(mine)} (or other names): the class ids would not match"
            )

    def _infer_num_classes(self) -> int:
        if self._format() == "imagefolder":
            return len(_class_names(self._split_dir("train")))
        top = 0
        for f in sorted(self._split_dir("train").glob("*.parquet"), key=str):
            col = storage.parquet_file(f).read(columns=[self.cfg.label_column]).column(0)
            top = max(top, int(np.max(col.to_numpy())) + 1)
        return top

    def source(self, split: str) -> DataSource:
        d = self._split_dir(split)
        if self._format() == "parquet":
            files = sorted(str(f) for f in d.glob("*.parquet"))
            counts = {f: storage.parquet_file(f).metadata.num_rows for f in files}
            cols = [self.cfg.image_column, self.cfg.label_column]
            return DataSource(
                units=files,
                read=lambda units: storage.read_parquet(units).select_columns(cols),
                rows_per_unit=max(1, sum(counts.values()) // max(1, len(files))),  # the mean
                unit_rows=counts.__getitem__,
                load=lambda units: storage.parquet_rows(units, cols),
            )
        train = self._split_dir("train")
        classes = _class_names(train) if train.is_dir() else []
        items = _list_imagefolder(d, classes, self.name) if d.is_dir() else []
        return DataSource(units=items, read=items_dataset)

    def _randaugment(self):
        from timm.data import auto_augment
        from timm.data.auto_augment import rand_augment_transform

        size = self.cfg.input_size
        hparams = {
            "translate_const": int(size * 0.45),
            "img_mean": tuple(int(round(255 * m)) for m in (0.485, 0.456, 0.406)),
        }
        transform = rand_augment_transform(self.cfg.auto_augment, hparams)
        for op in transform.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
        return transform

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        from timm.data.random_erasing import RandomErasing

        augment = self._randaugment() if train and self.cfg.auto_augment else None
        erase = (
            RandomErasing(self.cfg.reprob, mode="pixel", device="cpu")
            if train and self.cfg.reprob > 0
            else None
        )
        size = self.cfg.input_size
        if "path" in batch:
            srcs, names = list(batch["path"]), [str(p) for p in batch["path"]]
            labels = batch["label"]
        else:
            srcs = list(batch[self.cfg.image_column])
            names = [f"Parquet row with {len(s)}-byte image" for s in srcs]
            labels = batch[self.cfg.label_column]
        # uint8 through the object store (normalised on the device), except with Random Erasing:
        # timm erases with normal noise in normalised space.
        images = np.empty((len(srcs), 3, size, size), dtype=np.uint8 if erase is None else np.float32)
        for i, (src, name) in enumerate(zip(srcs, names)):
            label = int(labels[i])
            if not 0 <= label < self.cfg.num_classes:
                raise BadSampleError(
                    f"task {self.name!r}: class id {label} of {name} is outside [0, {self.cfg.num_classes})"
                )
            img = open_image(src if isinstance(src, (bytes, bytearray)) else str(src), self.name, name)
            if train:
                rng = sample_rng(seed, src if isinstance(src, (bytes, bytearray)) else name)
                box = random_resized_crop_box(rng, *img.size, scale=(self.cfg.crop_scale_min, 1.0))
                img = img.resize((size, size), Image.BILINEAR, box=box)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                # timm's augmentations draw from the global RNGs (Python, NumPy, torch): seed them per sample.
                random.seed(int(rng.integers(2**62)))
                np.random.seed(int(rng.integers(2**32)))
                torch.manual_seed(int(rng.integers(2**62)))
                if augment is not None:
                    img = augment(img)
            elif self.cfg.eval_resize:
                img = _resize_then_center_crop(img, self.cfg.eval_resize, size)
            else:
                img = img.resize((size, size), Image.BILINEAR, box=center_crop_box(*img.size))
            images[i] = to_chw_uint8(img) if erase is None else to_chw(img)
            if erase is not None:
                images[i] = erase(torch.from_numpy(images[i])).numpy()
        return {"image": images, "label": np.asarray(labels, dtype=np.int64)}

    def class_names(self) -> list[str]:
        train = self._split_dir("train")
        if not self.cfg.class_names and self._format() == "imagefolder" and train.is_dir():
            return [c.replace("_", " ") for c in _class_names(train)]
        return super().class_names()

    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        return ClassificationHead(features[-1].channels, self.cfg.num_classes)

    def train_batch(
        self, batch: dict[str, torch.Tensor], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        if not (self.cfg.mixup > 0 or self.cfg.cutmix > 0):
            return batch
        from timm.data import Mixup

        mix = Mixup(
            mixup_alpha=self.cfg.mixup,
            cutmix_alpha=self.cfg.cutmix,
            label_smoothing=self.cfg.label_smoothing,
            num_classes=self.cfg.num_classes,
        )
        np.random.seed(int(rng.integers(2**32)))  # timm's Mixup draws from NumPy's global RNG
        image, target = mix(batch["image"], batch["label"])
        return {**batch, "image": image, "target": target}

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "target" in batch:  # Mixup/CutMix: soft targets, label smoothing already folded in
            return torch.sum(-batch["target"] * F.log_softmax(outputs, dim=-1), dim=-1).mean()
        return F.cross_entropy(outputs, batch["label"], label_smoothing=self.cfg.label_smoothing)

    def evaluator(self) -> Evaluator:
        return TopKEvaluator(self.cfg.num_classes)


def _resize_then_center_crop(img: Image.Image, short: int, size: int) -> Image.Image:
    """The shorter side to `short` (aspect kept), then the centre size x size crop: torchvision's
    Resize(short) + CenterCrop(size), the downstream-classification test transform."""
    w, h = img.size
    long = int(short * max(w, h) / min(w, h))  # torchvision truncates the longer side
    nw, nh = (short, long) if w <= h else (long, short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
