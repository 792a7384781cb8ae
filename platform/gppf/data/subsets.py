"""Label fractions: train on a fixed, deterministic subset of a task's training units.

CompL-style label-efficiency sweeps (1 % .. 100 % of the labels) need the same subset on every
rank, in every run and after every resume, and smaller fractions nested in larger ones, so that
a 10 % run sees a subset of the images of the 50 % run with the same `label_seed`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gppf.api.task import DataSource, Task


def label_subset(units: list[Any], fraction: float, seed: int, name: str) -> list[Any]:
    """The first `max(1, round(fraction * len(units)))` units of one permutation, in their original order.

    The permutation is drawn from `default_rng([seed, crc32(name)])`, so it depends only on the
    label seed, the task's name and the number of units: it is the same on every rank and run,
    and for one seed a smaller fraction is a prefix of a larger one's (nested subsets). Renaming
    a task draws a different subset. Units of Parquet sources are whole files: the fraction then
    applies to files, not to rows.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"task {name!r}: label fraction must be in (0, 1], got {fraction}")
    n = len(units)
    if fraction == 1 or n == 0:
        return list(units)
    keep = max(1, round(fraction * n))
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(n)
    return [units[i] for i in np.sort(order[:keep])]


def train_source(task: Task) -> DataSource:
    """What a task trains on: its train split restricted to its `label_fraction` (validation
    splits are never subset), plus the units of its `extra_train_roots` (pseudo-labels: never
    subset, they are not labelled data). The stream and the samplers' sizes both read this."""
    src = task.source("train")
    units = label_subset(src.units, task.cfg.label_fraction, task.cfg.label_seed, task.name)
    if units:  # an empty labelled split is the stream's error to report, extra roots or not
        units += task.extra_train_units(src.read)
    return dataclasses.replace(src, units=units)


def train_size(task: Task) -> int:
    """Images in the (subset) train split: units x rows_per_unit (for Parquet an estimate, since
    rows_per_unit is the files' mean row count)."""
    src = train_source(task)
    return len(src.units) * src.rows_per_unit
