"""The configs behind jobs/cpf.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from pathlib import Path

from gppf.config.cpf import CurriculumConfig, DecoderFinetuneConfig, ProtocolConfig, PseudoLabelPhaseConfig
from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig
from gppf.engine.epochs import epochs_to_steps
from gppf.presets.gppf_r50 import demo_config as r50_demo

WORLD = 8
CURRICULUM = ["bdd_det", "bdd_seg"]


def epochs(n: float, data_root: str, stage_tasks: list[str] = ()) -> int:
    """Steps for n epochs of BDD100K detection (69,863 images) under SIMT over `stage_tasks` (all
    three by default; gppf.engine.epochs), as VTD counts its 12 / 12 / 6 epochs."""
    from gppf.presets.bdd100k import TRAIN_IMAGES, bdd100k_tasks

    return epochs_to_steps(
        n, "bdd_det", bdd100k_tasks(data_root), TRAIN_IMAGES, WORLD, stage_tasks=stage_tasks
    )


def full_config(data_root: str) -> JobConfig:
    from gppf.presets.bdd100k import bdd100k_tasks

    epoch = epochs(1, data_root)
    return JobConfig(
        name="cpf_bdd100k",
        tasks=bdd100k_tasks(data_root),
        backbone=BackboneConfig(name="resnet50"),  # + backbone.init_from=<ImageNet weights>
        optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, warmup_steps=500),
        train=TrainConfig(
            steps=epochs(12, data_root), log_every=50, checkpoint_every=epoch, eval_every=4 * epoch
        ),
        scaling=ScalingConfig(num_workers=WORLD, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def full_protocol(data_root: str) -> ProtocolConfig:
    return ProtocolConfig(
        curriculum=CurriculumConfig(tasks=CURRICULUM, steps=epochs(12, data_root, CURRICULUM)),
        pseudo_labels=PseudoLabelPhaseConfig(
            task="bdd_seg",
            images=str(Path(data_root) / "bdd100k" / "images" / "100k" / "train"),
            batch_size=16,
            actors=8,
            cpus_per_actor=4,
            use_gpu=True,
        ),
        # each head on its own data, every worker on it: 6 epochs of detection
        decoder_finetune=DecoderFinetuneConfig(steps=epochs(6, data_root, ["bdd_det"])),
    )


def demo_config(demo_root: str) -> JobConfig:
    """The joint phase's job (the other phases derive from it): the three demo tasks on a static
    ResNet-18, as VTD's network is one static network."""
    return JobConfig(
        name="cpf_demo",
        tasks=r50_demo(demo_root).tasks,
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=5e-4, warmup_steps=30),
        train=TrainConfig(steps=180, log_every=30, checkpoint_every=60),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )


def demo_protocol(demo_root: str) -> ProtocolConfig:
    return ProtocolConfig(
        curriculum=CurriculumConfig(tasks=["demo_det", "demo_seg"], steps=120),
        pseudo_labels=PseudoLabelPhaseConfig(
            task="demo_seg", images=str(Path(demo_root) / "detection" / "train2017"), actors=2
        ),
        decoder_finetune=DecoderFinetuneConfig(steps=30),
    )
