"""What a task is: a dataset plus (pre, net, loss) plus a metric (GPPF §3.2).

A plugin subclasses `Task`, declares its config dataclass (a subclass of `TaskConfig`) and
registers itself with `@register_task("name")` (see `gppf.registry`). The trainer only ever talks
to this interface, so classification, segmentation and detection plug in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from gppf.config import ConfigError


@dataclass
class TaskConfig:
    """Fields every task has. Plugins subclass this and add their own."""

    data_root: str = ""
    batch_size: int = 8  # per worker, per step
    sampling_weight: float = 1.0  # relative probability that a worker picks this task at a step
    loss_weight: float = 1.0  # w_t in GPPF's objective
    input_size: int = 224
    # CompL's composite mode (gppf.composite): run this task only together with the named task,
    # in the same trunk forward, never sampled on its own; its loss_weight is λ.
    composite_with: str = ""
    # Class names, for language-guided adapters (gppf.language); empty: the plugin's own (COCO
    # categories, ImageFolder folders) or "class <i>".
    class_names: list[str] = field(default_factory=list)
    # Train on a fixed subset of the train split (gppf.data.subsets): this fraction of its units,
    # the same on every rank and run for one label_seed; 1.0 = everything. Never the val split.
    label_fraction: float = 1.0
    label_seed: int = 0


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
    rows_per_unit: int = 1


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

    def __init__(self, name: str, cfg: TaskConfig):
        # Checked here rather than in TaskConfig: the error must name the task.
        if not 0 < cfg.label_fraction <= 1:
            raise ConfigError(f"tasks.{name}.label_fraction must be in (0, 1], got {cfg.label_fraction}")
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

    def class_names(self) -> list[str]:
        """Names of the task's classes (prompts of language-guided adapters); [] = no classes."""
        if self.cfg.class_names:
            return list(self.cfg.class_names)
        n = int(getattr(self.cfg, "num_classes", 0) or getattr(self, "num_classes", 0) or 0)
        return [f"class {i}" for i in range(n)]
