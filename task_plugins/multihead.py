"""Partially labelled multi-head data: one dataset whose images carry labels for several heads
(semantic segmentation and depth on the same images, as NYUD-v2 in CompL), some labels missing.

Layout (relative to data_root): train/images/<stem>.{jpg,png} and, per head h, train/<h>/<stem>.png
in that head's own label format (class-id PNG for a segmentation head, uint16 depth PNG for a depth
head); the same under val/. A missing label file means the image has no label for that head; an
image must have a label for at least one head.

Each head is a sub-task built from its entry `tasks.<t>.heads.<h>` = {"type": "segmentation" |
"depth", **that plugin's keys}: labels are read by the sub-task's loader, and its head, loss and
evaluator are used as they are. The data keys (data_root, batch_size, input_size, layout, crops)
belong to the multihead task; `loss_weight` in a head's entry weights that head's loss.

The zeroing loss (VTD §4.3 and App. H.1: only the decoders that receive data for their task are
updated). A head runs only on the samples of the batch that carry its label, and its loss is taken
over those samples only, so an unlabelled sample contributes exactly zero to it, in value and in
gradient. A head none of whose samples is labelled is not run at all: its parameters keep
`.grad = None`, and the masked allreduce (gppf.dist.allreduce) leaves them out of the optimizer step.
Multiplying a head's per-sample loss by a 0/1 mask instead would give those parameters a
zero-valued gradient, which SGD still steps: weight decay shrinks them and the momentum buffer keeps
moving them, although no sample said anything about that head.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from gppf.api.heads import TakesBatch
from gppf.api.registry import build_task, register_task
from gppf.api.task import DataSource, Evaluator, FeatureInfo, Task
from gppf.config.base import ConfigError
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset
from gppf.io import storage
from gppf.io.images import BadSampleError, open_image, sample_rng, to_chw_uint8
from gppf.io.storage import UriPath
from task_plugins.common import paired_files, root_path
from task_plugins.depth import DepthTask, crop_box

HEAD_NAME = re.compile(r"[A-Za-z0-9_]+")
# Keys of a head's entry that the multihead task owns: its data, layout and crops are shared.
SHARED_KEYS = ("data_root", "batch_size", "input_size", "sampling_weight", "crop_scale")


@dataclass
class MultiHeadConfig(TaskConfig):
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # required: name -> sub-task entry
    train_dir: str = "train"  # images in <train_dir>/images, head h's labels in <train_dir>/<h>
    val_dir: str = "val"
    train_list: str = ""  # optional: a file of image stems, one per line (relative to data_root)
    val_list: str = ""
    crop_scale: tuple[float, float] = (0.5, 1.0)  # train crop area, as a fraction of the image


@dataclass(frozen=True)
class LabelKind:
    """How a sub-task type's labels enter a multihead batch."""

    key: str  # the batch key the sub-task's loss and evaluator read
    dtype: type
    load: Callable[[Any, str, tuple[int, int], str], np.ndarray]  # (sub-task, path, size, image path)
    missing: Callable[[Any], float]  # a missing label's fill: a value the sub-task already ignores
    check: Callable[[Any, str, str], None] | None = None  # header check on the driver


def _check_depth(task: DepthTask, path: str, image_path: str) -> None:
    try:
        with Image.open(storage.open_input(image_path)) as img, Image.open(storage.open_input(path)) as png:
            task._check_depth_png(png, path, img.size, image_path)
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise BadSampleError(
            f"task {task.name!r}: cannot read {image_path} or {path}: {type(e).__name__}: {e}"
        ) from None


KINDS: dict[str, LabelKind] = {  # the sub-task types a head can be, by registered name
    "segmentation": LabelKind(
        "mask", np.int64, lambda t, p, s, i: t._load_label(p, s, i), lambda t: t.cfg.ignore_index
    ),
    "depth": LabelKind(
        "depth", np.float32, lambda t, p, s, i: t._load_depth(p, s, i), lambda t: 0.0, _check_depth
    ),
}


class HeadOutput(NamedTuple):
    index: torch.Tensor  # the batch positions the head ran on (those carrying its label)
    output: Any  # the sub-head's output for those samples


