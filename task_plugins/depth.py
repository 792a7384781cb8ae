"""Monocular depth estimation, KITTI / BTS style (GPPF Table 4's depth transfer): image + sparse
depth PNG pairs, a multi-scale GroupNorm decoder, the scale-invariant log loss, Eigen's metrics.

Layout (relative to data_root, configurable): train/images/<stem>.{jpg,png} with
train/depth/<stem>.png, and the same under val/. `train_list` / `val_list` name a text file of
stems instead of listing the image directory (the first token of each line; BTS's KITTI lists hold
"image depth focal" lines, whose image stem is taken). Depth PNGs are KITTI's format: uint16,
value = metres x `depth_scale` (256), 0 = no measurement (projected LiDAR is sparse).

Sparse depth is never interpolated: every resize of a depth map is NEAREST, so a pixel is either a
real measurement or 0, and predictions are resized to the ground truth, never the other way round.

Metrics (`DepthEvaluator`): d1, d2, d3 (fraction of pixels with max(gt/pred, pred/gt) < 1.25^k),
abs_rel, sq_rel, rmse, rmse_log, log10, silog, per image over pixels with gt in
(min_depth_eval, max_depth_eval) and predictions clipped into that range (BTS's eval), averaged over
images. The primary metric is rmse, in metres: LOWER is better, unlike the other bundled tasks'
(the platform only reports metrics, it does not rank them).

Two geometries:
- square (the default, `crop_size` empty): training crops and evaluation images are resized to
  `input_size` x `input_size`, depth maps with NEAREST;
- KITTI's, as BTS runs the Eigen split (`crop_size` = (h, w), e.g. 352 x 704): nothing is
  resized. `kb_crop` (352 x 1216) cuts KITTI's benchmark region from the bottom centre of every
  frame; training takes random `crop_size` crops of it with BTS's augmentation (a rotation of up
  to `rotate_degree`, a flip, gamma / brightness / colour jitter); evaluation runs on the whole
  (cropped) frame at its own resolution (frames of different sizes are padded in the batch), the
  prediction is put back at its place in a frame of the ground truth's original size (zero
  elsewhere, so clipped to min_depth_eval), and only pixels inside `eval_crop` count: Garg's
  crop (`garg`, the Eigen split's usual) or Eigen's (`eigen`), as BTS's bts_eval.py.
`list_format: bts` reads BTS's split files ("<image> <depth> <focal>" per line, relative to the
image and depth roots; test lines whose depth is "None" are left out), e.g.
eigen_train_files_with_gt.txt / eigen_test_files_with_gt.txt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from gppf.api.registry import register_task
from gppf.api.task import DataSource, Evaluator, FeatureInfo, Task
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.batches import pad_stack, rows
from gppf.io.images import IMAGENET_MEAN, BadSampleError, open_image, sample_rng, to_chw_uint8
from task_plugins.common import paired_files, root_path
from task_plugins.segmentation.task import match_size
from task_plugins.segmentation.upernet import conv_gn_relu

DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens a 16-bit greyscale PNG
METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
EPS = 1e-3  # predictions are clamped here before the log (metres)


@dataclass
class DepthConfig(TaskConfig):
    train_images: str = "train/images"
    train_depth: str = "train/depth"
    val_images: str = "val/images"
    val_depth: str = "val/depth"
    train_list: str = ""  # optional: a file of image stems, one per line (relative to data_root)
    val_list: str = ""
    max_depth: float = 80.0  # the head predicts sigmoid x max_depth (KITTI: 80 m)
    min_depth_eval: float = 1e-3
    max_depth_eval: float = 80.0
    silog_lambda: float = 0.85  # BTS's variance focus: 1 = fully scale-invariant
    head_channels: int = 64
    depth_scale: float = 256.0  # PNG value = metres x depth_scale (KITTI)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # square geometry: train crop area (fraction)
    # "stems": list files name image stems (the default layout); "bts": BTS's split files, "<image>
    # <depth> <focal>" relative to <split>_images and <split>_depth
    list_format: str = "stems"
    # KITTI's geometry (module docstring): (h, w) training crops at the original resolution
    crop_size: tuple[int, ...] = ()
    kb_crop: tuple[int, ...] = ()  # (h, w) bottom-centre crop of every frame (KITTI: 352, 1216)
    eval_crop: str = ""  # "garg", "eigen" or "" (every valid pixel)
    rotate_degree: float = 1.0  # KITTI geometry: random rotation within +-this (BTS's KITTI setting)
    color_augment: bool = True  # KITTI geometry: BTS's gamma / brightness / colour jitter, p = 1/2


class DepthHead(nn.Module):
    """FPN-like decoder over any list of backbone outputs: a lateral 1x1 conv per level, top-down
    upsample-and-sum with a conv-GN-ReLU after each merge, conv-GN-ReLU and a 1-channel conv at the
    finest level, sigmoid x max_depth, bilinear upsampling to the input resolution. Output
    [B, 1, H, W] in metres, in (0, max_depth)."""

    def __init__(self, features: list[FeatureInfo], max_depth: float, channels: int = 64):
        super().__init__()
        if not features:
            raise ValueError("the depth head needs at least one backbone output")
        # Coarse to fine, whatever order the backbone declares its outputs in.
        self.order = sorted(range(len(features)), key=lambda i: -features[i].reduction)
        self.lateral = nn.ModuleList(nn.Conv2d(f.channels, channels, 1) for f in features)
        self.merge = nn.ModuleList(conv_gn_relu(channels, channels, 3) for _ in features[1:])
        self.out = nn.Sequential(conv_gn_relu(channels, channels, 3), nn.Conv2d(channels, 1, 3, padding=1))
        self.stride = min(f.reduction for f in features)
        self.max_depth = max_depth

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        first, *rest = self.order
        x = self.lateral[first](feats[first])
        for merge, i in zip(self.merge, rest):
            lat = self.lateral[i](feats[i])
            x = merge(lat + F.interpolate(x, size=lat.shape[-2:], mode="bilinear", align_corners=False))
        depth = torch.sigmoid(self.out(x)) * self.max_depth
        if self.stride == 1:
            return depth
        return F.interpolate(depth, scale_factor=self.stride, mode="bilinear", align_corners=False)


def match_depth(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Predictions [B, H, W] at the ground truth's size (the prediction is resized, never the sparse
    ground truth), in float32 (bf16 under autocast would cost the log its precision)."""
    if pred.dim() == 4:
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        pred = pred[:, 0]
    return pred.float()


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, lam: float) -> torch.Tensor:
    """BTS's scale-invariant log loss, 10 * sqrt(mean(d^2) - lam * mean(d)^2) with
    d = log(pred) - log(gt) over the pixels with gt > 0 of the whole batch.

    Written as var(d) + (1 - lam) * mean(d)^2 (never negative, unlike the difference in float);
    the root's argument is clamped at 1e-12 so pred == gt has a finite gradient (loss 1e-5, not 0).
    No valid pixel: exactly 0, still a function of `pred` so backward runs."""
    pred = match_depth(pred, gt)
    valid = gt > 0
    n = valid.sum()
    d = torch.where(valid, torch.log(pred.clamp(min=EPS)) - torch.log(gt.float().clamp(min=EPS)), 0.0)
    mean = d.sum() / n.clamp(min=1)
    var = torch.where(valid, (d - mean) ** 2, 0.0).sum() / n.clamp(min=1)
    loss = 10.0 * torch.sqrt((var + (1.0 - lam) * mean**2).clamp(min=1e-12))
    return loss * (n > 0)


