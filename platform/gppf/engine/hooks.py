"""Hooks: everything the trainer does around the step (detectron2's HookBase, Lightning's callbacks).

| hook | before_train | before_step | after_step | after_train |
|---|---|---|---|---|
| StageHook | starts the stage's streams | enters the stage of this step (and starts its streams) | | |
| EvalHook | step-0 evaluation | (async) any done? | every `eval_every` steps (async: sent off) | final one |
| CheckpointHook | | | every `checkpoint_every` steps, stage ends, the last step | |
| ReportHook | | | log line + Ray Train report | last log line + final report |
| PlotHook | | | | selection plots (lego) |
| ExportHook | | | | each task's route as a plain backbone (`train.export_routes`) |
| MirrorHook | | | uploads the logs after a checkpoint | (on close) uploads the logs (run_dir a URI) |

Hooks run in that order. A hook that issues collectives (evaluation, the state gather of a
checkpoint) runs on every rank at the same steps; only rank 0 writes files. Hooks put what they
want reported into `trainer.report`; ReportHook sends one report per step that has something.
A new hook subclasses `Hook` and is passed to `fit(cfg, hooks=[...])` (they run between
CheckpointHook and ReportHook) or to `Trainer(hooks=...)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gppf.api.hooks import Hook
from gppf.config.job import MultiTaskMetricsConfig, evaluates_asynchronously
from gppf.engine.async_eval import AsyncEvaluations
from gppf.engine.metrics_log import MetricsLogger, MetricWindow, say
from gppf.engine.mt_metrics import with_multitask

if TYPE_CHECKING:
    from gppf.api.hooks import StepOutput
    from gppf.config.job import TrainConfig
    from gppf.engine.trainer import Trainer
    from gppf.io.storage import UriPath

# (metrics, checkpoint state or None) -> None; every rank calls it at the same steps.
Sink = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class StageHook(Hook):
    """Switches stages (the stage of a step is a function of the step, gppf.engine.stages) and starts the
    streams of a stage's tasks as it begins: their first chunks decode while the step-0
    evaluation runs, instead of inside the first training steps."""

    def before_train(self, t: Trainer) -> None:
        self._announce(t)

    def before_step(self, t: Trainer) -> None:
        index = t.plan.index_at(t.step)
        if index != t.stage_index:
            t.enter_stage(index)
            self._announce(t)

    @staticmethod
    def _announce(t: Trainer) -> None:
        for i in StageHook.first_use(t):
            for j in [i, *t.attached.get(i, [])]:
                t.stream(t.tasks[j]).start()
        if t.rank == 0 and len(t.plan.stages) > 1:
            say(f"[gppf] {t.plan.describe(t.stage_index)}")


    @staticmethod
    def first_use(t: Trainer, horizon: int = 1000) -> list[int]:
        """The stage's tasks in the order this rank first samples them (the sampler is a pure
        function of seed, step and rank), those not met within `horizon` steps last: priming in
        this order puts the first steps' batches first in the cluster's decode queue."""
        weights = t.plan.weights[t.stage_index]
        order: list[int] = []
        for step in range(t.step, t.step + horizon):
            if t.plan.index_at(step) != t.stage_index or len(order) == sum(w > 0 for w in weights):
                break
            if (i := t.task_at(step)) not in order:
                order.append(i)
        return order + [i for i, w in enumerate(weights) if w > 0 and i not in order]


class EvalHook(Hook):
    """Validation metrics at step 0 (`at_start`), every `every` steps (a task's own
    `tasks.<t>.eval_every` where set) and at the end, at most `max_batches` per task and worker
    (0: all), with the multi-task scores of `metrics` as the pseudo-task `multitask`
    (gppf.engine.mt_metrics) when every task was scored. `from_config` reads them from a job's config.

    Blocking (the default for short runs): every rank stops and scores its share of each split;
    the results go to that step's report. Asynchronous (`asynchronous`, `train.eval_async`): rank 0
    hands the weights of the step to evaluator actors (gppf.engine.async_eval) and training goes
    on; an evaluation that finished is reported at its own step after a later step (every rank
    learns how many from the step's payload slot `rank0_reports`, so all make the same reports).
    The final evaluation waits for those still out, then is blocking. Every evaluation is kept in
    `history` and reported with the final one (`evaluations`: results.json)."""

    def __init__(
        self,
        every: int = 0,
        max_batches: int = 0,
        at_start: bool = True,
        metrics: MultiTaskMetricsConfig | None = None,
        asynchronous: bool = False,
    ):
        self.every, self.max_batches, self.at_start = every, max_batches, at_start
        self.metrics = metrics if metrics is not None else MultiTaskMetricsConfig()
        self.asynchronous = asynchronous
        self.remote: AsyncEvaluations | None = None  # rank 0's, when asynchronous
        self.history: list[dict[str, Any]] = []
        self.launch_seconds: dict[int, float] = {}  # rank 0: step -> seconds spent sending it off

    @classmethod
    def from_config(
        cls, train: TrainConfig, metrics: MultiTaskMetricsConfig, total_steps: int = 0
    ) -> EvalHook:
        """`total_steps`: the run's length (its stages'), for `train.eval_async="auto"`."""
        on = evaluates_asynchronously(train, total_steps)
        return cls(train.eval_every, train.eval_max_batches, train.eval_at_start, metrics, asynchronous=on)

    def due(self, t: Trainer) -> list[str]:
        """The tasks evaluated after step t.step: each at its own cadence, or every `every` steps."""
        return [
            task.name
            for task in t.tasks
            if (every := task.cfg.eval_every or self.every) and t.step % every == 0
        ]

    def _scores(self, t: Trainer, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        """With the multi-task entry when the evaluation covers every task."""
        whole = {task.name for task in t.tasks} <= set(results)
        return with_multitask(results, self.metrics) if whole else results

    def evaluate(self, t: Trainer, names: list[str] | None = None) -> dict[str, Any]:
        scores = self._scores(t, t.evaluate(self.max_batches, names))
        self.history.append({"step": t.step, "eval": scores})
        return scores

    def before_train(self, t: Trainer) -> None:
        if self.asynchronous and t.rank == 0:
            self.remote = AsyncEvaluations(t.cfg, t.world)
        if t.step == 0 and not t.initial_eval and self.at_start:
            if self.asynchronous:
                self._launch(t, [task.name for task in t.tasks])
                return
            t.initial_eval = self.evaluate(t)
            t.report.metrics["eval"] = t.initial_eval
            t.report.log = True

    def before_step(self, t: Trainer) -> None:
        if self.remote is not None:
            n = self.remote.ready()
            if n:
                t.payload.add("rank0_reports", 0, n)

    def after_step(self, t: Trainer, out: StepOutput) -> None:
        if self.asynchronous:
            n = int(t.payload.view(out.stats, "rank0_reports")[0])
            if n:
                t.report.earlier += self._arrived(t, n)
        if t.step >= t.total_steps:  # the end: after_train
            return
        names = self.due(t)
        if not names:
            return
        if self.asynchronous:
            self._launch(t, names)
        else:
            t.report.metrics["eval"] = self.evaluate(t, names)
            t.report.log = True

    def after_train(self, t: Trainer) -> None:
        if self.asynchronous:  # what is still out, in step order, before the final evaluation
            t.report.earlier += self._arrived(t, self._count_pending(t))
        final = self.evaluate(t)
        t.report.metrics.update(
            eval=final, final_eval=final, initial_eval=t.initial_eval, evaluations=list(self.history)
        )

    def _launch(self, t: Trainer, names: list[str]) -> None:
        if self.remote is None:  # ranks other than 0
            return
        t0 = time.perf_counter()
        launched = self.remote.launch(t.step, t.model, names)
        self.launch_seconds[t.step] = time.perf_counter() - t0
        if not launched:
            waiting = ", ".join(str(p.step) for p in self.remote.pending)
            say(
                f"[gppf] evaluation at step {t.step} skipped: the evaluators are still on the ones of "
                f"steps {waiting} (add train.eval_actors, give them more train.eval_resources, or "
                "evaluate less often)"
            )

    def _count_pending(self, t: Trainer) -> int:
        """Rank 0's number of evaluations still out, on every rank (a collective)."""
        import torch
        import torch.distributed as dist

        from gppf.dist.eval_group import eval_group

        n = torch.tensor([len(self.remote.pending) if self.remote is not None else 0])
        if t.world > 1:
            dist.broadcast(n, src=0, group=eval_group())
        return int(n)

    def _arrived(self, t: Trainer, n: int) -> list[dict[str, Any]]:
        """Reports of the `n` oldest asynchronous evaluations: on rank 0 their results at their own
        steps (waiting for any not finished yet); elsewhere stand-ins, so every rank reports alike."""
        if self.remote is None:
            return [{"step": t.step, "eval": {}} for _ in range(n)]
        out = []
        for step, results in self.remote.take(n):
            scores = self._scores(t, results)
            if step == 0 and not t.initial_eval:
                t.initial_eval = scores
            self.history.append({"step": step, "eval": scores})
            out.append({"step": step, "start_step": t.start_step, "eval": scores, "reported_at_step": t.step})
        return out

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


