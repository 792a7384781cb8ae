"""SIMT task choice as a pure function of (seed, step, rank).

A resumed or re-run job makes exactly the same choices, and any worker can compute any other
worker's future tasks without talking to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_task(weights: Sequence[float], seed: int, step: int, rank: int, per_batch: bool = False) -> int:
    """Index of the task worker `rank` runs at `step`, drawn with probability proportional to weights.

    per_batch=True is GPPF Table 1's ablation: every worker runs the same task at a step.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"task sampling weights must be non-negative with a positive sum, got {list(weights)}"
        )
    rng = np.random.default_rng([seed, step, 0 if per_batch else rank + 1])
    return int(rng.choice(len(w), p=w / w.sum()))


def task_schedule(
    weights: Sequence[float], seed: int, rank: int, start: int, stop: int, per_batch: bool = False
) -> list[int]:
    return [sample_task(weights, seed, s, rank, per_batch) for s in range(start, stop)]
