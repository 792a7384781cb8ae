"""The configs behind jobs/tune_gppf.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from gppf.config.job import ADAPTERS, JobConfig
from gppf.config.sweep import SweepConfig
from gppf.presets.gppf_r50 import demo_config as r50_demo
from gppf.presets.gppf_r50 import full_config as r50_full

AUX = "rotation"


def additions(cfg: JobConfig, images_root: str, images: list[str], val_images: list[str]) -> dict[str, Any]:
    """What the sweep adds to gppf_r50's config; best_overrides.json repeats it, so that
    `jobs/gppf_r50.py --set-file best_overrides.json` trains the best trial's config."""
    size = min(int(t.get("input_size", 224)) for t in cfg.tasks.values())
    groups = {}
    for name, task in cfg.tasks.items():
        metric = {"classification": "top1", "detection": "box_AP", "segmentation": "mIoU"}[task["type"]]
        groups.setdefault(task["type"], []).append(f"{name}/{metric}")
    return {
        # CompL's rotation task on the classification images: λ is its loss_weight (CompL: 0.05).
        f"tasks.{AUX}": {
            "type": "rotation",
            "data_root": images_root,
            "images": images,
            "val_images": val_images,
            "sampling_weight": 0.5,
            "loss_weight": 0.05,
            "batch_size": 16,
            "input_size": size,
        },
        "model.neck": "fpn",  # the adapter designs act on a neck shared by every task
        "model.neck_channels": 64 if size <= 64 else 256,
        "metrics.groups": groups,  # VTDA: one group per task type, each task's primary metric
    }


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """{config key: Ray Tune domain}; each key is one `--set` accepts."""
    targets = [n for n, t in cfg.tasks.items() if n != AUX]
    return {
        **{f"tasks.{n}.loss_weight": tune.loguniform(0.5, 2.0) for n in targets},
        f"tasks.{AUX}.loss_weight": tune.loguniform(0.01, 0.2),  # λ
        "backbone.lego.tau_start": tune.uniform(2.0, 5.0),
        "backbone.lego.tau_end": tune.loguniform(0.01, 1.0),
        "backbone.lego.tau_decay_fraction": tune.uniform(0.5, 0.9),
        "model.adapter": tune.choice(list(ADAPTERS)),
        "model.language.variant": tune.choice(["", "lv_adapter"]),
        # Task sampling weights are tuned the same way, e.g. tasks.<name>.sampling_weight.
    }


# Trials are short runs of the job: these change the trials only, not best_overrides.json.
TRIAL_SETTINGS_DEMO = {
    "train.steps": 90,
    "train.eval_every": 30,
    "train.eval_at_start": False,
    "train.eval_max_batches": 2,
    "train.checkpoint_every": 30,
    "train.log_every": 30,
    "optim.warmup_steps": 10,
}
TRIAL_SETTINGS_FULL = {
    "train.steps": 20_000,
    "train.eval_every": 2_500,
    "train.eval_at_start": False,
    "train.checkpoint_every": 2_500,
    "optim.warmup_steps": 2_000,
    "scaling.num_workers": 8,
}


def sweep_config(demo: bool) -> SweepConfig:
    if demo:
        return SweepConfig(name="tune_gppf_demo", num_samples=8, grace_period=30, reduction_factor=2.0)
    return SweepConfig(name="tune_gppf", num_samples=32, searcher="optuna", grace_period=5_000)


def demo_base(demo_root: str) -> tuple[JobConfig, dict[str, Any]]:
    cfg = r50_demo(demo_root)
    cfg.tasks = {n: cfg.tasks[n] for n in ("demo_cls", "demo_seg")}  # detection is the slow one here
    images = str(Path(demo_root) / "classification")
    return cfg, additions(cfg, images, ["train"], ["val"])


def full_base(data_root: str) -> tuple[JobConfig, dict[str, Any]]:
    cfg = r50_full(data_root)
    images = str(Path(data_root) / "imagenet21k")
    return cfg, additions(cfg, images, ["train"], [])
