"""The configs behind jobs/tune_downstream.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig

# App. D.2's grid: 7 x (7 + 1) = 56 trials
LRS = [float(v) for v in np.logspace(-6, -1, 7)]
WEIGHT_DECAYS = [0.0] + [float(v) for v in np.logspace(-6, -3, 7)]
DEMO_LRS, DEMO_WEIGHT_DECAYS = [0.01, 0.1], [0.0, 1e-5]


def search_space(lrs: list[float], weight_decays: list[float]) -> dict[str, Any]:
    return {"optim.lr": tune.grid_search(lrs), "optim.weight_decay": tune.grid_search(weight_decays)}


def demo_config(demo_root: str) -> JobConfig:
    """The protocol's shape on the demo classification task: random crops and flips, tested at
    a resize then a centre crop (72 -> 64, as 256 -> 224), weight decay divided by the lr."""
    return JobConfig(
        name="tune_downstream_demo",
        tasks={
            "cls": {
                "type": "classification",
                "data_root": str(Path(demo_root) / "classification"),
                "batch_size": 16,
                "input_size": 64,
                "crop_scale_min": 0.08,
                "eval_resize": 72,
            }
        },
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(
            name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, warmup_steps=0, decay_divided_by_lr=True
        ),
        train=TrainConfig(steps=40, log_every=20, checkpoint_every=0, eval_at_start=False),
        scaling=ScalingConfig(num_workers=1, use_gpu=False, cpus_per_worker=0.5),
    )
