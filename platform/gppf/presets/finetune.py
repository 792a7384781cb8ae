"""The configs behind jobs/finetune.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from gppf.config.job import BackboneConfig, FinetuneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig
from gppf.engine.epochs import epochs_to_steps
from gppf.io import storage
from gppf.presets.gppf_r50 import IN21K_RECIPE, demo_detection_task
from gppf.presets.gppf_r50 import demo_config as r50_demo

# GPPF Table 8: max steps, the two decay steps, test size (shorter side), smallest anchor.
UODB = {
    "kitti": (4000, (3000, 3500), 800, 32),
    "widerface": (26000, (18000, 24000), 800, 16),
    "voc": (18000, (12000, 16000), 800, 32),
    "lisa": (18000, (12000, 16000), 800, 16),
    "dota": (26000, (18000, 24000), 800, 32),
    "watercolor": (1800, (1500, 1700), 800, 32),
    "clipart": (1800, (1500, 1700), 800, 32),
    "comic": (1800, (1500, 1700), 800, 32),
    "kitchen": (13500, (9000, 12000), 800, 32),
    "deeplesion": (50000, (30000, 40000), 512, 16),
}
IN1K_TRAIN_IMAGES = 1_281_167
TARGETS = (*(f"uodb_{name}" for name in UODB), "kitti_depth", "in1k", "downstream_cls")


def uodb_config(data_root: str, name: str) -> JobConfig:
    """GPPF Table 5 / Table 8 on one UODB dataset (COCO JSON: uodb/<name>/annotations/{train,val}.json,
    images in uodb/<name>/images)."""
    steps, decays, test_size, anchor = UODB[name]
    return JobConfig(
        name=f"finetune_uodb_{name}",
        tasks={
            "uodb": {
                "type": "detection",
                "data_root": str(storage.path(data_root) / "uodb" / name),
                "batch_size": 2,  # x 8 GPUs: App. D.2's 16
                "masks": False,
                "train_images": "images",
                "val_images": "images",
                "train_annotations": "annotations/train.json",
                "val_annotations": "annotations/val.json",
                "test_size": test_size,
                "head": {"anchor_size": anchor},
            }
        },
        # + finetune.checkpoint=...: the backbone on COCO's route, the head from Objects365's
        finetune=FinetuneConfig(mode="fixed", route="coco", head_from="objects365"),
        optim=OptimConfig(
            name="sgd",
            lr=0.01,
            momentum=0.9,
            weight_decay=4e-5,
            warmup_steps=500,
            schedule="step",
            decay_steps=list(decays),
        ),
        train=TrainConfig(steps=steps, log_every=50, checkpoint_every=2000, eval_every=2000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def kitti_depth_config(data_root: str) -> JobConfig:
    """GPPF Table 4 / App. D.2: KITTI's Eigen split as BTS trains and evaluates it. Layout under
    kitti/: raw/ (the raw-data drives), data_depth_annotated/ (the annotated depth maps of every
    drive), eigen_{train,test}_files_with_gt.txt (BTS's split files)."""
    return JobConfig(
        name="finetune_kitti_depth",
        tasks={
            "kitti": {
                "type": "depth",
                "data_root": str(storage.path(data_root) / "kitti"),
                "batch_size": 4,  # x 8 GPUs: App. D.2's 32
                "loss_weight": 0.1,
                "list_format": "bts",
                "train_images": "raw",
                "val_images": "raw",
                "train_depth": "data_depth_annotated",
                "val_depth": "data_depth_annotated",
                "train_list": "eigen_train_files_with_gt.txt",
                "val_list": "eigen_test_files_with_gt.txt",
                "crop_size": [352, 704],
                "kb_crop": [352, 1216],
                "eval_crop": "garg",
                "max_depth": 80.0,
                "max_depth_eval": 80.0,
            }
        },
        backbone=BackboneConfig(drop_path_rate=0.4),  # stochastic depth 0.4 (the rest: the checkpoint's)
        finetune=FinetuneConfig(mode="fixed", route="coco"),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-8, warmup_steps=1000),
        train=TrainConfig(steps=30_000, log_every=50, checkpoint_every=2000, eval_every=5000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def in1k_config(data_root: str) -> JobConfig:
    """GPPF Table 6 / App. D.2: ImageNet-1K (imagenet/{train,val}/<wnid>/*.JPEG) at the IN-21K
    recipe, 300 epochs, batch 2048 (64 on each of 32 GPUs), 20 warmup epochs."""
    world = 32
    tasks = {
        "in1k": {
            "type": "classification",
            "data_root": str(storage.path(data_root) / "imagenet"),
            "batch_size": 64,
            "input_size": 224,
            **IN21K_RECIPE,  # "the same hyperparameters except for learning rate"
            "eval_resize": 256,
        }
    }
    epoch = lambda e: epochs_to_steps(e, "in1k", tasks, {"in1k": IN1K_TRAIN_IMAGES}, world)  # noqa: E731
    return JobConfig(
        name="finetune_in1k",
        tasks=tasks,
        finetune=FinetuneConfig(mode="fixed", route="in21k"),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=epoch(20)),
        train=TrainConfig(steps=epoch(300), log_every=100, checkpoint_every=5000, eval_every=epoch(10)),
        scaling=ScalingConfig(num_workers=world, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def downstream_cls_config(data_root: str) -> JobConfig:
    """GPPF Table 7 / App. D.2's downstream classification protocol on one ImageFolder dataset
    (downstream/<dataset>/{train,val}/<class>/*; point tasks.cls.data_root at it): random crops
    and flips, 20000 iterations at batch 256 (32 on each of 8 GPUs), SGD momentum 0.9, tested at
    256 -> centre 224; lr and weight decay come from jobs/tune_downstream.py's grid."""
    return JobConfig(
        name="finetune_downstream_cls",
        tasks={
            "cls": {
                "type": "classification",
                "data_root": str(storage.path(data_root) / "downstream"),
                "batch_size": 32,
                "input_size": 224,
                "crop_scale_min": 0.08,
                "eval_resize": 256,
            }
        },
        finetune=FinetuneConfig(mode="fixed", route="in21k"),
        optim=OptimConfig(
            name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=0, decay_divided_by_lr=True
        ),
        train=TrainConfig(steps=20_000, log_every=100, checkpoint_every=5000, eval_every=5000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def target_config(target: str, data_root: str) -> JobConfig:
    if target.startswith("uodb_") and target[5:] in UODB:
        return uodb_config(data_root, target[5:])
    makers = {"kitti_depth": kitti_depth_config, "in1k": in1k_config, "downstream_cls": downstream_cls_config}
    if target not in makers:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    return makers[target](data_root)


def full_config(data_root: str) -> JobConfig:
    return uodb_config(data_root, "voc")


def pretrain_config(demo_root: str) -> JobConfig:
    """The demo's pretraining: GPPF-R50's embedded default on classification and segmentation."""
    cfg = r50_demo(demo_root)
    cfg.name = "finetune_demo_pretrain"
    cfg.tasks = {k: v for k, v in cfg.tasks.items() if k != "demo_det"}
    cfg.train.steps = 240
    return cfg


def demo_config(demo_root: str) -> JobConfig:
    """Finetuning the demo detection task; finetune.checkpoint is the pretraining's."""
    return JobConfig(
        name="finetune_demo",
        tasks={"demo_det": demo_detection_task(storage.path(demo_root))},
        backbone=BackboneConfig(name="resnet18"),  # replaced by the checkpoint's
        finetune=FinetuneConfig(mode="dynamic"),
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, warmup_steps=30),
        train=TrainConfig(steps=240, log_every=30, checkpoint_every=0),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )
