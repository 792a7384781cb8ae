"""What a task is: a dataset plus (pre, net, loss) plus a metric (GPPF §3.2).

A plugin subclasses `Task`, declares its config dataclass (a subclass of `TaskConfig`) and
registers itself with `@register_task("name")` (see `gppf.api.registry`). The trainer only ever talks
to this interface, so classification, segmentation and detection plug in the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from gppf.config.base import ConfigError
from gppf.config.task import TaskConfig
from gppf.io.batches import move
from gppf.io.images import normalize_images

if TYPE_CHECKING:
    from gppf.config.cpf import PseudoLabelConfig


@dataclass
class FeatureInfo:
    """One backbone output as heads see it: channels and stride (timm's feature_info)."""

    channels: int
    reduction: int
    pyramid: bool = False  # a shared neck's FPN level: heads use it as is instead of their own FPN


@dataclass
class DataSource:
    """A split of a task's data as shardable units plus how to read a list of them with Ray Data.

    `units` are small picklable things (item dicts, or file paths for Parquet). The stream of each
    worker permutes them per epoch, takes its rank's share and calls `read` on it, so workers never
    share a coordinator (see gppf.data.stream).
    """

    units: list[Any]
    read: Callable[[list[Any]], Any]  # list of units -> ray.data.Dataset of raw records
    rows_per_unit: int = 1  # rows `read` yields per unit (exactly, unless unit_rows is given)
    # Units of different sizes (Parquet files): the exact rows of each, so a resumed stream can
    # skip whole chunks by arithmetic instead of decoding them. An unknown unit (KeyError) makes
    # the stream decode its way to the resume position instead.
    unit_rows: Callable[[Any], int] | None = None
    # The raw rows of a list of units as one batch of numpy columns, read in this process without
    # Ray: what the training stream calls per chunk before each batch is decoded in a Ray task
    # (gppf.data.stream). None: a source whose `read` is `items_dataset` uses its units as rows;
    # any other goes through `read` (a Ray Data execution per chunk, slower).
    load: Callable[[list[Any]], dict[str, np.ndarray]] | None = None


class Evaluator:
    """Accumulates a metric over batches; `state()` is a float vector that all-reduces by sum.

    Metrics that do not decompose into sums (COCO AP) override `synchronize` instead.
    """

    primary: ClassVar[str] = "metric"

    def update(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state(self) -> torch.Tensor:
        raise NotImplementedError

    def load_state(self, state: torch.Tensor) -> None:
        raise NotImplementedError

    def synchronize(self, device: torch.device) -> None:
        """Combine the workers' partial results (a collective: every rank calls it)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            state = self.state().to(device, torch.float64)
            dist.all_reduce(state)
            self.load_state(state.cpu())

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """Base class of task plugins. Subclasses set `config_cls` and implement the five hooks."""

    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    # False for a plugin whose data comes with it (a pip package, a generator): `data_root` may
    # then be left empty, and the driver checks no directory.
    needs_data_root: ClassVar[bool] = True
    # True for a task whose head reads the trunk's levels even when the job has a shared neck
    # (the self-supervised auxiliary tasks).
    reads_trunk: ClassVar[bool] = False

    def __init__(self, name: str, cfg: TaskConfig):
        # Checked here rather than in TaskConfig: the error must name the task.
        if not 0 < cfg.label_fraction <= 1:
            raise ConfigError(f"tasks.{name}.label_fraction must be in (0, 1], got {cfg.label_fraction}")
        if cfg.eval_every < 0:
            raise ConfigError(
                f"tasks.{name}.eval_every must be >= 0 (0: train.eval_every), got {cfg.eval_every}"
            )
        self.name = name
        self.cfg = cfg

    # -- data -----------------------------------------------------------------------------
    def check_data(self) -> None:
        """Raise a clear error if the data root is missing or empty (called on the driver)."""

    def source(self, split: str) -> DataSource:
        raise NotImplementedError

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        """`pre`: decode and augment raw records into fixed-shape arrays (runs in Ray Data)."""
        raise NotImplementedError

    # -- model ----------------------------------------------------------------------------
    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        """`net`: the task head on top of the backbone's declared outputs."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    def train_batch(
        self, batch: dict[str, torch.Tensor], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """Batch-level augmentation on the worker, before the forward pass (Mixup/CutMix).
        `rng` is a pure function of (seed, step, rank), so resumed runs repeat it."""
        return batch

    def input_key(self) -> str:
        return "image"

    def image_keys(self) -> tuple[str, ...]:
        """Batch keys holding images; uint8 ones are normalised on the device (`to_device`)."""
        return (self.input_key(),)

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch on `device`, its uint8 images normalised there (`pre` ships them as uint8:
        a quarter of the object-store bytes and of the host-to-device copy)."""
        out = {k: move(v, device) for k, v in batch.items()}
        for k in self.image_keys():
            if k in out:
                v = out[k]
                out[k] = [normalize_images(x) for x in v] if isinstance(v, list) else normalize_images(v)
        return out

    def infer(self, forward: Callable[[torch.Tensor], Any], batch: dict[str, Any]) -> Any:
        """Evaluation-mode outputs of a batch (on the device), which `evaluator().update` and
        `write_pseudo_labels` take. `forward(x)` runs trunk, neck and this task's head on input
        `x` with this batch; a plugin overrides this for inference of its own (MMSeg's
        sliding-window segmentation runs `forward` once per window)."""
        return forward(batch[self.input_key()])

    def check_stage_options(self, options: dict[str, Any], where: str) -> None:
        """Raise ConfigError for a stage's `task_options` this task does not take (on the driver,
        for every stage before the run starts: a bad option of a late stage must not wait for it)."""
        if options:
            raise ConfigError(
                f"{where}: task_options.{self.name} has {', '.join(sorted(options))}, but task "
                f"{self.name!r} ({type(self).__name__}) takes no stage options"
            )

    def enter_stage(self, head: nn.Module, options: dict[str, Any], where: str) -> None:
        """A stage starts (gppf.engine.stages): `options` are its `task_options` for this task (empty when
        it has none), already checked by `check_stage_options`. A task that takes options
        overrides both."""

    # -- extra training data ----------------------------------------------------------------
    def extra_train_units(self, read: Callable[[list[Any]], Any]) -> list[Any]:
        """The train units of `cfg.extra_train_roots`, each listed by this task type on that root.
        They are read with `read` (this task's own train reader), which must be the reader the
        extra root's listing comes with: units of another format would decode wrongly."""
        units: list[Any] = []
        for root in self.cfg.extra_train_roots:
            other = type(self)(self.name, dataclasses.replace(self.cfg, data_root=root, extra_train_roots=[]))
            src = other.source("train")
            if _code(src.read) is not _code(read):
                raise ValueError(
                    f"task {self.name!r}: extra train root {root} is read another way than data_root "
                    f"(another format?); it must have data_root's layout"
                )
            if not src.units:
                raise FileNotFoundError(
                    f"task {self.name!r}: extra train root {root} holds no train data in this task's layout"
                )
            self.check_extra_root(other)
            units.extend(src.units)
        return units

    def check_extra_root(self, other: Task) -> None:
        """Raise if `other` (this task on an extra train root) would label classes differently,
        e.g. another category list. Per-sample checks (a label id out of range) happen on decode."""

    # -- pseudo-labels (gppf.tools.pseudo_labels); optional --------------------------------------
    def pseudo_inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs for a batch of unlabelled images (`batch["path"]`, `batch["index"]`): the
        evaluation's preprocessing, plus what `write_pseudo_labels` needs to map predictions back
        to each image (its original size) and `path`."""
        raise NotImplementedError(f"task {self.name!r} ({type(self).__name__}) cannot write pseudo-labels")

    def write_pseudo_labels(
        self, outputs: Any, inputs: dict[str, np.ndarray], out: Path, cfg: PseudoLabelConfig
    ) -> list[dict[str, Any]]:
        """Keep the confident part of a batch's predictions (the evaluation-mode head outputs) and
        write what belongs to single images (the image, a label file) under `out`, in this task's
        train layout; returns one JSON-serialisable record per image for `finish_pseudo_labels`."""
        raise NotImplementedError(f"task {self.name!r} ({type(self).__name__}) cannot write pseudo-labels")

    def finish_pseudo_labels(self, records: list[dict[str, Any]], out: Path) -> dict[str, float]:
        """Write what spans all images (an annotation file, an image list) from the records of
        every batch, in image order; returns summary figures for the log."""
        raise NotImplementedError(f"task {self.name!r} ({type(self).__name__}) cannot write pseudo-labels")

    def class_names(self) -> list[str]:
        """Names of the task's classes (prompts of language-guided adapters); [] = no classes."""
        if self.cfg.class_names:
            return list(self.cfg.class_names)
        n = int(getattr(self.cfg, "num_classes", 0) or getattr(self, "num_classes", 0) or 0)
        return [f"class {i}" for i in range(n)]


def _code(fn: Callable) -> Any:
    """What identifies a reader across task instances: its function's code (bound methods and
    closures such as a Parquet reader's lambda differ per instance, their code does not)."""
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__code__", fn)
