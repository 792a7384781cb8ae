"""Multi-task scores of one evaluation: VTDA (VTD §3.2 and App. F.2) and Δm (Maninis et al. 2019).

A score is named by a key "task/metric" into the evaluation dict {task: {metric: value}}.

VTDA: each task gets a scale s_t, given (`scale`) or from the spread σ_t of its metric over
single-task baselines (`sigma`: s_t = 1/⌈2σ_t⌉, so a metric that barely moves across networks
counts more); a group's score is the s_t-weighted mean of its tasks' scores, and VTDA is the sum
of the group scores. The scores are meant to be higher-is-better values in [0, 100].

Δm = 100/T · Σ_t (-1)^{l_t} (M_t - M_b,t) / M_b,t over the T keys of `baselines`, l_t = 1 for
the keys in `lower_is_better`: the mean relative change (in %) against single-task models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from gppf.config.base import ConfigError
from gppf.config.job import MultiTaskMetricsConfig, split_key

MULTITASK = "multitask"  # the pseudo-task these scores are reported under


def scale_from_sigma(sigma: float) -> float:
    """VTD's discretised scale s_t = 1/⌈2σ_t⌉."""
    return 1.0 / math.ceil(2.0 * sigma)


def task_scale(key: str, cfg: MultiTaskMetricsConfig) -> float:
    if key in cfg.scale:
        return cfg.scale[key]
    if key in cfg.sigma:
        return scale_from_sigma(cfg.sigma[key])
    return 1.0


def check_tasks(cfg: MultiTaskMetricsConfig, tasks: Iterable[str]) -> None:
    """Every configured key names a task of the job (checked before any worker starts)."""
    tasks = list(tasks)
    if cfg.enabled and MULTITASK in tasks:
        raise ConfigError(f"config.tasks.{MULTITASK}: the name is taken by config.metrics' scores")
    named = [
        (f"config.metrics.groups.{g}[{i}]", k) for g, keys in cfg.groups.items() for i, k in enumerate(keys)
    ]
    named += [(f"config.metrics.baselines.{k}", k) for k in cfg.baselines]
    for where, key in named:
        task, _ = split_key(key, where)
        if task not in tasks:
            raise ConfigError(f"{where}: {task!r} is not a task of this job (tasks: {', '.join(tasks)})")


def score(scores: dict[str, dict[str, float]], key: str, where: str) -> float:
    task, metric = split_key(key, where)
    if task not in scores:
        raise ConfigError(f"{where}: the evaluation has no task {task!r} (it has: {', '.join(scores)})")
    if metric not in scores[task]:
        raise ConfigError(
            f"{where}: task {task!r} reports no metric {metric!r} (its metrics: {', '.join(scores[task])})"
        )
    return float(scores[task][metric])


def vtda(scores: dict[str, dict[str, float]], cfg: MultiTaskMetricsConfig) -> dict[str, float]:
    """{"VTDA": sum of the group scores, "VTDA_<group>": each group's s_t-weighted mean}."""
    groups: dict[str, float] = {}
    for group, keys in cfg.groups.items():
        weights = [task_scale(k, cfg) for k in keys]
        values = [score(scores, k, f"config.metrics.groups.{group}[{i}]") for i, k in enumerate(keys)]
        groups[f"VTDA_{group}"] = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return {"VTDA": sum(groups.values()), **groups}


def delta_m(scores: dict[str, dict[str, float]], cfg: MultiTaskMetricsConfig) -> float:
    """Mean relative change (%) against the single-task baselines, positive when better."""
    if not cfg.baselines:
        raise ConfigError("config.metrics.baselines is empty: Δm needs single-task baselines")
    total = 0.0
    for key, base in cfg.baselines.items():
        sign = -1.0 if key in cfg.lower_is_better else 1.0
        total += sign * (score(scores, key, f"config.metrics.baselines.{key}") - base) / base
    return 100.0 * total / len(cfg.baselines)


def with_multitask(scores: dict[str, dict[str, float]], cfg: MultiTaskMetricsConfig) -> dict[str, Any]:
    """The evaluation with a `multitask` entry holding what `cfg` configures (none if nothing is):
    it then flows like a task's metrics into the results table, the logs and `val/multitask/...`."""
    if not cfg.enabled:
        return scores
    entry: dict[str, float] = {}
    if cfg.groups:
        entry.update(vtda(scores, cfg))
    if cfg.baselines:
        entry["delta_m"] = delta_m(scores, cfg)
    return {**scores, MULTITASK: entry}
