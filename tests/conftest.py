from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and
# moves on (workers started, training finished) only at a poll: a 2-step run in a warm Ray took
# 26.7 s, 19.8 s at 0.5 s, and the suite runs ~70 of them. Tests only: during a long run the
# faster polling costs ~8 % of the step time on 2 cores (a 120-step demo: 615-676 ms steps at 2 s,
# 685-755 ms at 0.5 s), so the platform keeps Ray's default. Every Ray the tests start,
# subprocesses' included, inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Small demo datasets, generated once per test session."""
    from gppf.data.demo import generate

    return generate(tmp_path_factory.mktemp("demo"), n_train=48, n_val=16, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even if a `ray start` cluster runs on this machine
        from gppf.dist.ray_env import local_system_config

        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            _system_config=local_system_config(),
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def staged_run(demo_root, ray_session, tmp_path_factory):
    """The 3-stage job (tests/staged_job.py) run once, with a Ray Train callback that records every
    report it receives: (fit's result, run directory, the recorded reports)."""
    import json

    import ray.train

    from gppf.launch.fit import fit
    from tests.staged_job import staged_config

    runs = tmp_path_factory.mktemp("staged")
    record = runs / "reports.jsonl"

    class Recorder(ray.train.UserCallback):  # defined here: pickled by value to Ray's controller
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    result = fit(staged_config(demo_root, runs, "a"), callbacks=[Recorder(str(record))])
    reports = [json.loads(line) for line in record.read_text().splitlines()]
    return result, runs / "a", reports
