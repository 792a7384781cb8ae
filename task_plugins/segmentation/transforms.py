"""MMSegmentation's data pipeline for semantic segmentation, transform for transform.

GPPF §4.1 "follow[s] the training settings in MMSegmentation". MMSeg's configs for ADE20K,
COCO-Stuff 164k and Pascal VOC 2012 aug (`configs/_base_/datasets/*.py`) share one pipeline:

    train: RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)
           -> RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75) -> RandomFlip(prob=0.5)
           -> PhotoMetricDistortion -> pad to the crop size (image 0 after normalisation, label 255)
    test:  Resize(scale=(2048, 512), keep_ratio=True), the label kept at its original size

The functions follow mmcv / mmseg (`mmcv.rescale_size`, `RandomResize._random_sample_ratio`,
`RandomCrop.crop_bbox` with its ten tries, `PhotoMetricDistortion.transform`); each draws from a
per-sample numpy Generator instead of numpy's global RNG, so a resumed stream repeats them.
Images resize bilinearly without antialiasing and labels by nearest neighbour with OpenCV's
rounding (`cv2.INTER_LINEAR` / `cv2.INTER_NEAREST`, what mmcv calls), through torch.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

Scale = tuple[int, int]


def rescale_size(w: int, h: int, scale: Scale) -> tuple[int, int]:
    """(new w, new h) of a keep-ratio resize to `scale` (mmcv.rescale_size): the largest factor
    under which the long side is <= max(scale) and the short side <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def random_scale(rng: np.random.Generator, scale: Scale, ratio_range: tuple[float, float]) -> Scale:
    """RandomResize's target scale: `scale` times a ratio drawn uniformly from `ratio_range`."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    return int(scale[0] * ratio), int(scale[1] * ratio)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, h, w] (size = (h, w)), bilinear without antialiasing (cv2.INTER_LINEAR)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return TF.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] class ids -> [h, w], nearest with OpenCV's rounding (torch's 'nearest', not 'nearest-exact')."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    out = torch.nn.functional.interpolate(label[None, None].float(), size=tuple(size), mode="nearest")
    return out[0, 0].to(label.dtype)


def crop_box(
    rng: np.random.Generator, label: np.ndarray, crop: int, cat_max_ratio: float, ignore_index: int
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of RandomCrop: a crop of crop x crop (the whole side where the image is
    smaller) at a random offset, drawn again up to ten times while one class other than
    ignore covers >= cat_max_ratio of it or it holds a single class (mmseg's rule)."""
    h, w = label.shape

    def draw() -> tuple[int, int, int, int]:
        oy = int(rng.integers(0, max(h - crop, 0) + 1))
        ox = int(rng.integers(0, max(w - crop, 0) + 1))
        return oy, min(oy + crop, h), ox, min(ox + crop, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y0, y1, x0, x1 = box
            ids, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
            counts = counts[ids != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> HSV in OpenCV's 8-bit ranges (H 0..179, S and V 0..255)."""
    hsv = rgb_to_hsv(rgb.astype(np.float32) / 255.0)
    out = np.empty(rgb.shape, dtype=np.uint8)
    out[..., 0] = np.round(hsv[..., 0] * 180.0).astype(np.int64) % 180
    out[..., 1:] = np.round(hsv[..., 1:] * 255.0).astype(np.uint8)
    return out


def _rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., :1].astype(np.float32) / 180.0
    sv = hsv[..., 1:].astype(np.float32) / 255.0
    return np.round(hsv_to_rgb(np.concatenate([h, sv], -1)) * 255.0).astype(np.uint8)


def photometric_distortion(
    rng: np.random.Generator,
    img: np.ndarray,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 [H, W, 3] image: brightness, contrast (before or
    after the colour changes, at random), saturation and hue, each applied with probability 1/2."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = _hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = _rgb(hsv)
    if rng.integers(2):
        hsv = _hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = _rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of mmseg's slide inference: windows of crop x crop every `stride` pixels,
    the last of each row and column moved back inside the image."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, h), min(c * stride + crop, w)
            out.append((max(y1 - crop, 0), y1, max(x1 - crop, 0), x1))
    return out
