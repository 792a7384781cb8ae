"""Image decoding and the geometric augmentations shared by task plugins (run inside Ray Data)."""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch
from PIL import Image

from gppf.io import storage

# The image files plugins list and decode, in the order a stem's file is looked for (case-insensitive).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image(name: str) -> bool:
    """Whether a file name is an image by its suffix (IMAGE_EXTS, any case)."""
    return name[name.rfind(".") :].lower() in IMAGE_EXTS if "." in name else False


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the task and the file."""


def open_image(src: str | bytes, task: str, what: str, mode: str = "RGB") -> Image.Image:
    """Decode a path (local or a URI, gppf.io.storage) or encoded bytes; a corrupt or unreadable
    file raises BadSampleError naming it."""
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else storage.open_input(src))
        img.load()
    except Exception as e:  # PIL raises many types for bad files
        raise BadSampleError(f"task {task!r}: cannot read {what}: {type(e).__name__}: {e}") from None
    return img.convert(mode) if mode and img.mode != mode else img


def sample_rng(seed: int, key: str | bytes) -> np.random.Generator:
    """Per-sample RNG from the stream's seed and the sample's identity: independent of batching."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    return np.random.default_rng([seed, zlib.crc32(data)])


def random_resized_crop_box(
    rng: np.random.Generator, w: int, h: int, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) as torchvision's RandomResizedCrop picks it, from our RNG."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(rng.integers(0, w - cw + 1))
            y = int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def center_crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def to_chw(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised float32 CHW (what a task that must work in normalised space ships)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - mean) / std).transpose(2, 0, 1)


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    """uint8 CHW: what preprocessing ships through the object store (a quarter of float32's
    bytes); `normalize_images` turns it into the model's input on the worker's device."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """A uint8 N x 3 x H x W batch -> float32 normalised with the ImageNet mean and std (on x's
    device). A float batch (a plugin that normalises in `pre`) passes unchanged."""
    if x.dtype != torch.uint8:
        return x
    if x.device not in _STATS:
        mean = torch.from_numpy(IMAGENET_MEAN * 255.0).to(x.device)[:, None, None]
        std = torch.from_numpy(IMAGENET_STD * 255.0).to(x.device)[:, None, None]
        _STATS[x.device] = (mean, std)
    mean, std = _STATS[x.device]
    return (x.float() - mean) / std
