"""Ray for this process: start or join an instance with the platform's system config and a quiet
terminal (the driver, tools and the CPF protocol share it)."""

from __future__ import annotations

import os
from typing import Any

from gppf.dist import terminal


def local_system_config() -> dict[str, Any]:
    """Ray settings for a Ray instance the platform starts itself (cluster.yaml sets the same).

    Idle worker processes beyond `num_workers_soft_limit` (default: the CPU count) are killed
    after a second. Each chunk of each task stream is a burst of decode tasks, so on a small node
    the pool churned: a worker was started (importing torch and the plugins, seconds of CPU) and
    killed again for every chunk, and per-batch sampling, whose workers all ask for the same
    task's chunk at once, trained 1.5-2.5x slower than SIMT on 2 CPUs (docs/benchmarks.md)."""
    if "RAY_num_workers_soft_limit" in os.environ:
        return {}
    return {"num_workers_soft_limit": max(8, 2 * (os.cpu_count() or 1))}


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> str | None:
    """Start or join Ray (once per process) with a quiet terminal (gppf.dist.terminal); returns the
    directory of Ray's log files, which keep every worker's full output."""
    import ray

    if not ray.is_initialized():
        terminal.quiet_ray_logging()
        # Inside `ray job submit` (or with RAY_ADDRESS set) this joins that cluster; otherwise it
        # starts a local instance, which is the embedded default.
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=log_to_driver)
        else:
            ray.init(num_cpus=num_cpus, log_to_driver=log_to_driver, _system_config=local_system_config())
    return terminal.quiet_worker_logs()
