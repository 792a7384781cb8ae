"""The plan of a stream's pass: every epoch's share once, chunks within one epoch, and a new
augmentation seed per epoch (a small dataset repeated within a pass is augmented anew)."""

from __future__ import annotations

import numpy as np

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import StreamConfig
from gppf.data.stream import TaskStream
from tests.tasks_for_tests import task_entries


def test_pass_repeats_epochs_with_new_augmentation_seeds(demo_root):
    task = build_task("det", task_entries(demo_root)["det"])
    stream = TaskStream(task, seed=0, rank=1, world=2, cfg=StreamConfig(min_rows_per_pass=64, chunk_rows=8))
    share = len(stream._share(0))
    k = stream.epochs_per_pass()
    assert k == -(-64 // share) > 1
    for pass_idx in (0, 1):
        plan = stream._chunks(pass_idx)
        epochs = range(pass_idx * k, (pass_idx + 1) * k)
        by_seed: dict[int, list] = {}
        for p, seed, units in plan:
            assert p == pass_idx
            by_seed.setdefault(seed, []).extend(units)
        # One seed per epoch, and each seed's chunks are exactly that epoch's share, in order.
        assert list(by_seed) == [stream.epoch_seed(e) for e in epochs]
        for seed, e in zip(by_seed, epochs):
            assert [u["path"] for u in by_seed[seed]] == [u["path"] for u in stream._share(e)]
        assert len(plan[0][2]) == 2 * task.cfg.batch_size  # the small first chunk
        assert all(len(units) <= 8 for _, _, units in plan)

    # The same image in two epochs of one pass is augmented differently.
    p0, p1 = (next(c for c in stream._chunks(0) if c[1] == stream.epoch_seed(e)) for e in (0, 1))
    image = p0[2][0]
    batch = {key: np.array([image[key]]) for key in image}
    a = task.preprocess(batch, train=True, seed=p0[1])["image"]
    b = task.preprocess(batch, train=True, seed=p1[1])["image"]
    assert not np.array_equal(a, b)


def test_share_smaller_than_a_batch_is_chunked_across_epochs(demo_root):
    """A tiny dataset on many workers: one image per epoch and worker, batches of 4. Chunks then
    span epochs (or no batch could ever be formed), each with its own seed."""
    task = build_task("det", {**task_entries(demo_root)["det"], "batch_size": 4})
    world = len(task.source("train").units)  # one unit per rank and epoch
    cfg = StreamConfig(min_rows_per_pass=32, chunk_rows=8)
    stream = TaskStream(task, seed=0, rank=3, world=world, cfg=cfg)
    plan = stream._chunks(0)
    assert [len(units) for _, _, units in plan] == [8, 8, 8, 8]
    assert len({seed for _, seed, _ in plan}) == len(plan)
    assert [u["path"] for _, _, units in plan for u in units] == [
        u["path"] for e in range(32) for u in stream._share(e)
    ]
