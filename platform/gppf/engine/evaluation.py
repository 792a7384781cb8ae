"""Evaluation of a model on its tasks' validation splits: each worker scores its share of every
split, the evaluators' states are summed over the workers (a collective when there are several).
The trainer's periodic evaluation, the asynchronous evaluators (gppf.engine.async_eval) and
`gppf.tools.evaluate` run this same function."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from gppf.api.task import Task
from gppf.config.job import StreamConfig
from gppf.data.stream import eval_batches
from gppf.models.model import MultiTaskModel


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    tasks: Sequence[Task],
    data: StreamConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    max_batches: int = 0,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    shares: Sequence[int] | None = None,
    local: bool = False,
) -> dict[str, dict[str, float]]:
    """{task: metrics}; `max_batches` per task and worker (0: the whole split). `shares`: the ranks
    whose shares of each split this process scores (default: its own); an asynchronous evaluator
    scores every rank's, so that it sees the images the workers would. `local`: decode in this
    process instead of in Ray tasks. Leaves the model in eval mode: the caller restores its
    training mode."""
    model.eval()
    results = {}
    for task in tasks:
        ev = task.evaluator()
        for r in shares if shares is not None else [rank]:
            for batch in eval_batches(task, r, world, data, max_batches, local=local):
                batch = task.to_device(batch, device)
                with autocast():
                    out = task.infer(lambda x, t=task, b=batch: model(x, t.name, b)[0], batch)
                ev.update(out.float() if torch.is_tensor(out) else out, batch)
        ev.synchronize(device)
        results[task.name] = ev.compute()
    return results
