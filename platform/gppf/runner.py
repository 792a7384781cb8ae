"""Driver side: validate a job config, launch the SIMT workers with Ray Train, print results."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from gppf.config import to_dict
from gppf.job_config import JobConfig
from gppf.train_loop import build_tasks, train_loop_per_worker


def resolve(cfg: JobConfig) -> JobConfig:
    """Check every task's data on the driver (clear errors before any worker starts) and fill in
    derived values (e.g. num_classes) so the workers and the run directory see the same config."""
    if not cfg.tasks:
        raise ValueError("config.tasks is empty: a job needs at least one task")
    for task in build_tasks(cfg):
        if type(task).__module__ == "__main__":
            raise ValueError(
                f"tasks.{task.name}: task type {type(task).__name__} is defined in the job script itself; "
                "workers cannot import it from there: move it into a module next to the script"
            )
        if not task.cfg.data_root:
            raise ValueError(f"tasks.{task.name}.data_root is not set")
        # Absolute: Ray Train workers run in their own working directory.
        root = Path(task.cfg.data_root).expanduser().absolute()
        task.cfg.data_root = str(root)
        if not root.is_dir():
            raise FileNotFoundError(f"task {task.name!r}: data root {root} does not exist")
        if not any(root.iterdir()):
            raise FileNotFoundError(f"task {task.name!r}: data root {root} is empty")
        task.check_data()
        cfg.tasks[task.name] = {
            "type": cfg.tasks[task.name]["type"],
            "plugin_module": type(task).__module__,
            **to_dict(task.cfg),
        }
    return cfg


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Inside `ray job submit` (or with RAY_ADDRESS set) this joins that cluster; otherwise it
    # starts a local instance, which is the embedded default.
    ray.init(num_cpus=num_cpus if not os.environ.get("RAY_ADDRESS") else None, log_to_driver=True)


def fit(cfg: JobConfig, resume_from: str | None = None) -> dict[str, Any]:
    """Run the job to completion; returns the final metrics (with initial and final evaluation)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve(copy.deepcopy(cfg))  # the caller's config stays as it was (sweeps reuse it)
    if not cfg.run_name:
        cfg.run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    cfg.run_dir = str(run_dir)  # absolute: Ray Train workers run in their own working directory
    out = run_dir / cfg.run_name
    if any(out.glob("checkpoint_*")):
        raise FileExistsError(
            f"run directory {out} already holds checkpoints; pick another run_name, or continue "
            f"that run with --resume {out}/<checkpoint>"
        )
    if resume_from:
        resume_from = str(Path(resume_from).expanduser().absolute())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    print(f"[gppf] run directory {out}", flush=True)
    ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "resume_from": resume_from},
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
            storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    metrics["run_dir"] = str(out)
    (out / "results.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def results_table(metrics: dict[str, Any]) -> str:
    """The per-task validation table: primary metric at step 0 and at the end."""
    initial = metrics.get("initial_eval") or {}
    final = metrics.get("final_eval") or {}
    rows = [("task", "metric", "step 0", f"step {metrics.get('step', '?')}", "change")]
    for task, m in final.items():
        for key, value in m.items():
            before = initial.get(task, {}).get(key)
            rows.append(
                (
                    task,
                    key,
                    "-" if before is None else f"{before:.2f}",
                    f"{value:.2f}",
                    "-" if before is None else f"{value - before:+.2f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for j, r in enumerate(rows):
        out.append("|".join(f" {c:<{widths[i]}} " for i, c in enumerate(r)))
        if j == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)
