"""Asynchronous evaluation (`train.eval_async`): evaluations scored by Ray actors of their own
while training goes on.

At an evaluation step rank 0 copies the model's weights to the host, puts them into the object
store once, and hands each due task to one of `train.eval_actors` evaluator actors (round robin).
An evaluator reserves `train.eval_resources` for the whole run (CPUs, a GPU or a fraction of
one, on any node), holds the job's model and tasks, loads the snapshot and scores every rank's
share of the task's validation split exactly as the workers would (`evaluate(shares=...)`,
decoding in its own process): the metrics equal a blocking evaluation's at that step. Rank 0
polls without waiting (`ready`), and the trainer tells every rank, through the step's payload,
how many finished evaluations to report after a step, so that all ranks make the same number of
Ray Train reports (gppf.engine.hooks.EvalHook). Evaluations are reported in step order.

An evaluator scores one evaluation at a time; evaluations beyond `MAX_WAITING` per evaluator are
skipped with a warning rather than piled up (each holds a copy of the weights), which says that
the evaluators cannot keep up with the cadence.
"""

from __future__ import annotations

import json
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gppf.config.base import from_dict, to_dict
from gppf.config.job import JobConfig

MAX_WAITING = 4  # evaluations queued per evaluator before new ones are skipped


class Evaluator:
    """A Ray actor: the job's model and tasks, scoring weight snapshots on its own resources."""

    def __init__(self, job: dict[str, Any]):
        from gppf.api.registry import build_tasks
        from gppf.engine.step import autocast_for
        from gppf.models.build import build_model

        self.cfg = from_dict(JobConfig, job, where="config")
        tasks = build_tasks(self.cfg)
        self.tasks = {t.name: t for t in tasks}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(self.cfg, tasks).to(self.device)
        self.autocast = autocast_for(self.cfg.train, self.device)

    def score(self, weights: dict[str, Any], names: list[str], world: int) -> dict[str, Any]:
        from gppf.engine.evaluation import evaluate

        with warnings.catch_warnings():  # arrays from the object store are read-only; loading copies
            warnings.simplefilter("ignore", UserWarning)
            state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in weights.items()}
        self.model.load_state_dict(state)
        tasks = [self.tasks[n] for n in names]
        m = self.cfg.train.eval_max_batches
        shares = range(world)
        return evaluate(
            self.model, tasks, self.cfg.data, self.device, 0, world, m, self.autocast, shares, local=True
        )


def _array(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A tensor on the host as a numpy array (dtypes numpy lacks, such as bfloat16, stay tensors)."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        return t


@dataclass
class PendingEvaluation:
    step: int
    names: list[str]  # the tasks, in the job's order
    sent: Future  # -> one ObjectRef per evaluator call, each {task: metrics}


class AsyncEvaluations:
    """Rank 0's side: launches evaluations of weight snapshots and collects them in step order.

    The training thread only copies the weights into host buffers kept for the run (pinned, from
    a GPU without waiting for it); a thread of its own puts them into the object store (a 40 MB
    state_dict: 50-160 ms on this loaded 2-core machine, in the training thread it was half a
    step) and sends the evaluator calls."""

    def __init__(self, cfg: JobConfig, world: int):
        self.cfg, self.world = cfg, world
        self.actors: list[Any] = []
        self.pending: deque[PendingEvaluation] = deque()
        self._buffers: dict[str, torch.Tensor] = {}
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="gppf-eval-send")
        self._last: Future | None = None

    def _start_actors(self) -> None:
        import ray

        res = dict(self.cfg.train.eval_resources)
        cpus, gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
        actor = ray.remote(Evaluator).options(  # outside the trainers' (or a Tune trial's) placement group
            num_cpus=cpus, num_gpus=gpus, resources=res or None, scheduling_strategy="DEFAULT"
        )
        job = json.loads(json.dumps(to_dict(self.cfg)))
        self.actors = [actor.remote(job) for _ in range(self.cfg.train.eval_actors)]

    def launch(self, step: int, model: torch.nn.Module, names: list[str]) -> bool:
        """Score `names` on the weights `model` holds now (at `step`). False: skipped, because the
        evaluators still have MAX_WAITING evaluations each to do."""
        if not names:
            return True
        if len(self.pending) >= MAX_WAITING * self.cfg.train.eval_actors:
            return False
        if not self.actors:
            self._start_actors()
        if self._last is not None:
            self._last.result()  # the buffers hold the last snapshot until it is in the object store
        state = model.state_dict()
        for k, v in state.items():
            if k not in self._buffers:
                self._buffers[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
            self._buffers[k].copy_(v.detach(), non_blocking=True)
        event = torch.cuda.Event() if any(v.is_cuda for v in state.values()) else None
        if event is not None:
            event.record()
        self._last = self._sender.submit(self._send, event, names)
        self.pending.append(PendingEvaluation(step, names, self._last))
        return True

    def _send(self, event: torch.cuda.Event | None, names: list[str]) -> list[Any]:
        import ray

        if event is not None:
            event.synchronize()
        # As numpy arrays: ray.put writes those with one memcpy (pickled tensors: 10x slower).
        weights = ray.put({k: _array(b) for k, b in self._buffers.items()})
        n = len(self.actors)
        groups = [names[i::n] for i in range(n)]
        return [a.score.remote(weights, g, self.world) for a, g in zip(self.actors, groups) if g]

    def ready(self) -> int:
        """How many evaluations, oldest first, have finished (without waiting)."""
        import ray

        n = 0
        for p in self.pending:
            if not p.sent.done():
                break
            refs = p.sent.result()
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(done) < len(refs):
                break
            n += 1
        return n

    def take(self, n: int) -> list[tuple[int, dict[str, dict[str, float]]]]:
        """The oldest `n` evaluations as (step, {task: metrics}); waits for those not finished."""
        import ray

        out = []
        for _ in range(n):
            p = self.pending.popleft()
            merged: dict[str, dict[str, float]] = {}
            for part in ray.get(p.sent.result()):
                merged.update(part)
            out.append((p.step, {n: merged[n] for n in p.names}))
        return out

    def close(self) -> None:
        import ray

        self._sender.shutdown(wait=True, cancel_futures=True)
        for a in self.actors:
            ray.kill(a)
        self.actors, self.pending = [], deque()
