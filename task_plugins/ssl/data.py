"""Data of the self-supervised auxiliary tasks (CompL §3.2): unlabelled images and their own views.

An auxiliary task needs no labels, so its data is any directory of images: `data_root` plus
`images`, sub-directories searched recursively (point them at another task's training images,
e.g. `train/images` of a segmentation set, to learn from that task's data). Its augmentations
(random crop, colour jitter, grayscale, Gaussian blur, rotation) run in its own `preprocess` and
therefore only ever touch the auxiliary input: the target task's batches come from the target's
stream, through the target's `preprocess` (CompL: blur and rotation hurt dense targets).

Views use torchvision's transforms on PIL images, seeded per sample from (stream seed, file) so a
resumed run sees the same views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from gppf.api.task import DataSource, Evaluator, Task
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.images import open_image, sample_rng, to_chw_uint8
from task_plugins.common import image_files as list_images
from task_plugins.common import root_path


@dataclass
class SSLConfig(TaskConfig):
    # Sub-directories of data_root whose images (recursively) this task learns from; [""] = all.
    images: list[str] = field(default_factory=lambda: [""])
    val_images: list[str] = field(default_factory=list)  # evaluation images; [] = no evaluation
    crop_scale_min: float = 0.2  # MoCo v2's RandomResizedCrop scale (0.2, 1)
    color_jitter: float = 0.4  # brightness, contrast, saturation (hue: a quarter), applied with p 0.8
    grayscale: float = 0.2
    blur: float = 0.5  # probability of a Gaussian blur (sigma 0.1-2.0)


def image_files(task: str, root: str, dirs: list[str]) -> list[str]:
    """Every image under root/<dir> for each dir, sorted; a missing dir is an error naming it."""
    out: list[str] = []
    for d in dirs:
        base = root_path(root, d) if d else root_path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"task {task!r}: image directory {storage.display(base)} does not exist")
        out += [str(p) for p in list_images(base, recursive=True)]
    return out


def view_transform(cfg: SSLConfig, size: int) -> T.Compose:
    """MoCo v2's augmentation (also CompL's auxiliary augmentation, before any rotation)."""
    j = cfg.color_jitter
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0)),
            T.RandomApply([T.ColorJitter(j, j, j, j / 4)], p=0.8 if j > 0 else 0.0),
            T.RandomGrayscale(cfg.grayscale),
            T.RandomApply([T.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=cfg.blur),
            T.RandomHorizontalFlip(),
        ]
    )


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))  # MoCo v2: 10 % of the image side, odd
    return k if k % 2 else k + 1


def seeded_views(transforms: list, img: Image.Image, seed: int, key: str) -> list[Image.Image]:
    """One view of `img` per transform, drawn from a generator seeded by (seed, key); the caller's
    torch RNG is left as it was."""
    s = int(sample_rng(seed, key).integers(2**62))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        return [t(img) for t in transforms]


def eval_view(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.BILINEAR)


class SSLTask(Task):
    """Shared plumbing of the auxiliary tasks: image-only sources, no class names."""

    config_cls = SSLConfig
    cfg: SSLConfig
    # Heads read the trunk's levels even when a shared neck exists: the auxiliary objective
    # shapes the shared encoder (CompL), and MoCo's key encoder is a copy of the trunk only.
    reads_trunk = True

    def _dirs(self, split: str) -> list[str]:
        return self.cfg.images if split == "train" else self.cfg.val_images

    def check_data(self) -> None:
        files = image_files(self.name, self.cfg.data_root, self.cfg.images)
        if not files:
            raise FileNotFoundError(
                f"task {self.name!r}: no images under {self.cfg.data_root} in {self.cfg.images} "
                f"(tasks.{self.name}.images)"
            )
        image_files(self.name, self.cfg.data_root, self.cfg.val_images)

    def source(self, split: str) -> DataSource:
        files = image_files(self.name, self.cfg.data_root, self._dirs(split))
        return DataSource(units=[{"image": f} for f in files], read=items_dataset)

    def load(self, path: str) -> Image.Image:
        return open_image(path, self.name, f"image {path}")

    def class_names(self) -> list[str]:
        return []


def chw(img: Image.Image) -> np.ndarray:
    """uint8 CHW (normalised on the device: Task.to_device)."""
    return to_chw_uint8(img)


class Top1Evaluator(Evaluator):
    """Accuracy of the class at index `target` (or of batch[key]) among the output logits."""

    primary = "top1"

    def __init__(self, name: str = "top1", key: str = ""):
        self.name = self.primary = name
        self.key = key
        self.counts = torch.zeros(2, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        target = batch[self.key].to(outputs.device) if self.key else torch.zeros_like(outputs[:, 0]).long()
        self.counts[0] += (outputs.argmax(1) == target).sum().item()
        self.counts[1] += outputs.shape[0]

    def state(self) -> torch.Tensor:
        return self.counts.clone()

    def load_state(self, state: torch.Tensor) -> None:
        self.counts = state.to(torch.float64).clone()

    def compute(self) -> dict[str, float]:
        if self.counts[1] == 0:
            return {}
        return {self.name: 100.0 * self.counts[0].item() / self.counts[1].item()}