class CheckpointHook(Hook):
    """Checkpoints every `every` steps (0: none but these), at the end of every stage and at the end
    of the run (before the final evaluation: an evaluation that fails leaves the final weights)."""

    def __init__(self, every: int = 0):
        self.every = every

    def after_step(self, t: Trainer, out: StepOutput) -> None:
        every = self.every
        if t.step == t.total_steps or (every and t.step % every == 0) or t.plan.is_stage_end(t.step):
            t.report.checkpoint = t.state_dict()  # collective: every rank calls it


class ReportHook(Hook):
    """Metric windows -> rank 0's log (metrics.jsonl, TensorBoard, terminal) and one `sink` call
    (a Ray Train report) per step that logs, evaluates or checkpoints.

    Steps that are a multiple of `log_every` log; the last step's line waits for the final
    evaluation, so each step has one line."""

    def __init__(self, sink: Sink, logger: MetricsLogger | None, log_every: int = 1):
        self.log_every = max(1, log_every)
        self.sink = sink
        self.logger = logger
        self.window: MetricWindow | None = None
        self.last: dict[str, Any] = {}
        self.deferred: dict[str, Any] | None = None

    def before_train(self, t: Trainer) -> None:
        self.window = MetricWindow(t)
        self.last = {"step": t.step, "start_step": t.start_step, "world_size": t.world}
        if t.report.metrics or t.report.log:  # the step-0 evaluation
            self._emit(t, {**self.last, **t.report.metrics}, log=True)

    def after_step(self, t: Trainer, out: StepOutput) -> None:
        self.window.add(out)
        self._emit_earlier(t)
        log = t.step % self.log_every == 0 or t.step == t.total_steps or t.report.log
        if not (log or t.report.checkpoint is not None or t.report.metrics):
            return
        window = self.window.metrics(t)
        if log:
            self.window.reset()
            self.last = window
        metrics = {**window, **t.report.metrics}
        if t.step == t.total_steps:
            self.deferred, log = metrics, False
        self._emit(t, metrics, log)

    def after_train(self, t: Trainer) -> None:
        self._emit_earlier(t)
        final = {**(self.deferred or self.last), **t.report.metrics}
        if self.logger:  # the run's last line: the last window with the final evaluation
            skip = ("final_eval", "initial_eval", "evaluations")
            self.logger.log({k: v for k, v in final.items() if k not in skip})
        self._emit(t, final, log=False)

    def _emit_earlier(self, t: Trainer) -> None:
        """Reports of earlier steps (asynchronous evaluations), each logged at its own step."""
        for metrics in t.report.earlier:
            if self.logger:
                self.logger.log(metrics)
            self.sink(metrics, None)
        t.report.earlier = []

    def _emit(self, t: Trainer, metrics: dict[str, Any], log: bool) -> None:
        if log and self.logger:
            self.logger.log(metrics)
        self.sink(metrics, t.report.checkpoint)
        t.report.metrics, t.report.checkpoint, t.report.log = {}, None, False

    def close(self) -> None:
        if self.logger:
            self.logger.close()


class PlotHook(Hook):
    """Rank 0 draws the selection plots of a lego run (GPPF Fig. 3 and 11) from metrics.jsonl
    into the run directory and TensorBoard."""

    def __init__(self, run_dir: Path, logger: MetricsLogger | None, draw: Callable[[Path], list[Path]]):
        self.run_dir = run_dir
        self.logger = logger
        self.draw = draw  # gppf.tools.plots.draw: the hook is handed it (tools sit above the engine)

    def after_train(self, t: Trainer) -> None:
        if t.rank != 0 or not t.model.backbone.routes():
            return
        for path in self.draw(self.run_dir):
            if self.logger:
                self.logger.add_image(f"selection/{path.stem}", path, t.step)


class ExportHook(Hook):
    """Rank 0 writes each task's arg-max route as a plain timm state_dict (`route_<task>.pt`) into
    the run directory at the end (`train.export_routes`; dynamic finetuning turns it on)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def after_train(self, t: Trainer) -> None:
        if t.rank != 0:
            return
        import torch

        trunk = t.model.backbone
        for task, r in trunk.routes().items():
            path = self.run_dir / f"route_{task}.pt"
            torch.save(trunk.export(task), path)
            loads = f"timm.create_model({trunk.timm_name!r}, num_classes=0) loads it"
            say(f"[gppf] route {r['route']} of {task} -> {path} ({loads})")


class MirrorHook(Hook):
    """For a run directory in object storage (a URI, gppf.io.storage): rank 0 writes metrics.jsonl,
    TensorBoard, plots and routes into a local directory, primed with the run's earlier logs when
    it resumes, and uploads them after each checkpoint's report (so the logs in storage reach as
    far as the newest checkpoint) and at the end, also when training failed. Checkpoints go to
    storage through Ray Train itself. It runs last, so its close follows the logger's."""

    LOGS = ("metrics.jsonl", "tensorboard")  # what a resumed run appends to

    def __init__(self, remote: UriPath, rank: int):
        from gppf.io import storage

        self.remote, self.rank = remote, rank
        self.local = storage.local_mirror(remote.name)
        if rank == 0:
            storage.copy_tree(remote, self.local, only=self.LOGS)

    def wrap(self, sink: Sink) -> Sink:
        def synced(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
            sink(metrics, state)
            if state is not None:
                self.upload()

        return synced

    def upload(self) -> None:
        if self.rank == 0:
            from gppf.io import storage

            storage.copy_tree(self.local, self.remote)

    def close(self) -> None:  # after ReportHook's, which flushes TensorBoard: the last upload
        self.upload()


