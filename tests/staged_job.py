"""The 3-stage job of the trainer tests: stage 1 one task, stage 2 three tasks, stage 3 every head
at lr x 0.1 with the backbone frozen; 2 ranks, a lego ResNet with hard routes."""

from __future__ import annotations

import json
from pathlib import Path

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    LegoConfig,
    OptimConfig,
    ScalingConfig,
    StageConfig,
    StreamConfig,
    TrainConfig,
)
from tests.tasks_for_tests import task_entries

STAGES = [("cls", 4), ("joint", 6), ("heads", 4)]  # steps 1-4, 5-10, 11-14
TOTAL = sum(n for _, n in STAGES)
EVAL_EVERY = 4


def staged_config(root: Path, run_dir: Path, run_name: str) -> JobConfig:
    entries = task_entries(root)
    return JobConfig(
        name="staged",
        run_dir=str(run_dir),
        run_name=run_name,
        tasks={"cls": entries["cls_augs"], "seg": entries["seg"], "det": entries["det"]},
        backbone=BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(num_units=2, mode="hard")),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        train=TrainConfig(
            log_every=1,
            checkpoint_every=2,
            keep_checkpoints=10,
            eval_every=EVAL_EVERY,
            eval_max_batches=1,
            collective_timeout_s=300,
        ),
        data=StreamConfig(min_rows_per_pass=16, chunk_rows=16, prefetch_batches=1),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5, max_failures=2),
        stages=[
            StageConfig(name="cls", steps=4, tasks=["cls"]),
            StageConfig(name="joint", steps=6),
            StageConfig(name="heads", steps=4, freeze=["backbone.*"], lr_factor=0.1),
        ],
    )


def steps_of(metrics_file: Path) -> dict[int, dict]:
    """The last logged line of each training step (a restarted run logs some steps twice)."""
    out = {}
    for line in metrics_file.read_text().splitlines():
        m = json.loads(line)
        if "task_choices" in m:
            out[m["step"]] = m
    return out
