"""Driver side: validate a job config, launch the SIMT workers with Ray Train, print results."""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray.train

from gppf.api.registry import build_tasks
from gppf.config.base import ConfigError, to_dict
from gppf.config.job import JobConfig, TrainConfig
from gppf.data import check as data_check
from gppf.dist.ray_env import ensure_ray
from gppf.engine import mt_metrics
from gppf.engine.composite import attached_tasks, sampling_weights
from gppf.io import storage
from gppf.io.storage import UriPath
from gppf.launch import finetune_config as finetune

if TYPE_CHECKING:
    from gppf.api.hooks import Hook
    from gppf.api.task import Task
    from gppf.engine.stages import StagePlan


def resolve(cfg: JobConfig) -> JobConfig:
    """Check every task's data on the driver (clear errors before any worker starts) and fill in
    derived values (e.g. num_classes) so the workers and the run directory see the same config.
    A check that passed before on the same files is not redone (gppf.data.check)."""
    tasks, plan = validate(cfg)
    cfg.train.steps = plan.total
    for key in ("model.init_from", "backbone.init_from"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            path = storage.absolute(value)
            if not storage.path(path).exists():
                raise FileNotFoundError(f"{key}: {storage.display(path)} does not exist")
            setattr(getattr(cfg, section), name, path)
    for task in tasks:
        if type(task).__module__ == "__main__":
            raise ValueError(
                f"tasks.{task.name}: task type {type(task).__name__} is defined in the job script itself; "
                "workers cannot import it from there: move it into a module next to the script"
            )
        if task.cfg.data_root:
            _resolve_data_root(task)
        elif task.needs_data_root:
            raise ValueError(
                f"tasks.{task.name}.data_root is not set (task type {cfg.tasks[task.name]['type']!r} reads "
                "its data from there; a plugin whose data comes with it sets `needs_data_root = False`)"
            )
        data_check.check(task, cfg.tasks[task.name]["type"])
        _resolve_extra_roots(task)
        cfg.tasks[task.name] = {
            "type": cfg.tasks[task.name]["type"],
            "plugin_module": type(task).__module__,
            **to_dict(task.cfg),
        }
    return cfg


def validate(cfg: JobConfig) -> tuple[list[Task], StagePlan]:
    """The checks of `resolve` that read no data (a sweep runs them on every corner of its
    search space): tasks build, composite attachments and stages are consistent."""
    from gppf.engine.stages import StagePlan, check_task_options

    if not cfg.tasks:
        raise ValueError("config.tasks is empty: a job needs at least one task")
    mt_metrics.check_tasks(cfg.metrics, cfg.tasks)  # metric names are known only at evaluation
    tasks = build_tasks(cfg)
    attached_tasks(tasks)  # composite-mode errors, too
    # Stage errors (unknown task, bad weights) surface here, before any worker starts.
    plan = StagePlan(cfg.stages, sampling_weights(tasks), cfg.train.steps, cfg.optim.warmup_steps)
    by_name = {t.name: t for t in tasks}
    for i, stage in enumerate(cfg.stages):  # every stage's task options, before any worker starts
        check_task_options(stage, by_name, f"stages[{i}] ({stage.name})")
    if cfg.stages and cfg.train.steps not in (plan.total, TrainConfig().steps):
        raise ConfigError(
            f"config.train.steps={cfg.train.steps}, but the run is its stages, which add up to "
            f"{plan.total} steps ({', '.join(f'{s.name} {s.steps}' for s in cfg.stages)}): set "
            "the stages' steps instead"
        )
    return tasks, plan


def _resolve_data_root(task: Task) -> None:
    # Absolute (Ray Train workers run in their own working directory), or a URI.
    task.cfg.data_root = storage.absolute(task.cfg.data_root)
    root = storage.path(task.cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"task {task.name!r}: data root {storage.display(root)} does not exist")
    if not any(root.iterdir()):
        raise FileNotFoundError(f"task {task.name!r}: data root {storage.display(root)} is empty")


def _resolve_extra_roots(task: Task) -> None:
    """Absolute extra train roots that exist and list train data this task reads like its own."""
    roots = []
    for i, value in enumerate(task.cfg.extra_train_roots):
        root = storage.absolute(value)
        if not storage.path(root).is_dir():
            raise FileNotFoundError(
                f"tasks.{task.name}.extra_train_roots[{i}]: {storage.display(root)} does not exist"
            )
        roots.append(root)
    task.cfg.extra_train_roots = roots
    if roots:
        task.extra_train_units(task.source("train").read)


class FinalReport(ray.train.UserCallback):
    """Keeps the run's final report (rank 0's metrics, with the final evaluation) in a file on the
    driver's node, where Ray Train runs its controller and so its callbacks. (`Result.metrics`
    holds only reports that carry a checkpoint; the final weights are checkpointed before the
    final evaluation, so that report need not carry them a second time.)"""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "final_eval" in metrics[0]:
            Path(self.path).write_text(json.dumps(metrics[0], default=str))


def run_directory(cfg: JobConfig) -> Path | UriPath:
    return storage.path(storage.absolute(cfg.run_dir)) / cfg.run_name


def _storage(cfg: JobConfig) -> dict[str, Any]:
    """Ray Train's storage arguments: a local (or shared) path, or a filesystem and its path."""
    run_dir = storage.path(cfg.run_dir)
    if isinstance(run_dir, UriPath):
        return {"storage_path": run_dir.fs_path, "storage_filesystem": run_dir.filesystem}
    return {"storage_path": str(run_dir)}


def fit(
    cfg: JobConfig,
    resume_from: str | None = None,
    callbacks: list[Any] | None = None,
    hooks: list[Hook] | None = None,
) -> dict[str, Any]:
    """Run the job to completion; returns the final metrics (with initial and final evaluation).

    resume_from: a checkpoint directory (a new run continues from it), or a run directory (that
        run continues in place, from its newest checkpoint);
    callbacks: Ray Train callbacks (`ray.train.UserCallback`, Tune's `TuneReportCallback`), passed
        to the run config: they see the reports that carry a checkpoint or an evaluation, the
        final one, and log windows every `train.report_every` steps (default: none);
    hooks: extra trainer hooks (gppf.api.hooks.Hook, picklable), run on every worker after the
        checkpoint hook and before the step's report (gppf.launch.worker.default_hooks).
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    from gppf.launch.worker import train_loop_per_worker

    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was (sweeps reuse it)
    in_place = bool(resume_from) and any(storage.path(resume_from).glob("checkpoint_*"))
    if in_place:  # Ray Train restores a run directory's newest checkpoint by itself
        run = storage.path(storage.absolute(resume_from))
        cfg.run_dir, cfg.run_name, resume_from = str(run.parent), run.name, None
    if not cfg.run_name:
        # Unique per call: two runs (or Tune trials) started in the same second must not share one.
        cfg.run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    cfg.run_dir = storage.absolute(cfg.run_dir)  # Ray Train workers run elsewhere
    out = run_directory(cfg)
    if any(out.glob("checkpoint_*")) and not in_place:
        raise FileExistsError(
            f"run directory {storage.display(out)} already holds checkpoints; pick another run_name, "
            f"or continue that run with --resume {storage.display(out)}"
        )
    if resume_from:
        resume_from = storage.absolute(resume_from)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(finetune.prepare(cfg, out))
    # The controller (and so FinalReport) runs on the driver's node: a local file, also when
    # run_dir is in object storage.
    final_report = (
        out / "final_report.json" if isinstance(out, Path) else storage.local_mirror("report") / "r.json"
    )
    final_report.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    print(f"[gppf] run directory {storage.display(out)}", flush=True)
    logs = ensure_ray()
    if logs:
        print(f"[gppf] Ray's own messages (dataset executions, worker groups) go to {logs}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "resume_from": resume_from, "hooks": hooks},
        torch_config=TorchConfig(
            backend="nccl" if cfg.scaling.use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers(),
            use_gpu=cfg.scaling.use_gpu,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **({"GPU": 1} if cfg.scaling.use_gpu else {}),
                **cfg.scaling.resources_per_worker,
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            **_storage(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[*(callbacks or []), FinalReport(str(final_report))],
        ),
    )
    result = trainer.fit()
    metrics = json.loads(final_report.read_text()) if final_report.is_file() else dict(result.metrics or {})
    final_report.unlink(missing_ok=True)
    ckpt = result.checkpoint.path if result.checkpoint else None
    metrics["checkpoint"] = str(out / Path(ckpt).name) if ckpt and isinstance(out, UriPath) else ckpt
    metrics["run_dir"] = str(out)
    (out / "results.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


