"""The configs behind jobs/adapt_finetune.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    StageConfig,
    TrainConfig,
)
from gppf.engine.epochs import epochs_to_steps
from gppf.presets.gppf_r50 import demo_config as r50_demo

WORLD = 8


def epochs(n: float, tasks: dict) -> int:
    """Steps for n epochs of BDD100K detection (69,863 images) under SIMT over the job's tasks
    (gppf.engine.epochs: each worker runs detection a third of the steps)."""
    from gppf.presets.bdd100k import TRAIN_IMAGES

    return epochs_to_steps(n, "bdd_det", tasks, TRAIN_IMAGES, WORLD)


def stages(adapt_steps: int, finetune_steps: int, warmup_steps: int) -> list[StageConfig]:
    """LV-Adapter §5.1: adapt at 10x the finetune lr (2.5e-4 vs 2.5e-5), then finetune all."""
    finetune = StageConfig(
        "finetune", finetune_steps, schedule="stage", warmup_steps=warmup_steps, warmup_factor=0.01
    )
    if not adapt_steps:
        return [finetune]
    adapt = StageConfig(
        "adapt", adapt_steps, freeze=["backbone.*", "heads.*"], lr_factor=10.0, schedule="stage"
    )
    return [adapt, finetune]


def full_config(data_root: str) -> JobConfig:
    from gppf.presets.bdd100k import bdd100k_tasks

    tasks = bdd100k_tasks(data_root)
    epoch = epochs(1, tasks)
    return JobConfig(
        name="adapt_finetune_bdd100k",
        tasks=tasks,
        backbone=BackboneConfig(name="resnet50"),  # + backbone.init_from=<any checkpoint format>
        model=ModelConfig(neck="fpn", neck_channels=256, adapter="fpn"),
        optim=OptimConfig(name="adamw", lr=2.5e-5, weight_decay=1e-4, warmup_steps=0),
        train=TrainConfig(log_every=50, checkpoint_every=epoch, eval_every=5 * epoch),
        stages=stages(epochs(1, tasks), epochs(35, tasks), 1000),
        scaling=ScalingConfig(num_workers=WORLD, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def pretrain_config(demo_root: str) -> JobConfig:
    """The demo's mismatched initialisation: a static ResNet-18 trained on classification only."""
    cfg = r50_demo(demo_root)
    cfg.name = "adapt_finetune_demo_pretrain"
    cfg.tasks = {"demo_cls": cfg.tasks["demo_cls"]}
    cfg.backbone = BackboneConfig(name="resnet18")
    cfg.train = TrainConfig(steps=150, log_every=50, checkpoint_every=0, eval_at_start=False)
    return cfg


ADAPT_FRACTION = 1 / 6  # LV-Adapter Table 2: 6 adapt + 30 finetune epochs


def demo_config(demo_root: str) -> JobConfig:
    """Transfer to the demo segmentation and detection tasks; run() sets backbone.init_from and
    splits train.steps into the stages."""
    r50 = r50_demo(demo_root)
    return JobConfig(
        name="adapt_finetune_demo",
        tasks={k: r50.tasks[k] for k in ("demo_seg", "demo_det")},
        backbone=BackboneConfig(name="resnet18"),
        model=ModelConfig(neck="fpn", neck_channels=64, adapter="fpn"),
        optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=1e-4, warmup_steps=0),
        train=TrainConfig(steps=240, log_every=40, checkpoint_every=0),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )
