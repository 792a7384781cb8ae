"""What every Ray Train worker runs (`TorchTrainer(train_loop_per_worker=...)`): build the trainer,
restore or initialise it, wire the hooks to Ray Train's reports, run."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from gppf.api.hooks import Hook
from gppf.config.base import from_dict
from gppf.config.job import JobConfig
from gppf.engine.hooks import (
    CheckpointHook,
    EvalHook,
    ExportHook,
    MirrorHook,
    PlotHook,
    ReportHook,
    Sink,
    StageHook,
)
from gppf.engine.metrics_log import MetricsLogger, flat_eval, say
from gppf.engine.trainer import Trainer
from gppf.io import storage
from gppf.io.checkpoint import load_checkpoint, save_checkpoint
from gppf.io.storage import UriPath


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every `report` at INFO with its whole metrics dict (each rank's task for
    every step of the window), from every rank: kilobytes per report that bury the platform's own
    one-line progress. Its logger is named after its file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ray_sink(rank: int, report_every: int = 0, upload: str = "async") -> Sink:
    """Reports to Ray Train: evaluations also as flat `val/<task>/<metric>` keys (what Tune and
    callbacks read); rank 0 writes the checkpoint, every rank reports (it is a barrier). A log
    window without a checkpoint or an evaluation is reported only every `report_every` steps
    (`train.report_every`: each report waits for the controller's poll). The choice depends on
    the step and the report's content only, so every rank makes the same one.

    `upload="async"` (`train.checkpoint_upload`): the checkpoint is written to a local directory
    and Ray Train uploads it in a background thread (CheckpointUploadMode.ASYNC), deleting the
    local copy afterwards; it is registered, and so what a restart resumes from, only once the
    upload finished. "sync": the report waits for the upload."""
    import ray.train

    mode = ray.train.CheckpointUploadMode.ASYNC if upload == "async" else ray.train.CheckpointUploadMode.SYNC

    def sink(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        needed = state is not None or "eval" in metrics or "final_eval" in metrics
        if not needed and not (report_every and metrics.get("step", 0) % report_every == 0):
            return
        metrics = {**metrics, **flat_eval(metrics.get("eval") or {})}
        if state is None or rank != 0:
            ray.train.report(metrics)
            return
        d = tempfile.mkdtemp(prefix="gppf_checkpoint_")  # Ray deletes it after the upload
        save_checkpoint(state, d)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )

    return sink


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train

    _quiet_ray_train_reports()
    cfg = from_dict(JobConfig, config["job"], where="config")
    ctx = ray.train.get_context()
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.scaling.use_gpu else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts the worker group
    if ckpt is None and config.get("resume_from"):
        source = storage.path(config["resume_from"])
        ckpt = (
            ray.train.Checkpoint(source.fs_path, filesystem=source.filesystem)
            if isinstance(source, UriPath)
            else ray.train.Checkpoint.from_directory(source)
        )
    t = Trainer(cfg, device, initialise=ckpt is None)
    for report in t.init_reports:
        say(report.summary())
    if ckpt is not None:
        with ckpt.as_directory() as d:
            t.load_state_dict(load_checkpoint(d))
        if t.rank == 0:
            say(f"[gppf] resumed from checkpoint at step {t.step}")
    run_dir = storage.path(cfg.run_dir) / cfg.run_name
    sink = ray_sink(t.rank, cfg.train.report_every, cfg.train.checkpoint_upload)
    if isinstance(run_dir, UriPath):  # logs are written locally and uploaded (MirrorHook)
        mirror = MirrorHook(run_dir, t.rank)
        t.hooks = [*default_hooks(t, mirror.wrap(sink), mirror.local, extra=config.get("hooks")), mirror]
    else:
        t.hooks = default_hooks(t, sink, run_dir, extra=config.get("hooks"))
    t.run()


def _draw(run_dir: Path) -> list[Path]:
    """gppf.tools.plots.draw, imported when the plots are drawn: matplotlib costs every worker
    0.4 s of start-up otherwise."""
    from gppf.tools.plots import draw

    return draw(run_dir)


def default_hooks(t: Trainer, sink: Sink, run_dir: Path, extra: list[Hook] | None = None) -> list[Hook]:
    """The standard hooks in their order. `extra` hooks run after the checkpoint and before the
    report of each step, so what they put into `trainer.report.metrics` is reported that step."""
    logger = MetricsLogger(run_dir, t.total_steps) if t.rank == 0 else None
    return [
        StageHook(),
        EvalHook.from_config(t.cfg.train, t.cfg.metrics, t.total_steps),
        CheckpointHook(t.cfg.train.checkpoint_every),
        *(extra or []),
        ReportHook(sink, logger, t.cfg.train.log_every),
        PlotHook(run_dir, logger, _draw),
        *([ExportHook(run_dir)] if t.cfg.train.export_routes else []),
    ]
