"""A Ray Tune sweep's settings (gppf.launch.sweep runs it)."""

from __future__ import annotations

from dataclasses import dataclass

from gppf.config.base import ConfigError
from gppf.config.job import split_key

SEARCHERS = ("random", "optuna")


SCHEDULERS = ("asha", "fifo")


@dataclass
class SweepConfig:
    name: str = "tune_gppf"
    sweep_dir: str = "~/gppf_sweeps"  # the sweep lives in sweep_dir/name; an existing one is resumed
    # "task/metric" of an evaluation, or multitask/VTDA, multitask/delta_m (config.metrics)
    objective: str = "multitask/VTDA"
    mode: str = "max"  # or "min"
    num_samples: int = 8  # trials (each tune.grid_search entry multiplies them, as in Ray Tune)
    searcher: str = "random"  # random (and grid_search entries) or optuna (TPE)
    scheduler: str = "asha"  # asha (early stopping on the objective) or fifo (every trial runs to the end)
    grace_period: int = 0  # ASHA: steps a trial trains before it may be stopped; 0 = train.eval_every
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs and GPUs hold
    data_cpus_per_trial: float = 1.0  # CPUs each trial leaves free for its Ray Data decoding
    seed: int = 0  # the searcher's

    def __post_init__(self):
        where = "sweep"
        if self.mode not in ("max", "min"):
            raise ConfigError(f"{where}.mode must be 'max' or 'min', got {self.mode!r}")
        if self.searcher not in SEARCHERS:
            raise ConfigError(
                f"{where}.searcher must be one of {', '.join(SEARCHERS)}, got {self.searcher!r}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"{where}.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.num_samples < 1:
            raise ConfigError(f"{where}.num_samples must be >= 1, got {self.num_samples}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{where}.reduction_factor must be > 1, got {self.reduction_factor}")
        if self.max_concurrent < 0 or self.grace_period < 0 or self.data_cpus_per_trial < 0:
            raise ConfigError(f"{where}.max_concurrent, grace_period and data_cpus_per_trial must be >= 0")
        split_key(self.objective, f"{where}.objective")
