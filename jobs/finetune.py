"""Sparse finetuning of a GPPF checkpoint on a new task (GPPF §3.3): dynamic or fixed-path.

Submit to a Ray cluster (from the repository root), from a GPPF-R50 run's checkpoint:

    ray job submit --working-dir . -- python jobs/finetune.py --data-root /data/downstream \\
        --set finetune.checkpoint=/runs/gppf_r50-.../checkpoint_... --set finetune.mode=fixed \\
        --set finetune.route=coco

- `finetune.mode=dynamic`: a new controller per task explores the checkpoint's lego units
  (Gumbel-softmax, τ 5.0 -> 0.01 over the first half of the steps), backbone and controller train
  together, and each task's arg-max route is written to the run directory (`route_<task>.pt`,
  a plain timm backbone);
- `finetune.mode=fixed`: `finetune.route=<task of the checkpoint>` reuses that task's route (VOC
  detection reusing COCO's), `finetune.route=<route_*.pt>` the route of a dynamic finetuning
  ("retrain"); the route is extracted as a plain backbone and trained as usual.

The full config finetunes Pascal VOC detection (COCO JSON under --data-root/voc, e.g. made with
a VOC-to-COCO converter) with GPPF App. D.2's UODB settings: SGD lr 0.01, momentum 0.9, weight
decay 4e-5, 16 images per step, 18k steps (cosine instead of the two step decays).

With no arguments it runs the embedded demo: a short GPPF pretraining on the demo
classification and segmentation tasks (lego ResNet-18), then finetunes the demo detection task
(which the pretraining never saw) from that checkpoint twice, dynamically and on the
segmentation task's route, and prints the two results side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import demo_config as r50_demo  # noqa: E402
from gppf_r50 import demo_detection_task  # noqa: E402

from gppf import cli, storage  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.job_config import FinetuneConfig, JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402


def full_config(data_root: str) -> JobConfig:
    return JobConfig(
        name="finetune_voc_det",
        tasks={
            "voc": {
                "type": "detection",
                "data_root": str(storage.path(data_root) / "voc"),
                "batch_size": 2,
                "masks": False,
                "train_images": "JPEGImages",
                "val_images": "JPEGImages",
                "train_annotations": "annotations/voc_train.json",
                "val_annotations": "annotations/voc_val.json",
            }
        },
        finetune=FinetuneConfig(mode="fixed", route="coco"),  # + finetune.checkpoint=...
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=4e-5, warmup_steps=500),
        train=TrainConfig(steps=18_000, log_every=50, checkpoint_every=2000, eval_every=2000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


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


def run(argv: list[str] | None = None) -> dict:
    args = cli.parser(__doc__).parse_args(argv)
    cfg = cli.load_config(args, full_config, demo_config)
    if args.data_root or cfg.finetune.checkpoint or args.print_config or args.plan:
        return cli.main(__doc__, full_config, demo_config, argv)
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
