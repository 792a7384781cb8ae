"""Stages: a run as a sequence of phases, each a pure function of the global step.

    stages=[StageConfig("warmup", 1000, tasks=["in21k"]),
            StageConfig("joint", 8000),
            StageConfig("heads", 1000, freeze=["backbone.*"], lr_factor=0.1)]

A stage names the tasks it runs (with sampling weights), parameters it freezes (no gradient, no
optimizer state, BatchNorm in eval mode with its running statistics untouched) or the only ones
it trains (`train_only`), its learning rate (a factor on the job's schedule, or a warmup-cosine
of its own), whether the lego temperature τ keeps decaying, and options it hands to tasks
(`task_options`: LVIS's class-balanced second stage). Because the stage, the LR and τ at step s
depend on s alone, exact resume and elastic restarts work inside any stage with nothing saved. A
job without stages is one implicit stage: every task at its sampling_weight, nothing frozen, the
job's schedule.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import nn

from gppf.config.base import ConfigError
from gppf.config.job import StageConfig
from gppf.engine.optim import warmup_cosine, warmup_step


class StagePlan:
    """The stages of a run laid out on the global step axis."""

    def __init__(
        self,
        stages: list[StageConfig],
        task_weights: dict[str, float],
        total_steps: int,
        warmup_steps: int,
        min_lr_ratio: float = 0.0,
        decay_steps: list[int] | None = None,
        decay_factor: float = 0.1,
    ):
        """`decay_steps` (given): the job's schedule is a warmup then step decay (OptimConfig's
        schedule "step"); otherwise a warmup-cosine."""
        if not stages:
            stages = [StageConfig(name="train", steps=total_steps)]
        names = [s.name for s in stages]
        for i, s in enumerate(stages):
            if not s.name:
                raise ConfigError(f"stages[{i}]: every stage needs a name")
            if s.name in names[:i]:
                raise ConfigError(f"stages[{i}]: the stage name {s.name!r} is used twice")
        self.stages = stages
        self.task_names = list(task_weights)
        self.starts = [0]
        for s in stages:
            self.starts.append(self.starts[-1] + s.steps)
        self.total = self.starts[-1]
        self.weights = [self._weights(i, s, task_weights) for i, s in enumerate(stages)]
        self.warmup = min(warmup_steps, max(0, self.total - 1))
        self.min_lr_ratio = min_lr_ratio
        self.decay_steps = list(decay_steps or [])
        self.decay_factor = decay_factor
        decaying = [s.steps if s.tau_decay else 0 for s in stages]
        self.tau_starts = [sum(decaying[:i]) for i in range(len(stages) + 1)]

    def _weights(self, i: int, stage: StageConfig, task_weights: dict[str, float]) -> list[float]:
        chosen = stage.tasks or list(task_weights)
        wanted = chosen if isinstance(chosen, dict) else {t: task_weights.get(t, 0.0) for t in chosen}
        unknown = [t for t in wanted if t not in task_weights]
        if unknown:
            raise ConfigError(
                f"stages[{i}] ({stage.name}): unknown task {unknown[0]!r}; "
                f"the job has {', '.join(task_weights)}"
            )
        weights = [float(wanted.get(t, 0.0)) for t in task_weights]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"stages[{i}] ({stage.name}): sampling weights must be >= 0 with a positive sum"
            )
        return weights

    def index_at(self, step: int) -> int:
        """The stage that runs step `step` (0-based); the run's end belongs to the last stage."""
        return min(bisect.bisect_right(self.starts, step) - 1, len(self.stages) - 1)

    def is_stage_end(self, step: int) -> bool:
        """True when `step` steps complete a stage (a natural point for a checkpoint)."""
        return step in self.starts[1:]

    def weights_at(self, step: int) -> list[float]:
        return self.weights[self.index_at(step)]

    def tau_clock(self, step: int) -> tuple[int, int]:
        """(steps of τ decay done before `step`, all τ-decay steps of the run)."""
        i = self.index_at(step)
        done = self.tau_starts[i] + (step - self.starts[i] if self.stages[i].tau_decay else 0)
        return done, self.tau_starts[-1]

    def lr_multiplier(self, step: int) -> float:
        i = self.index_at(step)
        s = self.stages[i]
        if s.schedule == "stage":
            warm = min(s.warmup_steps, max(0, s.steps - 1))
            return s.lr_factor * warmup_cosine(
                step - self.starts[i], s.steps, warm, self.min_lr_ratio, s.warmup_factor
            )
        if self.decay_steps:
            return s.lr_factor * warmup_step(step, self.warmup, self.decay_steps, self.decay_factor)
        return s.lr_factor * warmup_cosine(step, self.total, self.warmup, self.min_lr_ratio)

    def describe(self, i: int) -> str:
        s = self.stages[i]
        tasks = ", ".join(f"{t}:{w:g}" for t, w in zip(self.task_names, self.weights[i]) if w > 0)
        frozen = f", frozen {', '.join(s.freeze)}" if s.freeze else ""
        lr = "" if s.lr_factor == 1 and s.schedule == "global" else f", lr x{s.lr_factor:g} ({s.schedule})"
        return (
            f"stage {i + 1}/{len(self.stages)} {s.name!r}: steps {self.starts[i]}..{self.starts[i + 1]} "
            f"tasks {tasks}{frozen}{lr}"
        )


def _matching(names: list[str], patterns: list[str], key: str, where: str) -> set[str]:
    out: set[str] = set()
    for pat in patterns:
        hit = fnmatch.filter(names, pat)
        if not hit:
            raise ConfigError(
                f"{where}: {key} pattern {pat!r} matches no parameter (names look like {names[0]!r})"
            )
        out.update(hit)
    return out


def check_task_options(stage: StageConfig, tasks: Mapping[str, Any], where: str) -> None:
    """A stage's `task_options` name tasks of the job and only options they take
    (`Task.check_stage_options`). The driver runs it for every stage before the run; the trainer
    on entering each."""
    unknown = [t for t in stage.task_options if t not in tasks]
    if unknown:
        raise ConfigError(f"{where}: task_options names task {unknown[0]!r}, not a task of this job")
    for name, options in stage.task_options.items():
        tasks[name].check_stage_options(options, where)


def frozen_parameters(
    model: nn.Module, patterns: list[str], where: str, train_only: list[str] = ()
) -> set[str]:
    """Names of the parameters matching any `freeze` pattern, and with `train_only` patterns also
    of every parameter matching none of those; a pattern matching nothing is an error."""
    names = [n for n, _ in model.named_parameters()]
    out = _matching(names, patterns, "freeze", where)
    if train_only:
        keep = _matching(names, list(train_only), "train_only", where)
        out.update(n for n in names if n not in keep)
    return out


# Layers whose training-mode forward changes state or adds noise: a frozen part keeps them in eval.
# A module may declare itself one with `eval_when_frozen = True` (a lego trunk's Gumbel controller:
# frozen, it routes by arg-max instead of sampling).
STATEFUL_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _stateful(m: nn.Module) -> bool:
    return isinstance(m, STATEFUL_LAYERS) or getattr(m, "eval_when_frozen", False)


def frozen_modules(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """The BatchNorm and dropout layers inside sub-modules all of whose parameters are frozen:
    they run in eval mode, so BN statistics stay as they are (cross-task BN then issues no
    collective) and dropout is off. The frozen modules themselves stay in training mode, because
    heads such as R-CNN compute their losses only in training mode."""
    out, taken = [], []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        params = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        if params and all(p in frozen for p in params):
            out.extend(m for m in module.modules() if _stateful(m))
            taken.append(name)
    return out
