"""A quiet driver terminal: the platform's progress lines, warnings, errors and tables, not Ray's
per-dataset and per-worker-group chatter.

Ray forwards every line its workers print to the driver. A run executes one Ray Data dataset per
chunk of every task stream and per evaluation, and restarts worker groups on failures, so at the
paper's scale (8 tasks, 56 workers, 500k steps) those lines bury the progress lines. They are
dropped from the driver's terminal only: every worker's full output stays in Ray's log files
(`<session>/logs/worker-*.out|err`, printed once at start-up), and GPPF_VERBOSE_RAY=1 shows
everything on the terminal again.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

# Lines Ray prints on every dataset execution, worker-group start or checkpoint: their information
# is in the platform's own lines (progress, "resumed from checkpoint at step N", the run directory).
NOISE = re.compile(
    "|".join(
        [
            # Ray Data, once per dataset execution
            r"Progress bars disabled\. To enable",
            r"does not have any available CPUs\. The Dataset job will hang",
            r"Dataset \S+ execution finished in",
            r"registers for logging while another dataset",
            r"Starting execution of Dataset",
            r"Execution plan of Dataset",
            r"Registered dataset logger for dataset",
            r"Full stats for dataset",
            # Ray Train, once per worker-group start and checkpoint
            r"Requesting resources: \{",
            r"Attempting to start training worker group",
            r"Started training worker group of size",
            r"^\s*- \(ip=\S+, pid=\d+\) world_rank=",
            r"Setting up process group for: ",
            r"Checkpoint successfully created at: ",
            r"Actor with class name: 'PreemptionWatcher'.*has constructor arguments",
            r"Failed to query Ray Train Controller actor state",
        ]
    )
)
# Ray's own driver-side messages that say nothing actionable to a platform user.
DRIVER_NOISE = re.compile(
    r"Token authentication is enabled for this Ray cluster|Progress bars disabled\. To enable"
)
# The loggers that emit them (a logger's filters apply to its own records only).
DRIVER_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


class _DriverFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not DRIVER_NOISE.search(record.getMessage())


def quiet_ray_logging() -> None:
    """Before ray.init: drop Ray's driver-side notices that are noise (idempotent)."""
    if os.environ.get("GPPF_VERBOSE_RAY"):
        return
    for name in DRIVER_LOGGERS:  # Ray Data's runs in the driver when it reads data itself (--plan)
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DriverFilter) for f in logger.filters):
            logger.addFilter(_DriverFilter())


def quiet_worker_logs() -> str | None:
    """After ray.init: forward workers' lines to this terminal without the noise. Returns the log
    directory that keeps everything (None where Ray's log forwarding could not be wrapped, and then
    nothing is filtered).

    Ray has no public hook for this: the wrap replaces the handler `ray.init(log_to_driver=True)`
    registers on the driver's log dispatcher, and does nothing when that handler is absent
    (log_to_driver=False) or already wrapped."""
    if os.environ.get("GPPF_VERBOSE_RAY"):
        return None
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        current = dict(dispatcher.handlers).get("ray_print_logs")
        if current is None:
            return None
        if not getattr(current, "gppf_quiet", False):

            def quiet(data: dict[str, Any]) -> None:
                lines = [line for line in data.get("lines", []) if not is_noise(line)]
                if lines:
                    current({**data, "lines": lines})

            quiet.gppf_quiet = True  # type: ignore[attr-defined]
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", quiet)
        node = ray_worker.global_worker.node
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:  # a Ray without these internals: forward everything rather than fail a run
        return None
