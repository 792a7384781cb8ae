"""Pretrain-adapt-finetune (LV-Adapter §4) on BDD100K: detection, semantic segmentation, drivable area.

Submit to a Ray cluster (from the repository root), starting from any pretrained backbone:

    ray job submit --working-dir . -- python jobs/adapt_finetune.py --data-root /data \\
        --set backbone.init_from=/models/moco_v2_800ep_pretrain.pth.tar \\
        --set model.adapter=pre_scalar --set model.language.variant=lv_adapter

Two stages of one run share a neck (an FPN producing P2-P5 at 256 channels) between the
backbone and the three heads:
- *adapt*: the backbone and the randomly initialised heads are frozen (no gradient, no optimizer
  state, BN on its running statistics); only the neck ("the adapter", plus the LV-Adapter's
  prompts, projection and decoder) trains on the multi-task loss, at lr 2.5e-4;
- *finetune*: everything but the text encoder trains at lr 2.5e-5 (AdamW, weight decay 1e-4,
  1000 warmup iterations from lr x 0.01).
The paper's 36 epochs are 1 adapt + 35 finetune here (`stages[0].steps`, `stages[1].steps`),
epochs of BDD100K detection turned into SIMT steps by gppf.epochs.
`model.adapter` picks the design (fpn, pre, post, pre_scalar, pre_vector); `model.language.variant`
the language adapter (lv_adapter, or the baselines naive, template, ensemble); per-task loss
weights α are `tasks.<task>.loss_weight`. BDD100K's detection labels must first be converted to
COCO JSON (`python -m task_plugins.bdd100k_to_coco`, see README).

With no arguments it runs the embedded demo experiment: a backbone pre-trained on the demo
classification task only (a deliberately mismatched initialisation) is transferred to the demo
segmentation and detection tasks twice with the same budget, by pretrain-finetune and by
pretrain-adapt-finetune, and the two results are printed side by side. `--set` overrides apply
to both transfers (not to the pretraining).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import demo_config as r50_demo  # noqa: E402

from gppf import cli  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.epochs import epochs_to_steps  # noqa: E402
from gppf.job_config import JobConfig, ModelConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402
from gppf.stages import StageConfig  # noqa: E402

WORLD = 8


def epochs(n: float, tasks: dict) -> int:
    """Steps for n epochs of BDD100K detection (69,863 images) under SIMT over the job's tasks
    (gppf.epochs: each worker runs detection a third of the steps)."""
    from task_plugins.bdd100k import TRAIN_IMAGES

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
    from task_plugins.bdd100k import bdd100k_tasks

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


def _from(start: dict[str, float], key: str) -> str:
    return f"{start[key]:.2f} -> " if key in start else ""  # no step-0 evaluation: the end only


def run(argv: list[str] | None = None) -> dict:
    args = cli.parser(__doc__).parse_args(argv)
    cfg = cli.load_config(args, full_config, demo_config)
    if args.data_root or args.print_config or args.plan:
        return cli.main(__doc__, full_config, demo_config, argv)
    init = cfg.backbone.init_from  # the demo with a backbone of your own: no pretraining
    if not init:
        transfer_sets = args.overrides
        # The pretraining takes the run-wide settings only, not the transfer's model or tasks.
        args.overrides = [s for s in transfer_sets if not s.startswith(("model.", "tasks.", "backbone."))]
        init = cli.run(cli.load_config(args, full_config, pretrain_config))["checkpoint"]
        args.overrides = transfer_sets
    results = {}
    for name, adapt in (("pretrain-finetune", 0.0), ("pretrain-adapt-finetune", ADAPT_FRACTION)):
        cfg = cli.load_config(args, full_config, demo_config)
        total = cfg.train.steps
        adapt_steps = max(1, round(total * adapt)) if adapt and total > 1 else 0
        cfg.stages = stages(adapt_steps, total - adapt_steps, max(1, total // 12))
        cfg.name = "adapt_finetune_demo" if adapt_steps else "finetune_demo_baseline"
        cfg.backbone.init_from = init
        results[name] = cli.run(cfg)
    print(f"\n[gppf] transfer from {init}, {total} steps each:")
    for name, m in results.items():
        shown = []
        for task in ("demo_seg", "demo_det"):
            start, final = (m.get("initial_eval") or {}).get(task, {}), m["final_eval"][task]
            shown += [
                f"{task} {k} {_from(start, k)}{final[k]:.2f}" for k in final if k in ("mIoU", "box_AP50")
            ]
        print(f"  {name:24s} {', '.join(shown)}")
    return results["pretrain-adapt-finetune"]


if __name__ == "__main__":
    run()