class MultiHead(nn.Module, TakesBatch):
    """One sub-head per label head, each run on the samples whose `has_<h>` flag is set. A head
    with no such sample is skipped (no output, no graph, `.grad` stays None). Without flags
    (inference on plain images) every head runs on every sample."""

    takes_batch = True

    def __init__(self, heads: dict[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(heads)

    def forward(
        self, feats: list[torch.Tensor], batch: dict[str, torch.Tensor] | None = None
    ) -> dict[str, HeadOutput]:
        n = feats[0].shape[0]
        out = {}
        for h, head in self.heads.items():
            flag = None if batch is None else batch.get(f"has_{h}")
            if flag is None:
                out[h] = HeadOutput(torch.arange(n, device=feats[0].device), head(feats))
                continue
            index = flag.bool().nonzero().flatten()
            if index.numel() == 0:
                continue
            sub = feats if index.numel() == n else [f.index_select(0, index) for f in feats]
            out[h] = HeadOutput(index, head(sub))
        return out


class MultiHeadEvaluator(Evaluator):
    """Each head's own evaluator over the samples labelled for it; metrics `<head>/<metric>`, the
    primary one the first head's primary."""

    def __init__(self, evaluators: dict[str, Evaluator], keys: dict[str, str]):
        self.evaluators = evaluators
        self.keys = keys  # head -> the batch key its evaluator reads
        first = next(iter(evaluators))
        self.primary = f"{first}/{evaluators[first].primary}"

    def update(self, outputs: dict[str, HeadOutput], batch: dict[str, torch.Tensor]) -> None:
        for h, o in outputs.items():
            label = batch[f"label_{h}"].index_select(0, o.index.to(batch[f"label_{h}"].device))
            self.evaluators[h].update(o.output, {self.keys[h]: label})

    def state(self) -> torch.Tensor:
        return torch.cat([ev.state().to(torch.float64) for ev in self.evaluators.values()])

    def load_state(self, state: torch.Tensor) -> None:
        start = 0
        for ev in self.evaluators.values():
            n = ev.state().numel()
            ev.load_state(state[start : start + n])
            start += n

    def synchronize(self, device: torch.device) -> None:
        for ev in self.evaluators.values():  # a head's evaluator may have its own rule
            ev.synchronize(device)

    def compute(self) -> dict[str, float]:
        return {f"{h}/{k}": v for h, ev in self.evaluators.items() for k, v in ev.compute().items()}


@register_task("multihead")
class MultiHeadTask(Task):
    config_cls = MultiHeadConfig
    cfg: MultiHeadConfig

    def __init__(self, name: str, cfg: MultiHeadConfig):
        super().__init__(name, cfg)
        if not cfg.heads:
            raise ConfigError(f"tasks.{name}.heads must name at least one head")
        self.subs: dict[str, Task] = {h: self._build_sub(h, dict(e)) for h, e in cfg.heads.items()}
        self.kinds: dict[str, LabelKind] = {h: KINDS[e["type"]] for h, e in cfg.heads.items()}

    def _build_sub(self, head: str, entry: dict[str, Any]) -> Task:
        where = f"tasks.{self.name}.heads.{head}"
        if not HEAD_NAME.fullmatch(head) or head == "images":
            raise ConfigError(
                f"{where}: a head name is a directory name of letters, digits and _, not 'images'"
            )
        if entry.get("type") not in KINDS:
            raise ConfigError(f"{where}.type must be one of {', '.join(KINDS)}, got {entry.get('type')!r}")
        owned = sorted(k for k in entry if k in SHARED_KEYS or k.startswith(("train_", "val_")))
        if owned:
            raise ConfigError(
                f"{where}.{owned[0]}: data, layout and crops are the multihead task's keys "
                f"(tasks.{self.name}.*), not a head's"
            )
        entry.update(
            data_root=self.cfg.data_root, batch_size=self.cfg.batch_size, input_size=self.cfg.input_size
        )
        return build_task(f"{self.name}.heads.{head}", entry)

    # -- data -----------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path | UriPath:
        return root_path(self.cfg.data_root, self.cfg.train_dir if split == "train" else self.cfg.val_dir)

    def _items(self, split: str) -> list[dict[str, str]]:
        """`{"image": path, "label_<h>": path or ""}` per image ("": no label for h)."""
        d = self._split_dir(split)
        listing = self.cfg.train_list if split == "train" else self.cfg.val_list
        items: list[dict[str, str]] = []
        for h in self.subs:
            pairs = paired_files(self.name, self.cfg.data_root, d / "images", d / h, listing, "label")
            if not items:
                items = [{"image": p["image"]} for p in pairs]
            absent = set(storage.missing([p["label"] for p in pairs]))  # one listing per directory
            for item, p in zip(items, pairs):
                item[f"label_{h}"] = "" if p["label"] in absent else p["label"]
        return items

    def check_data(self) -> None:
        lo, hi = self.cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"tasks.{self.name}.crop_scale must be (lo, hi) in (0, 1], got {self.cfg.crop_scale}"
            )
        for sub in self.subs.values():
            sub.check_config()
        for split in ("train", "val"):
            d = self._split_dir(split)
            where = f"task {self.name!r}: {split}"
            if not (d / "images").is_dir():
                raise FileNotFoundError(f"{where} image directory {d / 'images'} does not exist")
            for h in self.subs:
                if not (d / h).is_dir():
                    raise FileNotFoundError(f"{where} label directory {d / h} of head {h!r} does not exist")
            items = self._items(split)
            if not items:
                raise FileNotFoundError(f"{where} image directory {d / 'images'} holds no images")
            bare = [it["image"] for it in items if not any(it[f"label_{h}"] for h in self.subs)]
            if bare:
                raise FileNotFoundError(
                    f"{where}: {len(bare)} images have no label for any head ({', '.join(self.subs)}), "
                    f"e.g. {bare[0]}"
                )
            for h, sub in self.subs.items():
                labelled = [it for it in items if it[f"label_{h}"]]
                if not labelled:
                    raise FileNotFoundError(f"{where} label directory {d / h} holds no label of any image")
                if self.kinds[h].check is not None:  # headers only, nothing decoded
                    for it in labelled:
                        self.kinds[h].check(sub, it[f"label_{h}"], it["image"])

    def source(self, split: str) -> DataSource:
        return DataSource(units=self._items(split), read=items_dataset)

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        """One crop box and flip per image, drawn before any label is looked at (so a label's
        augmentation does not depend on which other labels exist), applied to the image (bilinear)
        and to every present label (nearest). A missing label is filled with a value its sub-task
        ignores and flagged by `has_<h>` = False."""
        size = self.cfg.input_size
        n = len(batch["image"])
        out: dict[str, np.ndarray] = {"image": np.empty((n, 3, size, size), dtype=np.uint8)}
        for h, sub in self.subs.items():
            kind = self.kinds[h]
            out[f"label_{h}"] = np.full((n, size, size), kind.missing(sub), dtype=kind.dtype)
            out[f"has_{h}"] = np.zeros(n, dtype=bool)
        for i in range(n):
            ipath = str(batch["image"][i])
            img = open_image(ipath, self.name, f"image {ipath}")
            box, flip = None, False
            if train:
                rng = sample_rng(seed, ipath)
                box = crop_box(rng, *img.size, tuple(self.cfg.crop_scale))
                flip = bool(rng.random() < 0.5)
            out["image"][i] = to_chw_uint8(_geometry(img, size, box, flip, Image.BILINEAR))
            for h, sub in self.subs.items():
                path = str(batch[f"label_{h}"][i])
                if not path:
                    continue
                label = Image.fromarray(self.kinds[h].load(sub, path, img.size, ipath))  # mode I or F
                out[f"label_{h}"][i] = np.asarray(_geometry(label, size, box, flip, Image.NEAREST))
                out[f"has_{h}"][i] = True
        return out

    # -- model ----------------------------------------------------------------------------
    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        return MultiHead({h: sub.build_head(features) for h, sub in self.subs.items()})

    def loss(self, outputs: dict[str, HeadOutput], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over the heads that ran of loss_weight x the sub-task's loss over their labelled
        samples; a sample without a head's label is not in that head's loss at all."""
        total = batch["image"].new_zeros(())
        for h, o in outputs.items():
            sub = self.subs[h]
            label = batch[f"label_{h}"].index_select(0, o.index)
            total = total + sub.loss(o.output, {self.kinds[h].key: label}) * sub.cfg.loss_weight
        return total

    def evaluator(self) -> Evaluator:
        return MultiHeadEvaluator(
            {h: sub.evaluator() for h, sub in self.subs.items()}, {h: k.key for h, k in self.kinds.items()}
        )

    def class_names(self) -> list[str]:
        if self.cfg.class_names:
            return list(self.cfg.class_names)
        return [name for sub in self.subs.values() for name in sub.class_names()]


def _geometry(
    img: Image.Image, size: int, box: tuple[int, int, int, int] | None, flip: bool, resample: int
) -> Image.Image:
    img = img.resize((size, size), resample, box=box)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
