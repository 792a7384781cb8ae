from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Small demo datasets, generated once per test session."""
    from gppf.demo_data import generate

    return generate(tmp_path_factory.mktemp("demo"), n_train=48, n_val=16, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even if a `ray start` cluster runs on this machine
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False
        )
    yield ray
    ray.shutdown()
