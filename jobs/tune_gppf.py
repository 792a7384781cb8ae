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
grace_period, reduction_factor, max_concurrent, seed; see gppf.sweep.SweepConfig); --name picks
the sweep's directory. The search space is `search_space` below: edit it like the rest of a job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import demo_config as r50_demo  # noqa: E402
from gppf_r50 import full_config as r50_full  # noqa: E402
from ray import tune  # noqa: E402

from gppf import cli  # noqa: E402
from gppf.config import ConfigError, apply_overrides, apply_values, to_dict  # noqa: E402
from gppf.job_config import JobConfig  # noqa: E402
from gppf.neck import ADAPTERS  # noqa: E402
from gppf.sweep import SweepConfig, run_sweep  # noqa: E402

AUX = "rotation"


def additions(cfg: JobConfig, images_root: str, images: list[str], val_images: list[str]) -> dict[str, Any]:
    """What the sweep adds to gppf_r50's config; best_overrides.json repeats it, so that
    `jobs/gppf_r50.py --set-file best_overrides.json` trains the best trial's config."""
    size = min(int(t.get("input_size", 224)) for t in cfg.tasks.values())
    groups = {}
    for name, task in cfg.tasks.items():
        metric = {"classification": "top1", "detection": "box_AP", "segmentation": "mIoU"}[task["type"]]
        groups.setdefault(task["type"], []).append(f"{name}/{metric}")
    return {
        # CompL's rotation task on the classification images: λ is its loss_weight (CompL: 0.05).
        f"tasks.{AUX}": {
            "type": "rotation",
            "data_root": images_root,
            "images": images,
            "val_images": val_images,
            "sampling_weight": 0.5,
            "loss_weight": 0.05,
            "batch_size": 16,
            "input_size": size,
        },
        "model.neck": "fpn",  # the adapter designs act on a neck shared by every task
        "model.neck_channels": 64 if size <= 64 else 256,
        "metrics.groups": groups,  # VTDA: one group per task type, each task's primary metric
    }


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """{config key: Ray Tune domain}; each key is one `--set` accepts."""
    targets = [n for n, t in cfg.tasks.items() if n != AUX]
    return {
        **{f"tasks.{n}.loss_weight": tune.loguniform(0.5, 2.0) for n in targets},
        f"tasks.{AUX}.loss_weight": tune.loguniform(0.01, 0.2),  # λ
        "backbone.lego.tau_start": tune.uniform(2.0, 5.0),
        "backbone.lego.tau_end": tune.loguniform(0.01, 1.0),
        "backbone.lego.tau_decay_fraction": tune.uniform(0.5, 0.9),
        "model.adapter": tune.choice(list(ADAPTERS)),
        "model.language.variant": tune.choice(["", "lv_adapter"]),
        # Task sampling weights are tuned the same way, e.g. tasks.<name>.sampling_weight.
    }


# Trials are short runs of the job: these change the trials only, not best_overrides.json.
TRIAL_SETTINGS_DEMO = {
    "train.steps": 90,
    "train.eval_every": 30,
    "train.eval_at_start": False,
    "train.eval_max_batches": 2,
    "train.checkpoint_every": 30,
    "train.log_every": 30,
    "optim.warmup_steps": 10,
}
TRIAL_SETTINGS_FULL = {
    "train.steps": 20_000,
    "train.eval_every": 2_500,
    "train.eval_at_start": False,
    "train.checkpoint_every": 2_500,
    "optim.warmup_steps": 2_000,
    "scaling.num_workers": 8,
}


def sweep_config(demo: bool) -> SweepConfig:
    if demo:
        return SweepConfig(name="tune_gppf_demo", num_samples=8, grace_period=30, reduction_factor=2.0)
    return SweepConfig(name="tune_gppf", num_samples=32, searcher="optuna", grace_period=5_000)


def demo_base(demo_root: str) -> tuple[JobConfig, dict[str, Any]]:
    cfg = r50_demo(demo_root)
    cfg.tasks = {n: cfg.tasks[n] for n in ("demo_cls", "demo_seg")}  # detection is the slow one here
    images = str(Path(demo_root) / "classification")
    return cfg, additions(cfg, images, ["train"], ["val"])


def full_base(data_root: str) -> tuple[JobConfig, dict[str, Any]]:
    cfg = r50_full(data_root)
    images = str(Path(data_root) / "imagenet21k")
    return cfg, additions(cfg, images, ["train"], [])


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