def image_metrics(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The METRICS of one image's valid pixels (1-D tensors, float64), BTS's compute_errors."""
    ratio = torch.maximum(gt / pred, pred / gt)
    diff = gt - pred
    err = torch.log(pred) - torch.log(gt)
    return torch.stack(
        [
            (ratio < 1.25).double().mean(),
            (ratio < 1.25**2).double().mean(),
            (ratio < 1.25**3).double().mean(),
            (diff.abs() / gt).mean(),
            (diff**2 / gt).mean(),
            (diff**2).mean().sqrt(),
            (err**2).mean().sqrt(),
            (torch.log10(gt) - torch.log10(pred)).abs().mean(),
            ((err**2).mean() - err.mean() ** 2).clamp(min=0).sqrt() * 100,
        ]
    )


EVAL_CROPS = {  # bts_eval.py's fractions of the ground truth's (height, width): rows, columns
    "garg": ((0.40810811, 0.99189189), (0.03594771, 0.96405229)),
    "eigen": ((0.3324324, 0.91351351), (0.0359477, 0.96405229)),
}


def eval_crop_mask(h: int, w: int, crop: str) -> torch.Tensor:
    """[h, w] bool: the pixels Garg's or Eigen's crop keeps (all of them for "")."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    if not crop:
        return ~mask
    (r0, r1), (c0, c1) = EVAL_CROPS[crop]
    mask[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)] = True
    return mask


