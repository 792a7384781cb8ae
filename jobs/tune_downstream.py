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

from gppf.config.base import ConfigError, apply_overrides, to_dict
from gppf.config.sweep import SweepConfig
from gppf.launch import cli
from gppf.launch.sweep import run_sweep
from gppf.presets.finetune import downstream_cls_config
from gppf.presets.tune_downstream import (
    DEMO_LRS,
    DEMO_WEIGHT_DECAYS,
    LRS,
    WEIGHT_DECAYS,
    demo_config,
    search_space,
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
