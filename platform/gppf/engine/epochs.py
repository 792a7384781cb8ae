"""Epochs to steps, once: how many SIMT steps make E epochs of a task.

A paper's schedule counts epochs of one dataset ("12 epochs of BDD100K detection"). Under SIMT the
workers spread over the tasks: at a step, a worker runs task t with probability p_t (its
sampler's share), so the cluster reads world x p_t x batch_t images of t per step, and

    steps(E epochs of t) = ceil(E x N_t / (world x p_t x batch_t))

where N_t is t's training-set size. p_t follows `train.sampler` over the tasks a stage trains:
sampling_weight / sum for simt and per_batch, 1 / #tasks for uniform, N_t / sum N for size, and
floor(N_t / batch_t) / sum for round_robin (each set's batches per epoch). A task attached to
another (`composite_with`, CompL) runs whenever its host does: it has its host's share. Only
the config and the sizes enter (a job states its datasets' sizes; nothing is listed on disk).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gppf.config.base import ConfigError

_DEFAULT_WEIGHT, _DEFAULT_BATCH = 1.0, 8  # TaskConfig's defaults


def task_shares(
    tasks: Mapping[str, Mapping[str, Any]],
    sizes: Mapping[str, int] | None = None,
    sampler: str = "simt",
    stage_tasks: Sequence[str] | Mapping[str, float] = (),
) -> dict[str, float]:
    """The probability that a worker runs each task at a step (attached tasks: their host's)."""
    chosen = list(stage_tasks) or [t for t, e in tasks.items() if not e.get("composite_with")]
    unknown = [t for t in chosen if t not in tasks]
    if unknown:
        raise ConfigError(f"epochs: task {unknown[0]!r} is not a task of the job ({', '.join(tasks)})")

    def weight(t: str) -> float:
        if isinstance(stage_tasks, Mapping):
            return float(stage_tasks[t])
        return float(tasks[t].get("sampling_weight", _DEFAULT_WEIGHT))

    def size(t: str) -> int:
        if sizes is None or t not in sizes:
            raise ConfigError(f"epochs: sampler {sampler!r} needs the training-set size of task {t!r}")
        return int(sizes[t])

    if sampler in ("simt", "per_batch"):
        raw = {t: weight(t) for t in chosen}
    elif sampler == "uniform":
        raw = {t: 1.0 for t in chosen if weight(t) > 0}
    elif sampler == "size":
        raw = {t: float(size(t)) for t in chosen if weight(t) > 0}
    elif sampler == "round_robin":
        raw = {t: float(max(1, size(t) // _batch(tasks, t))) for t in chosen if weight(t) > 0}
    else:
        raise ConfigError(f"epochs: unknown sampler {sampler!r}")
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError(f"epochs: the tasks {chosen} have no positive sampling weight")
    shares = {t: raw.get(t, 0.0) / total for t in tasks}
    for t, e in tasks.items():
        host = e.get("composite_with")
        if host:
            shares[t] = shares.get(host, 0.0)
    return shares


def _batch(tasks: Mapping[str, Mapping[str, Any]], task: str) -> int:
    return int(tasks[task].get("batch_size", _DEFAULT_BATCH))


def epochs_to_steps(
    epochs: float,
    task: str,
    tasks: Mapping[str, Mapping[str, Any]],
    sizes: Mapping[str, int],
    world: int,
    sampler: str = "simt",
    stage_tasks: Sequence[str] | Mapping[str, float] = (),
) -> int:
    """Steps in which the cluster reads `epochs` epochs of `task` (module docstring), at least 1.

    `tasks` are the job's task entries (`JobConfig.tasks`), `sizes` the training-set sizes (of
    `task`, and of every task for the size and round_robin samplers), `world` the number of
    workers, `stage_tasks` a stage's tasks (StageConfig.tasks; empty: all)."""
    if task not in tasks:
        raise ConfigError(f"epochs: no task {task!r} in the job ({', '.join(tasks)})")
    if task not in sizes or sizes[task] <= 0:
        raise ConfigError(f"epochs: the training-set size of task {task!r} must be given (> 0)")
    if world < 1 or epochs < 0:
        raise ConfigError(f"epochs: need world >= 1 and epochs >= 0, got {world} and {epochs}")
    share = task_shares(tasks, sizes, sampler, stage_tasks)[task]
    if share <= 0:
        raise ConfigError(f"epochs: task {task!r} is never sampled in this stage, so no number of steps")
    per_step = world * share * _batch(tasks, task)
    return max(1, math.ceil(epochs * sizes[task] / per_step))
