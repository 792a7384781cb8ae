"""The hook contract: what a hook is told (Hook's events), what it may read and ask of the trainer
(TrainerView), what a step hands it (StepOutput) and where it leaves things to report
(PendingReport). The bundled hooks are in gppf.engine.hooks; the trainer that calls them is
gppf.engine.trainer.Trainer, which satisfies TrainerView."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepOutput:
    task: int  # index of the task this rank ran
    stats: torch.Tensor  # the step's payload summed over all workers (CPU)
    wait: float  # seconds this rank waited for its batch
    seconds: float  # wall time of the step on this rank


@dataclass
class PendingReport:
    """What hooks want reported after this step: extra metrics, a checkpoint, a forced log line."""

    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    log: bool = False
    # Reports of earlier steps that arrived now (asynchronous evaluations), each with its own
    # "step": logged and reported before this step's own report. Every rank has as many.
    earlier: list[dict[str, Any]] = field(default_factory=list)


class TrainerView(Protocol):
    """What hooks read and call on the trainer (gppf.engine.trainer.Trainer). Hooks written
    against this, rather than the Trainer class, stay valid as the trainer's internals change."""

    cfg: Any  # the job's JobConfig (gppf.config.job)
    rank: int
    world: int
    step: int  # the next step to run
    start_step: int  # the step this process started (or resumed) at
    total_steps: int
    stage_index: int
    plan: Any  # gppf.engine.stages.StagePlan
    tasks: list[Any]  # gppf.api.task.Task, in the job's order
    attached: dict[int, list[int]]  # sampled task -> auxiliary tasks that ride along
    model: nn.Module
    scheduler: Any
    report: PendingReport
    payload: Any  # gppf.dist.payload.StepPayload: a hook may put values into the trainer's slots
    hooks: list[Hook]
    initial_eval: dict[str, dict[str, float]] | None
    init_reports: list[Any]

    def stream(self, task: Any) -> Any: ...
    def enter_stage(self, index: int) -> None: ...
    def evaluate(
        self, max_batches: int = 0, names: list[str] | None = None
    ) -> dict[str, dict[str, float]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def run(self) -> None: ...


class Hook:
    """Override the events you need; all are no-ops here."""

    def before_train(self, t: TrainerView) -> None: ...
    def before_step(self, t: TrainerView) -> None: ...
    def after_optimizer_step(self, t: TrainerView) -> None: ...
    def after_step(self, t: TrainerView, out: StepOutput) -> None: ...
    def after_train(self, t: TrainerView) -> None: ...
    def close(self) -> None:
        """Called once at the end, also when training failed."""