class DepthEvaluator(Evaluator):
    """Eigen's depth metrics per image, averaged over images. `state()` = the per-metric sums and
    the image count, so workers' states add up. rmse is in metres: lower is better.

    A batch with `offset` (KITTI's geometry) carries each ground truth at its original size: the
    prediction (of the image's part of the padded input, `size`) goes back to its place in a
    frame of that size, zero elsewhere. Otherwise prediction and ground truth are resized alike."""

    primary = "rmse"

    def __init__(self, min_depth: float, max_depth: float, crop: str = ""):
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        self.sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)

    def _pairs(self, outputs: torch.Tensor, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if "offset" not in batch:
            gt = batch["depth"].detach().cpu().double()
            return list(zip(match_depth(outputs.detach(), batch["depth"]).cpu().double(), gt))
        pred = outputs.detach().float()
        if "image" in batch and torch.is_tensor(batch["image"]):
            pred = match_size(pred, batch["image"])
        out = []
        for i, g in enumerate(rows(batch["depth"])):
            (h, w), (top, left) = (int(v) for v in batch["size"][i]), (int(v) for v in batch["offset"][i])
            frame = torch.zeros(g.shape, dtype=torch.float64)
            frame[top : top + h, left : left + w] = pred[i, 0, :h, :w].cpu().double()
            out.append((frame, g.detach().cpu().double()))
        return out

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        for p, g in self._pairs(outputs, batch):
            p = torch.nan_to_num(p, nan=self.min_depth, posinf=self.max_depth).clamp(
                self.min_depth, self.max_depth
            )
            valid = (g > self.min_depth) & (g < self.max_depth) & eval_crop_mask(*g.shape, self.crop)
            if valid.any():  # an image without measurements in range does not count
                self.sums[:-1] += image_metrics(p[valid], g[valid])
                self.sums[-1] += 1

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.sums = state.to(torch.float64).clone()

    def compute(self) -> dict[str, float]:
        n = self.sums[-1].item()
        if n == 0:
            return {k: math.nan for k in METRICS}
        return {k: (v / n).item() for k, v in zip(METRICS, self.sums[:-1])}


def crop_box(
    rng: np.random.Generator, w: int, h: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random crop of `scale` of the image's area with about the image's own aspect ratio (x 3/4 to
    4/3): every crop is resized to the same square input, as the whole image is at evaluation, so
    a wide KITTI frame is squeezed the same way in both."""
    area = rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, max(1, round(w * math.sqrt(area * aspect))))
    ch = min(h, max(1, round(h * math.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return x, y, x + cw, y + ch


@register_task("depth")
class DepthTask(Task):
    config_cls = DepthConfig
    cfg: DepthConfig

    def _dirs(self, split: str) -> tuple[Path, Path]:
        root = root_path(self.cfg.data_root)
        if split == "train":
            return root / self.cfg.train_images, root / self.cfg.train_depth
        return root / self.cfg.val_images, root / self.cfg.val_depth

    def _pairs(self, split: str) -> list[dict]:
        listing = self.cfg.train_list if split == "train" else self.cfg.val_list
        if self.cfg.list_format == "bts" and listing:
            return self._bts_pairs(split, listing)
        return paired_files(self.name, self.cfg.data_root, *self._dirs(split), listing, "depth")

    def _bts_pairs(self, split: str, listing: str) -> list[dict]:
        """BTS's split file: "<image> <depth> <focal>" per line, relative to the split's image and
        depth roots; a line whose depth is "None" (Eigen test frames without ground truth) is
        left out, as bts_eval.py leaves it out."""
        path = root_path(self.cfg.data_root, listing)
        if not path.is_file():
            where = storage.display(path)
            raise FileNotFoundError(f"task {self.name!r}: {split} list {where} does not exist")
        img_dir, depth_dir = self._dirs(split)
        out = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(
                    f"task {self.name!r}: {path}:{n}: expected '<image> <depth> [focal]', got {line!r}"
                )
            if parts[1] != "None":
                out.append({"image": str(img_dir / parts[0]), "depth": str(depth_dir / parts[1])})
        return out

    def _check_depth_png(self, png: Image.Image, path: str, size: tuple[int, int], image_path: str) -> None:
        if png.format != "PNG" or png.mode not in DEPTH_MODES:
            raise BadSampleError(
                f"task {self.name!r}: depth map {path} must be a 16-bit single-channel PNG "
                f"(metres x {self.cfg.depth_scale:g}), got a {png.format} image of mode {png.mode}"
            )
        if png.size != size:
            raise BadSampleError(
                f"task {self.name!r}: depth map {path} is {png.size[0]}x{png.size[1]} but its image "
                f"{image_path} is {size[0]}x{size[1]}"
            )

    def check_config(self) -> None:
        """The config's own errors, no files (a multihead task checks its heads with this)."""
        c = self.cfg
        if not 0 < c.min_depth_eval < c.max_depth_eval:
            raise ValueError(
                f"tasks.{self.name}: need 0 < min_depth_eval < max_depth_eval, "
                f"got {c.min_depth_eval} and {c.max_depth_eval}"
            )
        if c.max_depth <= 0 or c.depth_scale <= 0 or not 0 <= c.silog_lambda <= 1:
            raise ValueError(
                f"tasks.{self.name}: need max_depth > 0, depth_scale > 0 and 0 <= silog_lambda <= 1, got "
                f"{c.max_depth}, {c.depth_scale} and {c.silog_lambda}"
            )
        if not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
            raise ValueError(f"tasks.{self.name}.crop_scale must be (lo, hi) in (0, 1], got {c.crop_scale}")
        for key in ("crop_size", "kb_crop"):
            v = getattr(c, key)
            if v and (len(v) != 2 or min(v) < 1):
                raise ValueError(f"tasks.{self.name}.{key} must be (height, width) or empty, got {v}")
        if c.kb_crop and not c.crop_size:
            raise ValueError(f"tasks.{self.name}.kb_crop is KITTI's geometry: set crop_size too")
        if c.eval_crop not in ("", *EVAL_CROPS):
            raise ValueError(f"tasks.{self.name}.eval_crop must be garg, eigen or empty, got {c.eval_crop!r}")
        if c.list_format not in ("stems", "bts"):
            raise ValueError(f"tasks.{self.name}.list_format must be stems or bts, got {c.list_format!r}")

    def check_data(self) -> None:
        self.check_config()
        for split in ("train", "val"):
            img_dir, depth_dir = self._dirs(split)
            where = f"task {self.name!r}: {split}"
            if not img_dir.is_dir():
                raise FileNotFoundError(f"{where} image directory {img_dir} does not exist")
            if not depth_dir.is_dir():
                raise FileNotFoundError(f"{where} depth directory {depth_dir} does not exist")
            pairs = self._pairs(split)
            if not pairs:
                raise FileNotFoundError(f"{where} image directory {img_dir} holds no images")
            absent = set(storage.missing([p["depth"] for p in pairs]))
            missing = [p for p in pairs if p["depth"] in absent]
            if missing:
                raise FileNotFoundError(
                    f"task {self.name!r}: {len(missing)} {split} images have no depth PNG, e.g. "
                    f"{missing[0]['image']} (expected {missing[0]['depth']})"
                )
            for p in pairs:  # headers only: format, mode and size, nothing decoded
                try:
                    with (
                        Image.open(storage.open_input(p["image"])) as img,
                        Image.open(storage.open_input(p["depth"])) as png,
                    ):
                        self._check_depth_png(png, p["depth"], img.size, p["image"])
                except BadSampleError:
                    raise
                except Exception as e:  # PIL raises many types for bad files
                    raise BadSampleError(
                        f"task {self.name!r}: cannot read {p['image']} or {p['depth']}: "
                        f"{type(e).__name__}: {e}"
                    ) from None

    def source(self, split: str) -> DataSource:
        return DataSource(units=self._pairs(split), read=items_dataset)

    def _load_depth(self, path: str, size: tuple[int, int], image_path: str) -> np.ndarray:
        png = open_image(path, self.name, f"depth map {path}", mode="")
        self._check_depth_png(png, path, size, image_path)
        return np.asarray(png).astype(np.float32) / np.float32(self.cfg.depth_scale)

    def _kb_crop(
        self, img: Image.Image, depth: Image.Image
    ) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
        """KITTI's benchmark crop (bts's do_kb_crop): kb_crop (h, w) from the bottom centre."""
        if not self.cfg.kb_crop:
            return img, depth, (0, 0)
        kh, kw = self.cfg.kb_crop
        w, h = img.size
        top, left = max(0, h - kh), max(0, (w - kw) // 2)
        box = (left, top, left + min(kw, w), top + min(kh, h))
        return img.crop(box), depth.crop(box), (top, left)

    def _kitti_train(
        self, img: Image.Image, depth: Image.Image, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """BTS's KITTI training sample: kb crop, rotation, random crop_size crop, flip, colour."""
        c = self.cfg
        img, depth, _ = self._kb_crop(img, depth)
        if c.rotate_degree:
            angle = float(rng.uniform(-c.rotate_degree, c.rotate_degree))
            img = img.rotate(angle, resample=Image.BILINEAR)
            depth = depth.rotate(angle, resample=Image.NEAREST)  # sparse depth is never interpolated
        ch, cw = c.crop_size
        image = np.zeros((ch, cw, 3), dtype=np.float32)
        image[:] = IMAGENET_MEAN * 255.0  # a frame smaller than the crop: padding (0 after normalising)
        gt = np.zeros((ch, cw), dtype=np.float32)
        w, h = img.size
        y, x = int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))
        crop = np.asarray(img, dtype=np.float32)[y : y + ch, x : x + cw]
        image[: crop.shape[0], : crop.shape[1]] = crop
        d = np.asarray(depth, dtype=np.float32)[y : y + ch, x : x + cw]
        gt[: d.shape[0], : d.shape[1]] = d
        if rng.random() < 0.5:
            image, gt = image[:, ::-1], gt[:, ::-1]
        if c.color_augment and rng.random() < 0.5:  # bts's augment_image (KITTI's brightness range)
            x01 = image / 255.0
            x01 = x01 ** rng.uniform(0.9, 1.1) * rng.uniform(0.9, 1.1) * rng.uniform(0.9, 1.1, size=3)
            image = np.clip(x01, 0.0, 1.0) * 255.0
        return np.ascontiguousarray(
            np.round(image).astype(np.uint8).transpose(2, 0, 1)
        ), np.ascontiguousarray(gt)

    def _kitti_batch(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        if train:
            ch, cw = self.cfg.crop_size
            images = np.empty((n, 3, ch, cw), dtype=np.uint8)
            depths = np.empty((n, ch, cw), dtype=np.float32)
        else:
            images, depths = np.empty(n, dtype=object), np.empty(n, dtype=object)
            offsets = np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            ipath, dpath = str(batch["image"][i]), str(batch["depth"][i])
            img = open_image(ipath, self.name, f"image {ipath}")
            full = self._load_depth(dpath, img.size, ipath)
            depth = Image.fromarray(full)  # mode "F", metres
            if train:
                images[i], depths[i] = self._kitti_train(img, depth, sample_rng(seed, ipath))
            else:  # the (kb-cropped) frame at its resolution, the ground truth at its original size
                img, _, offsets[i] = self._kb_crop(img, depth)
                images[i], depths[i] = to_chw_uint8(img), full
        return (
            {"image": images, "depth": depths}
            if train
            else {"image": images, "depth": depths, "offset": offsets}
        )

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        out = super().to_device(batch, device)
        if "offset" in out:  # KITTI evaluation: frames of their own sizes (stacked if all alike)
            frames = rows(out["image"])
            out["image"], sizes = pad_stack(frames, 0.0, divisor=32)
            out["size"] = sizes.to(device)
        return out

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        if self.cfg.crop_size:
            return self._kitti_batch(batch, train, seed)
        size = self.cfg.input_size
        n = len(batch["image"])
        images = np.empty((n, 3, size, size), dtype=np.uint8)
        depths = np.empty((n, size, size), dtype=np.float32)
        for i in range(n):
            ipath, dpath = str(batch["image"][i]), str(batch["depth"][i])
            img = open_image(ipath, self.name, f"image {ipath}")
            depth = Image.fromarray(self._load_depth(dpath, img.size, ipath))  # mode "F", metres
            box = None
            if train:
                rng = sample_rng(seed, ipath)
                box = crop_box(rng, *img.size, tuple(self.cfg.crop_scale))
            img = img.resize((size, size), Image.BILINEAR, box=box)
            depth = depth.resize((size, size), Image.NEAREST, box=box)  # 0 stays 0: no interpolation
            if train and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                depth = depth.transpose(Image.FLIP_LEFT_RIGHT)
            images[i] = to_chw_uint8(img)
            depths[i] = np.asarray(depth, dtype=np.float32)
        return {"image": images, "depth": depths}

    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        return DepthHead(features, self.cfg.max_depth, self.cfg.head_channels)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return silog_loss(outputs, batch["depth"], self.cfg.silog_lambda)

    def evaluator(self) -> Evaluator:
        return DepthEvaluator(self.cfg.min_depth_eval, self.cfg.max_depth_eval, self.cfg.eval_crop)
