"""The SIMT step's pieces as functions of the model, the tasks and the batches, so that the trainer's
step and the planner's measurement (gppf.tools.capacity) run the same code."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from gppf.api.task import Task
from gppf.config.job import TrainConfig
from gppf.models.model import MultiTaskModel


def autocast_for(train: TrainConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The step's autocast context (AMP on CUDA when `train.amp`), as a factory."""
    if train.amp and device.type == "cuda":
        dtype = torch.float16 if train.amp_dtype == "float16" else torch.bfloat16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """Every random draw of a step (dropout, RPN/RoI sampling, Mixup, Gumbel noise) is a function of
    (seed, step, rank), so a run resumed from a checkpoint repeats it exactly: torch's generator is
    seeded from it, and it is handed to the tasks' batch-level augmentation."""
    rng = np.random.default_rng([seed, step, rank, 11])
    torch.manual_seed(int(rng.integers(2**62)))
    return rng


def forward_parts(
    model: MultiTaskModel, tasks: Sequence[Task], batches: Sequence[dict[str, Any]]
) -> tuple[list[Any], torch.Tensor]:
    """Head outputs of each part (the sampled task, then the auxiliary tasks it carries) and the BN
    tie (gppf.models.model): one trunk forward either way."""
    if len(tasks) == 1:
        out, tie = model(batches[0][tasks[0].input_key()], tasks[0].name, batches[0])
        return [out], tie
    named = [(t.name, b) for t, b in zip(tasks, batches)]
    return model.forward_composite(named, [t.input_key() for t in tasks])


def weighted_losses(
    tasks: Sequence[Task], outs: Sequence[Any], batches: Sequence[dict]
) -> list[torch.Tensor]:
    """Each part's weighted loss (CompL: L_t and λ L_a, λ the auxiliary task's loss_weight)."""
    return [t.loss(o, b) * t.cfg.loss_weight for t, o, b in zip(tasks, outs, batches)]
