"""Sparse finetuning of a GPPF checkpoint on a new task (GPPF §3.3), at App. D.2's transfer settings.

Submit to a Ray cluster (from the repository root), from a GPPF-R50 run's checkpoint:

    ray job submit --working-dir . -- python jobs/finetune.py --data-root /data/downstream \
        --target uodb_voc --set finetune.checkpoint=/runs/gppf_r50-.../checkpoint_...

- `finetune.mode=dynamic`: a new controller per task explores the checkpoint's lego units
  (Gumbel-softmax, τ 5.0 -> 0.01 over the first half of the steps), backbone and controller train
  together, and each task's arg-max route is written to the run directory (`route_<task>.pt`,
  a plain timm backbone);
- `finetune.mode=fixed`: `finetune.route=<task of the checkpoint>` reuses that task's route (VOC
  detection reusing COCO's), `finetune.route=<route_*.pt>` the route of a dynamic finetuning
  ("retrain"); the route is extracted as a plain backbone and trained as usual.

`--target` picks App. D.2's setting (each `full_config`, under --data-root):
- `uodb_<dataset>` (kitti, widerface, voc, lisa, dota, watercolor, clipart, comic, kitchen,
  deeplesion; COCO JSON under uodb/<dataset>/): Table 5 / Table 8, Faster R-CNN with its head
  initialised from the checkpoint's Objects365 head but its final predictor (`finetune.head_from`),
  16 images per step, SGD lr 0.01 (momentum 0.9, weight decay 4e-5) decayed x0.1 at Table 8's two
  steps, Table 8's steps, test size (800; DeepLesion 512) and anchors (halved for WiderFace, LISA,
  DeepLesion); `uodb_voc` is the default;
- `kitti_depth`: Table 4, KITTI's Eigen split with BTS's split files, training on 352 x 704 crops
  of the 352 x 1216 benchmark crop, evaluation at the original resolution inside Garg's crop,
  batch 32, loss weight 0.1, SGD lr 0.01 (momentum 0.9, weight decay 1e-8), 30k steps, cosine
  with 1000 warmup steps, stochastic depth 0.4;
- `in1k`: Table 6, ImageNet-1K at the IN-21K recipe (Mixup 0.8, CutMix 1.0, Random Erasing 0.25,
  label smoothing 0.1, RandAugment), 300 epochs with 20 warmup epochs at batch 2048, SGD lr 0.01
  (momentum 0.9, weight decay 1e-4), cosine, tested at 256 -> centre 224;
- `downstream_cls`: Table 7's protocol for one downstream dataset (ImageFolder under
  downstream/<dataset>, `--set tasks.cls.data_root=...`): random crops and flips only, 20000
  iterations at batch 256, SGD momentum 0.9, tested at 256 -> centre 224; its lr x weight-decay
  grid (weight decay divided by the lr) is jobs/tune_downstream.py.
Epoch counts become steps through gppf.epochs.

With no arguments it runs the embedded demo: a short GPPF pretraining on the demo
classification and segmentation tasks (lego ResNet-18), then finetunes the demo detection task
(which the pretraining never saw) from that checkpoint twice, dynamically and on the
segmentation task's route, and prints the two results side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import IN21K_RECIPE, demo_detection_task  # noqa: E402
from gppf_r50 import demo_config as r50_demo  # noqa: E402

from gppf import cli, storage  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.epochs import epochs_to_steps  # noqa: E402
from gppf.job_config import FinetuneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402

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


def parser():
    ap = cli.parser(__doc__)
    ap.add_argument("--target", choices=TARGETS, default="uodb_voc", help="App. D.2's transfer setting")
    return ap


def run(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    full = lambda root: target_config(args.target, root)  # noqa: E731
    cfg = cli.load_config(args, full, demo_config)
    if args.data_root or cfg.finetune.checkpoint or args.print_config or args.plan:
        return cli.execute(args, cfg)
    # The embedded demo: pretrain, then finetune from that checkpoint both ways.
    pretrained = cli.run(cli.load_config(args, full_config, pretrain_config))
    results = {}
    for mode, route in (("dynamic", ""), ("fixed", "demo_seg")):
        cfg = cli.load_config(args, full_config, demo_config)
        cfg.name = f"finetune_demo_{mode}"
        cfg.finetune = FinetuneConfig(mode=mode, checkpoint=pretrained["checkpoint"], route=route)
        results[mode] = cli.run(cfg)
    print("\n[gppf] demo_det finetuned from the classification + segmentation pretraining:")
    for mode, m in results.items():
        task = m["final_eval"]["demo_det"]
        start = (m.get("initial_eval") or {}).get("demo_det", {})  # empty without a step-0 evaluation
        shown = ", ".join(
            f"{k} {f'{start[k]:.2f} -> ' if k in start else ''}{v:.2f}" for k, v in task.items()
        )
        print(f"  {mode:8s} {shown}")
    return results["fixed"]


if __name__ == "__main__":
    run()
