"""A Ray Tune sweep's settings (gppf.launch.sweep runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gppf.config.base import ConfigError, check_choice
from gppf.config.job import split_key

Searcher = Literal["random", "optuna"]
SEARCHERS = get_args(Searcher)


Scheduler = Literal["asha", "fifo"]
SCHEDULERS = get_args(Scheduler)


@dataclass
class SweepConfig:
    name: str = "tune_gppf"
    sweep_dir: str = "~/gppf_sweeps"  # the sweep lives in sweep_dir/name; an existing one is resumed
    # "task/metric" of an evaluation, or multitask/VTDA, multitask/delta_m (config.metrics)
    objective: str = "multitask/VTDA"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8  # trials (each tune.grid_search entry multiplies them, as in Ray Tune)
    searcher: Searcher = "random"  # random (and grid_search entries) or optuna (TPE)
    # asha (early stopping on the objective) or fifo (every trial runs to the end)
    scheduler: Scheduler = "asha"
    grace_period: int = 0  # ASHA: steps a trial trains before it may be stopped; 0 = train.eval_every
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs and GPUs hold
    data_cpus_per_trial: float = 1.0  # CPUs each trial leaves free for its Ray Data decoding
    seed: int = 0  # the searcher's

    def __post_init__(self):
        where = "sweep"
        check_choice(self.mode, ("max", "min"), f"{where}.mode")
        check_choice(self.searcher, Searcher, f"{where}.searcher")
        check_choice(self.scheduler, Scheduler, f"{where}.scheduler")
        if self.num_samples < 1:
            raise ConfigError(f"{where}.num_samples must be >= 1, got {self.num_samples}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{where}.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.max_concurrent < 0 or self.grace_period < 0 or self.data_cpus_per_trial < 0:
            raise ConfigError(f"{where}.max_concurrent, grace_period and data_cpus_per_trial must be >= 0")
        split_key(self.objective, f"{where}.objective")
