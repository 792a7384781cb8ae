"""GPPF App. D.2's downstream-classification protocol: a grid over learning rate and weight decay.

"The search space is 7 logarithmically spaced [values] between 1e-6 and 0.1 for learning rate and
7 logarithmically-spaced values of weight decay between 1e-6 and 1e-3, as well as 0 for weight
decay. Weight decay will be divided by learning rate." Every trial is one run of jobs/finetune.py
--target downstream_cls (20000 iterations at batch 256, random crops and flips, tested at 256 ->
centre 224) with one (lr, weight decay) pair, the optimizer given weight_decay / lr
(`optim.decay_divided_by_lr`); the 56 trials run to the end (FIFO) and the table ranks them by
top-1. Submit to a Ray cluster (from the repository root), for each downstream dataset:

    ray job submit --working-dir . -- python jobs/tune_downstream.py --data-root /data \\
        --set tasks.cls.data_root=/data/downstream/flowers102 \\
        --set finetune.checkpoint=/runs/gppf_r50-.../checkpoint_... --name flowers102

With no arguments it runs the embedded default: the grid's shape (2 learning rates x weight decay 0
and one other, weight decay divided by the lr) on the demo classification task, a short schedule
of a static ResNet-18 from scratch (no checkpoint), 4 trials. It prints a line per trial event and
the results table, and writes results.csv, objective_vs_params.png and best_overrides.json (for
`python jobs/finetune.py --target downstream_cls --set-file`) under ~/gppf_sweeps/<name>/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
from finetune import downstream_cls_config  # noqa: E402
from ray import tune  # noqa: E402

from gppf import cli  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.config import ConfigError, apply_overrides, to_dict  # noqa: E402
from gppf.job_config import JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402
from gppf.sweep import SweepConfig, run_sweep  # noqa: E402

# App. D.2's grid: 7 x (7 + 1) = 56 trials
LRS = [float(v) for v in np.logspace(-6, -1, 7)]
WEIGHT_DECAYS = [0.0] + [float(v) for v in np.logspace(-6, -3, 7)]
DEMO_LRS, DEMO_WEIGHT_DECAYS = [0.01, 0.1], [0.0, 1e-5]


def search_space(lrs: list[float], weight_decays: list[float]) -> dict[str, Any]:
    return {"optim.lr": tune.grid_search(lrs), "optim.weight_decay": tune.grid_search(weight_decays)}


def demo_config(demo_root: str) -> JobConfig:
    """The protocol's shape on the demo classification task: random crops and flips, tested at
    a resize then a centre crop (72 -> 64, as 256 -> 224), weight decay divided by the lr."""
    return JobConfig(
        name="tune_downstream_demo",
        tasks={
            "cls": {
                "type": "classification",
                "data_root": str(Path(demo_root) / "classification"),
                "batch_size": 16,
                "input_size": 64,
                "crop_scale_min": 0.08,
                "eval_resize": 72,
            }
        },
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(
            name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, warmup_steps=0, decay_divided_by_lr=True
        ),
        train=TrainConfig(steps=40, log_every=20, checkpoint_every=0, eval_at_start=False),
        scaling=ScalingConfig(num_workers=1, use_gpu=False, cpus_per_worker=0.5),
    )


def parse(argv: list[str] | None):
    ap = cli.parser(__doc__)
    ap.add_argument("--sweep", dest="sweep_overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=None, help="the sweep's name (its directory under sweep_dir)")
    return ap.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    demo = not args.data_root
    cfg = cli.load_config(args, downstream_cls_config, demo_config)
    space = search_space(*((DEMO_LRS, DEMO_WEIGHT_DECAYS) if demo else (LRS, WEIGHT_DECAYS)))
    try:
        sweep = SweepConfig(
            name="tune_downstream_demo" if demo else "tune_downstream",
            objective="cls/top1",
            mode="max",
            num_samples=1,  # each grid point once
            scheduler="fifo",  # a grid compares finished runs
        )
        sweep = apply_overrides(sweep, args.sweep_overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.name:
        sweep.name = args.name
    if args.print_config:
        print(json.dumps({"trial_base": to_dict(cfg), "sweep": to_dict(sweep)}, indent=2))
        return {}
    try:
        return run_sweep(cfg, space, sweep, applies_to="jobs/finetune.py --target downstream_cls")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
