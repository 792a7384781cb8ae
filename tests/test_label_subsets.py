"""Label fractions: a fixed, nested subset of a task's training units that the stream alone reads."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.base import ConfigError
from gppf.data.subsets import label_subset, train_size, train_source
from tests.tasks_for_tests import task_entries

UNITS = [f"u{i:03d}" for i in range(200)]


def test_subset_is_deterministic_sized_and_in_order():
    a = label_subset(UNITS, 0.1, seed=0, name="cls")
    assert a == label_subset(UNITS, 0.1, seed=0, name="cls")
    assert len(a) == 20 and a == sorted(a) and set(a) <= set(UNITS)
    assert a != label_subset(UNITS, 0.1, seed=1, name="cls")
    assert a != label_subset(UNITS, 0.1, seed=0, name="seg")  # each task its own draw
    assert len(label_subset(UNITS, 0.001, 0, "cls")) == 1  # never empty
    assert label_subset(UNITS, 1.0, 0, "cls") == UNITS


def test_smaller_fractions_are_nested_in_larger_ones():
    subsets = [set(label_subset(UNITS, f, seed=3, name="cls")) for f in (0.01, 0.1, 0.5, 0.9, 1.0)]
    assert [len(s) for s in subsets] == [2, 20, 100, 180, 200]
    assert all(small < big for small, big in zip(subsets, subsets[1:]))


def test_bad_fraction_names_the_key(demo_root):
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"tasks\.cls\.label_fraction must be in \(0, 1\]"):
            build_task("cls", {**task_entries(demo_root)["cls_folder"], "label_fraction": bad})


def test_only_the_train_split_is_subset(demo_root):
    entry = task_entries(demo_root)["seg"]
    full = build_task("seg", entry)
    part = build_task("seg", {**entry, "label_fraction": 0.25, "label_seed": 7})
    units = full.source("train").units
    sub = train_source(part).units
    assert sub == label_subset(units, 0.25, 7, "seg") and len(sub) == round(0.25 * len(units))
    assert train_size(part) == len(sub) and train_size(full) == len(units)
    assert part.source("val").units == full.source("val").units


@pytest.mark.timeout(120)
def test_stream_reads_only_the_subset_and_evaluation_reads_everything(demo_root, ray_session):
    from gppf.config.job import StreamConfig
    from gppf.data.stream import TaskStream, configure_data_context, eval_batches
    from task_plugins.classification import ClassificationTask

    entry = {**task_entries(demo_root)["cls_folder"], "label_fraction": 0.25, "batch_size": 4}
    base = build_task("cls", entry)
    paths = [u["path"] for split in ("train", "val") for u in base.source(split).units]
    index = {p: i for i, p in enumerate(paths)}

    class Indexed(ClassificationTask):  # defined here: pickled by value to Ray's workers
        def preprocess(self, batch, train, seed):  # no decoding: which item, nothing else
            return {"index": np.array([index[str(p)] for p in batch["path"]], dtype=np.int64)}

    task = Indexed("cls", base.cfg)
    subset = [index[u["path"]] for u in train_source(task).units]
    assert len(subset) == 12  # of 48
    cfg = StreamConfig(min_rows_per_pass=24, chunk_rows=8)  # a pass: two epochs of the 12 images
    configure_data_context(cfg)
    stream = TaskStream(task, seed=0, rank=0, world=1, cfg=cfg)
    try:
        seen = Counter(int(i) for _ in range(6) for i in stream.next()[0]["index"])
    finally:
        stream.close()
    assert seen == {i: 2 for i in subset}
    val = [int(i) for batch in eval_batches(task, 0, 1, cfg) for i in batch["index"]]
    assert sorted(val) == [index[u["path"]] for u in base.source("val").units]


def test_trainer_samples_by_the_subset_sizes(demo_root):
    import torch

    from gppf.config.job import BackboneConfig, JobConfig, TrainConfig
    from gppf.engine.trainer import Trainer

    entries = task_entries(demo_root)
    cfg = JobConfig(
        tasks={"cls": {**entries["cls_folder"], "label_fraction": 0.5}, "seg": entries["seg"]},
        backbone=BackboneConfig(name="resnet10t"),
        train=TrainConfig(steps=40, sampler="round_robin"),
    )
    t = Trainer(cfg, torch.device("cpu"))
    assert t.sampler.sizes == [24, 48]  # cls: half of its 48 images
    # 24 / 8 = 3 batches of cls and 48 / 4 = 12 of seg per epoch, never twice cls in a row.
    epoch = [t.task_at(s) for s in range(15)]
    assert epoch.count(0) == 3 and epoch.count(1) == 12
    assert [t.task_at(s) for s in range(15, 30)] == epoch
    assert all(not (x == y == 0) for x, y in zip(epoch, epoch[1:]))


def test_extra_train_roots_are_added_after_the_subset_and_counted(demo_root):
    """Pseudo-label roots are not labelled data: a label fraction never thins them, and the
    `size` / `round_robin` samplers count them as the stream reads them."""
    entry = {**task_entries(demo_root)["seg"], "label_fraction": 0.25}
    alone = build_task("seg", entry)
    extra = build_task("seg", {**entry, "extra_train_roots": [entry["data_root"]]})
    n_all = len(alone.source("train").units)
    assert train_size(alone) == round(0.25 * n_all)
    assert train_size(extra) == round(0.25 * n_all) + n_all
    assert train_source(extra).units[: train_size(alone)] == train_source(alone).units
