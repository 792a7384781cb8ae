"""Ray Tune sweep over GPPF's loss weights, CompL's λ, the Gumbel temperature and adapter designs.

Every trial is a full multi-worker SIMT run of jobs/gppf_r50.py's config plus ADDITIONS (a
rotation auxiliary task, whose loss weight is λ; the shared FPN neck, where the adapter designs
live; VTDA groups, the objective). Submit to a Ray cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/tune_gppf.py --data-root /data/gppf \\
        --sweep num_samples=32 --sweep searcher=optuna

or run with no arguments for the embedded default: a local Ray instance, generated demo data,
the demo's tiny lego ResNet on classification + segmentation + rotation, 8 trials of 90 steps
with ASHA (about 10 minutes on 2 CPUs). It prints a progress line per trial event, then the
results table; in ~/gppf_sweeps/<name>/ it writes results.csv, objective_vs_params.png,
best_overrides.json (for `python jobs/gppf_r50.py --set-file`), and each trial's run (TensorBoard
logs included) under runs/. Running the same command again resumes an interrupted sweep.

--set changes the config of every trial (TRIAL_SETTINGS shrink the schedule: a sweep compares
short runs); --sweep changes the sweep (objective, mode, num_samples, searcher, scheduler,
grace_period, reduction_factor, max_concurrent, seed; see gppf.config.sweep.SweepConfig); --name picks
the sweep's directory. The search space is `search_space` below: edit it like the rest of a job.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gppf.config.base import ConfigError, apply_overrides, apply_values, to_dict
from gppf.config.job import JobConfig
from gppf.config.sweep import SweepConfig
from gppf.launch import cli
from gppf.launch.sweep import run_sweep
from gppf.presets.tune_gppf import (
    TRIAL_SETTINGS_DEMO,
    TRIAL_SETTINGS_FULL,
    demo_base,
    full_base,
    search_space,
    sweep_config,
)


def parse(argv: list[str] | None):
    ap = cli.parser(__doc__)
    ap.add_argument(
        "--sweep",
        dest="sweep_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep setting, e.g. --sweep num_samples=16 --sweep searcher=optuna",
    )
    ap.add_argument("--name", default=None, help="the sweep's name (its directory under sweep_dir)")
    return ap.parse_args(argv)


def build(args) -> tuple[JobConfig, dict[str, Any], dict[str, Any], SweepConfig]:
    """(trial base config, search space, additions, sweep config) from the command line."""
    demo = not args.data_root
    holder: dict[str, Any] = {}

    def base(root: str, make=demo_base if demo else full_base) -> JobConfig:
        cfg, added = make(root)
        holder["additions"] = added
        return apply_values(cfg, added, "sweep addition")

    cfg = cli.load_config(args, base, base)  # --tasks, --set-file and --set apply to the trials
    added = holder["additions"]
    try:
        cfg = apply_values(cfg, TRIAL_SETTINGS_DEMO if demo else TRIAL_SETTINGS_FULL, "trial setting")
        cfg = apply_overrides(cfg, args.overrides)  # the user's --set win over the trial settings
        sweep = apply_overrides(sweep_config(demo), args.sweep_overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.name:
        sweep.name = args.name
    return cfg, search_space(cfg), added, sweep


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.resume:
        print("error: a sweep resumes by itself: run the same command again (same --name)", file=sys.stderr)
        sys.exit(2)
    cfg, space, added, sweep = build(args)
    if args.print_config:
        print(json.dumps({"trial_base": to_dict(cfg), "sweep": to_dict(sweep)}, indent=2))
        return {}
    try:
        return run_sweep(cfg, space, sweep, additions=added, applies_to="jobs/gppf_r50.py")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
