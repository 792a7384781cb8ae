"""Composite Learning (CompL): a dense target task trained with a self-supervised auxiliary task.

Submit to a Ray cluster (from the repository root): semantic segmentation on Pascal VOC 2012
(train_aug) at a label fraction, jointly with DenseCL on all VOC training images (CompL §4.2):

    ray job submit --working-dir . -- python jobs/compl.py --data-root /data \\
        --set tasks.voc.label_fraction=0.1

Each worker step takes 8 labelled target images and 8 auxiliary images in one trunk forward
and minimises L_t + λ L_a (λ = tasks.densecl.loss_weight, 0.2; CompL: 0.2 for MoCo and
DenseCL, 0.05 for rotation: `--set tasks.densecl.type=rotation --set tasks.densecl.loss_weight=0.05`
swaps the auxiliary task). The auxiliary augmentations (Gaussian blur, colour jitter, two views)
touch only the auxiliary images. SGD, momentum 0.9, weight decay 1e-4 as CompL (a cosine
schedule instead of "poly"). Start from pretrained weights with `--set backbone.init_from=FILE`.

With no arguments it runs the embedded demo experiment: the demo segmentation task at a 10 %
label fraction trained alone, then with DenseCL on all its training images (composite mode),
same steps and seeds, and prints both results. `--seeds 0,1` repeats it per seed.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import voc_task  # noqa: E402

from gppf import cli  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.config import to_dict  # noqa: E402
from gppf.job_config import JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402

AUX = "densecl"


def densecl(data_root: str, images: list[str], target: str, input_size: int, **extra) -> dict:
    """DenseCL on `images` under data_root, attached to `target` (composite mode)."""
    return {
        "type": "densecl",
        "data_root": data_root,
        "images": images,
        "composite_with": target,
        "loss_weight": 0.2,
        "batch_size": 8,
        "input_size": input_size,
        **extra,
    }


def full_config(data_root: str) -> JobConfig:
    voc = voc_task(Path(data_root))
    voc["label_fraction"] = 1.0  # CompL's tables: 0.01 ... 1.0
    return JobConfig(
        name="compl_voc_densecl",
        tasks={
            "voc": voc,
            # Every JPEG of VOC: the unlabelled rest of a label fraction included (val images too:
            # restrict with `images` to a folder of train images if that matters for your study).
            AUX: densecl(voc["data_root"], ["JPEGImages"], "voc", 512, key_size=512),
        },
        backbone=BackboneConfig(name="resnet50"),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_steps=500),
        train=TrainConfig(steps=40_000, log_every=50, checkpoint_every=5000, eval_every=5000),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def demo_config(demo_root: str) -> JobConfig:
    """The demo segmentation task at 10 % of its labels, with DenseCL on all its training images."""
    seg = str(Path(demo_root) / "segmentation")
    return JobConfig(
        name="compl_demo",
        tasks={
            "demo_seg": {
                "type": "segmentation",
                "data_root": seg,
                "num_classes": 4,
                "batch_size": 8,
                "input_size": 64,
                "head_channels": 32,
                "aux_channels": 16,
                "label_fraction": 0.1,
            },
            AUX: densecl(seg, ["train/images"], "demo_seg", 64, val_images=["val/images"], queue_size=1024),
        },
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, warmup_steps=30),
        train=TrainConfig(steps=300, log_every=50, checkpoint_every=0),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run(argv: list[str] | None = None) -> dict:
    ap = cli.parser(__doc__)
    ap.add_argument("--seeds", default="", help="demo: comma-separated seeds, each a pair of runs")
    args = ap.parse_args(argv)
    base = cli.load_config(args, full_config, demo_config)
    if args.print_config:
        print(json.dumps(to_dict(base), indent=2))
        return {}
    if args.data_root:  # the full job: one composite run
        return cli.run(base, args.resume)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.train.seed]
    target = base.tasks[AUX]["composite_with"]
    results: dict[str, list[dict]] = {"target alone": [], f"target + {AUX}": []}
    for seed in seeds:
        for name in results:
            cfg = copy.deepcopy(base)
            cfg.train.seed = seed
            if name == "target alone":
                cfg.tasks = {target: cfg.tasks[target]}
                cfg.name = f"{base.name}_alone"
            results[name].append(cli.run(cfg))
    fraction = base.tasks[target].get("label_fraction", 1.0)
    print(f"\n[gppf] {target} at label fraction {fraction:g}, {base.train.steps} steps, seeds {seeds}:")
    for name, runs in results.items():
        final = [r["final_eval"][target] for r in runs]
        shown = [f"{k} {_mean_std([f[k] for f in final])}" for k in final[0]]
        print(f"  {name:20s} {', '.join(shown)}")
    return results[f"target + {AUX}"][-1]


if __name__ == "__main__":
    run()
