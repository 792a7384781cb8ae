from __future__ import annotations

import numpy as np
import pytest

from gppf.optim import warmup_cosine
from gppf.sampler import sample_task, task_schedule

W = [4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0]


def test_reproducible_from_seed_step_rank():
    a = task_schedule(W, seed=3, rank=1, start=0, stop=200)
    b = [sample_task(W, 3, s, 1) for s in range(200)]
    assert a == b
    assert a != task_schedule(W, seed=3, rank=2, start=0, stop=200)
    assert a != task_schedule(W, seed=4, rank=1, start=0, stop=200)
    # Resuming at step 100 gives the same tail.
    assert task_schedule(W, 3, 1, 100, 200) == a[100:]


def test_frequencies_follow_weights():
    counts = np.bincount([sample_task(W, 0, s, r) for s in range(2000) for r in range(4)], minlength=len(W))
    expected = np.array(W) / sum(W) * 8000
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 5)


def test_per_batch_ablation_runs_one_task_per_step():
    for s in range(50):
        assert len({sample_task(W, 0, s, r, per_batch=True) for r in range(8)}) == 1
    # ...while SIMT runs several tasks in most steps.
    assert sum(len({sample_task(W, 0, s, r) for r in range(8)}) > 1 for s in range(50)) > 40


def test_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        sample_task([0.0, 0.0], 0, 0, 0)


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
