"""Task choice as a pure function of (seed, step, rank, world) and the tasks' static sizes.

A resumed or re-run job makes exactly the same choices, and any worker can compute any other
worker's future tasks without talking to it. `train.sampler` picks the rule (`TaskSampler`);
the current stage's tasks (weight > 0 in `StagePlan.weights_at`) restrict every rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gppf.config.job import NEEDS_SIZES, SAMPLERS

if TYPE_CHECKING:
    from gppf.engine.stages import StagePlan


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


def round_robin_epoch(counts: Sequence[int]) -> np.ndarray:
    """One epoch of VTD's set-level round-robin (VTD §4.3, App. H.1): task t appears exactly
    counts[t] times, its batches spread evenly rather than back to back.

    Task t's k-th batch is due at (k + 0.5) / counts[t]; each slot takes the earliest-due task
    (ties: task order), but never the previous slot's task while the rest can still be laid out
    with no task twice in a row, and it takes a task now when it could not fit otherwise. Equal
    counts therefore cycle A, B, C, A, B, C; no two neighbouring slots within an epoch share a
    task unless one task holds more than half of the epoch (rounded up). The epoch's last and
    first slots (where it repeats) may hold the same task.
    """
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"round-robin batch counts must be >= 0 with a positive sum, got {counts}")
    active = [t for t, c in enumerate(counts) if c > 0]
    # Due times as exact integers over a common denominator: ties must be exact ties.
    scale = math.lcm(*(2 * counts[t] for t in active))
    step_of = {t: scale // counts[t] for t in active}  # 1 / counts[t] in units of 1 / scale
    due = {t: step_of[t] // 2 for t in active}
    left = {t: counts[t] for t in active}
    total = sum(counts)
    out = np.empty(total, dtype=np.int64)
    prev = -1
    for i in range(total):
        slots = total - i
        big = max(left, key=left.__getitem__)
        # Can the remaining batches be laid out without repeats, given the previous task?
        feasible = left[big] <= (slots + 1) // 2 and left.get(prev, 0) <= slots // 2
        if feasible and left[big] > slots // 2:
            pick = big  # must go now, or it runs out of gaps
        else:
            skip = prev if feasible else -1
            pick = min((due[t], t) for t in left if t != skip)[1]
        out[i] = pick
        left[pick] -= 1
        due[pick] += step_of[pick]
        if left[pick] == 0:
            del left[pick]
        prev = pick
    return out


class TaskSampler:
    """Which task a worker runs at a step, by `train.sampler`:

    - simt: each worker draws with the stage's sampling weights (GPPF's SIMT).
    - per_batch: one draw per step shared by all workers (GPPF Table 1's ablation).
    - uniform: each worker draws uniformly over the stage's tasks, ignoring the weights.
    - size: each worker draws with probability proportional to the task's training-set size.
    - round_robin: VTD's set-level round-robin without oversampling. An epoch of the stage is
      `round_robin_epoch(n)` with n_t = floor(size_t / batch_size_t) batches of task t (at least
      1, or a set smaller than one batch would never train), and rank r at step s (counted from
      the stage's start) takes entry (s * world + r) mod L, L = sum n_t: across the cluster each
      set gets n_t batches per epoch, in the epoch's order. "Every image once per epoch" is only
      approximate: each rank streams its own share of a task (gppf.data.stream), whose passes
      drop partial batches and do not line up with this epoch, and a world size that does not
      divide L shifts which rank takes which slot from one epoch to the next.

    Every rule is a pure function of (seed, step, rank, world) plus the static sizes, so exact
    resume works; a stage's inactive tasks (weight 0) are never chosen.
    """

    def __init__(
        self,
        name: str,
        plan: StagePlan,
        seed: int,
        sizes: Sequence[int] | None = None,
        batch_sizes: Sequence[int] | None = None,
    ):
        if name not in SAMPLERS:
            raise ValueError(f"unknown task sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        self.name = name
        self.plan = plan
        self.seed = seed
        n = len(plan.task_names)
        if name in NEEDS_SIZES:
            if sizes is None or len(sizes) != n:
                raise ValueError(f"sampler {name!r} needs the training-set size of each of the {n} tasks")
            empty = [t for t, s in zip(plan.task_names, sizes) if s <= 0]
            if empty:
                raise ValueError(f"sampler {name!r}: task {empty[0]!r} has no training images")
        if name == "round_robin" and (batch_sizes is None or len(batch_sizes) != n):
            raise ValueError(f"sampler 'round_robin' needs the batch size of each of the {n} tasks")
        self.sizes = list(sizes) if sizes is not None else None
        self.batch_sizes = list(batch_sizes) if batch_sizes is not None else None
        self._epochs: dict[int, np.ndarray] = {}

    def weights(self, stage: int) -> list[float]:
        """The draw weights of a random sampler in stage `stage` (zero outside the stage's tasks)."""
        stage_w = self.plan.weights[stage]
        if self.name == "uniform":
            return [1.0 if w > 0 else 0.0 for w in stage_w]
        if self.name == "size":
            return [float(s) if w > 0 else 0.0 for w, s in zip(stage_w, self.sizes)]
        return stage_w

    def epoch(self, stage: int) -> np.ndarray:
        """round_robin: the task sequence of one epoch of stage `stage` (computed once)."""
        if stage not in self._epochs:
            counts = [
                max(1, size // bs) if w > 0 else 0
                for w, size, bs in zip(self.plan.weights[stage], self.sizes, self.batch_sizes)
            ]
            self._epochs[stage] = round_robin_epoch(counts)
        return self._epochs[stage]

    def task_at(self, step: int, rank: int, world: int) -> int:
        stage = self.plan.index_at(step)
        if self.name == "round_robin":
            seq = self.epoch(stage)
            local = step - self.plan.starts[stage]
            return int(seq[(local * world + rank) % len(seq)])
        return sample_task(self.weights(stage), self.seed, step, rank, per_batch=self.name == "per_batch")
