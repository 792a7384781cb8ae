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
Epoch counts become steps through gppf.engine.epochs.

With no arguments it runs the embedded demo: a short GPPF pretraining on the demo
classification and segmentation tasks (lego ResNet-18), then finetunes the demo detection task
(which the pretraining never saw) from that checkpoint twice, dynamically and on the
segmentation task's route, and prints the two results side by side.
"""

from __future__ import annotations

from gppf.config.job import FinetuneConfig
from gppf.launch import cli
from gppf.presets.finetune import TARGETS, demo_config, full_config, pretrain_config, target_config


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
