"""The worker silences Ray Train's per-report INFO line (the whole metrics dict, every rank)."""

from __future__ import annotations

import logging
from pathlib import Path

from ray.train.v2._internal.execution import context

from gppf.launch.worker import _quiet_ray_train_reports


def test_ray_train_report_log_is_silenced(caplog):
    caplog.set_level(logging.INFO)  # the root level in a Ray worker
    logging.getLogger(context.__file__).setLevel(logging.NOTSET)
    assert context.logger.isEnabledFor(logging.INFO)  # the line would be printed
    _quiet_ray_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO)
    assert context.logger.isEnabledFor(logging.WARNING)


# Lines the driver printed for README command 1 before gppf.dist.terminal (worker prefixes stripped).
RAY_NOISE = [
    "Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless "
    "more CPUs are freed up.",
    "Dataset dataset_12_0 execution finished in 0.07 seconds",
    "Requesting resources: {'CPU': 0.5} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 0.5}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=18512) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/root/gppf_runs/x/checkpoint_1)",
]
KEPT = [
    "[gppf] step 30/360 demo_cls=1.334 lr=0.0186 data_wait=0.0% step=596ms elapsed=50s eta=4m10s",
    "[gppf] eval at step 0: demo_cls top1=23.00",
    "[gppf] warning: task demo_det: no batch for 120 s",
    "Traceback (most recent call last):",
    "ValueError: tasks.demo_cls.batch_size must be > 0",
    "my plugin: loaded 3 shards",
]


def test_ray_noise_is_dropped_and_the_platform_and_errors_are_kept():
    from gppf.dist.terminal import is_noise

    assert [line for line in RAY_NOISE if not is_noise(line)] == []
    assert [line for line in KEPT if is_noise(line)] == []


def test_worker_lines_reach_the_driver_without_the_noise(ray_session, capsys):
    import time

    import ray

    from gppf.dist.ray_env import ensure_ray

    logs = ensure_ray()
    assert logs and Path(logs).is_dir()

    @ray.remote
    def chatty() -> None:
        for line in [*RAY_NOISE, *KEPT]:
            print(line, flush=True)

    ray.get(chatty.remote())
    deadline, out = time.time() + 30, ""
    while time.time() < deadline and KEPT[-1] not in out:  # forwarded asynchronously
        time.sleep(0.2)
        out += capsys.readouterr().out
    for line in KEPT:
        assert line in out, out
    for line in RAY_NOISE:
        assert line not in out, out


def test_durations_on_a_progress_line():
    from gppf.engine.metrics_log import duration

    assert [duration(s) for s in (0.4, 45, 250, 7380)] == ["0s", "45s", "4m10s", "2h03m"]
