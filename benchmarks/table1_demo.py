"""GPPF Table 1 at demo scale: which ingredients of joint training matter, on the demo tasks.

    python benchmarks/table1_demo.py [--steps 250 --seeds 3 --demo-root DIR --run-dir DIR --out DIR]

Four settings x seeds, every run the same job (the embedded demo of jobs/gppf_r50.py without its
detection task: demo_cls + demo_seg, ResNet-18, 2 CPU workers) for the same number of steps:

  simt_xbn        static backbone, SIMT sampling (each worker draws its own task), cross-task BN
  per_batch_xbn   static backbone, per-batch sampling (all workers run one task per step), cross-task BN
  simt_local_bn   static backbone, SIMT sampling, local BN (each worker normalises its own batch only)
  lego_n2_hard    lego backbone (N=2 units per layer, hard routing), SIMT sampling, cross-task BN

GPPF Table 1 compares the same ingredients on eight real datasets: SIMT, SyncBN (cross-task BN
here) and the dynamic network (lego). It prints, and writes to --out as table1_demo.md and
table1_demo.json, each task's primary validation metric (demo_cls top-1, demo_seg mIoU) as mean ±
std (sample std over seeds) per setting, plus every run's figures and wall time. Given the
--run-dir of an earlier call, runs that finished there with the same config are reused, so an
interrupted command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gppf.config.base import apply_overrides, to_dict
from gppf.config.job import JobConfig

ROOT = Path(__file__).resolve().parents[1]

TASKS = {"demo_cls": "top1", "demo_seg": "mIoU"}  # task -> its primary metric (the evaluator's)
MARKER = "table1_run.json"  # in a run's directory: the config it ran and its wall time


@dataclass(frozen=True)
class Setting:
    key: str
    label: str  # the Table 1 row it stands for
    overrides: tuple[str, ...]


SETTINGS = (
    Setting(
        "simt_xbn",
        "static, SIMT + cross-task BN",
        ("backbone.kind=static", "train.sampler=simt", "backbone.cross_task_bn=true"),
    ),
    Setting(
        "per_batch_xbn",
        "static, per-batch sampling + cross-task BN",
        ("backbone.kind=static", "train.sampler=per_batch", "backbone.cross_task_bn=true"),
    ),
    Setting(
        "simt_local_bn",
        "static, SIMT + local BN",
        ("backbone.kind=static", "train.sampler=simt", "backbone.cross_task_bn=false"),
    ),
    Setting(
        "lego_n2_hard",
        "lego N=2 hard, SIMT + cross-task BN",
        (
            "backbone.kind=lego",
            "backbone.lego.num_units=2",
            "backbone.lego.mode=hard",
            "train.sampler=simt",
            "backbone.cross_task_bn=true",
        ),
    ),
)
BY_KEY = {s.key: s for s in SETTINGS}


@dataclass
class Table1Config:
    # 250 steps give each task about as many worker-steps as the 360-step, three-task demo of
    # jobs/gppf_r50.py, and keep the 12 runs within about 40 minutes on 2 CPU cores (each run
    # also pays ~45 s of worker-group start-up, stream start, final evaluation and checkpoint).
    steps: int = 250
    seeds: int = 3  # seeds 0 .. seeds-1
    settings: tuple[str, ...] = tuple(BY_KEY)
    demo_root: str = "~/.cache/gppf/demo_data"
    demo_images: int = 400  # training images per demo task (validation: a quarter)
    run_dir: str = ""  # "" = ~/gppf_runs/table1_demo-<date>-<time>
    out: str = ""  # "" = the run directory
    overrides: list[str] = field(default_factory=list)  # applied to every run, after the setting's


def job_config(demo_root: str, setting: Setting, seed: int, t1: Table1Config, run_dir: Path) -> JobConfig:
    """One run: the demo job of jobs/gppf_r50.py on demo_cls + demo_seg, with the setting applied."""
    from gppf.presets.gppf_r50 import demo_config

    cfg = demo_config(demo_root)
    cfg.name = "table1_demo"
    cfg.tasks = {k: cfg.tasks[k] for k in TASKS}
    cfg.run_dir, cfg.run_name = str(run_dir), f"{setting.key}-seed{seed}"
    # No step-0 evaluation (it is the same untrained network in every setting, ~10 s a run) and
    # one checkpoint, at the end: the runs are compared by their final validation metrics only.
    base = [
        f"train.steps={t1.steps}",
        f"train.seed={seed}",
        "train.eval_at_start=false",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        f"train.log_every={max(1, t1.steps // 5)}",
        # The demo's 50 warmup steps, fewer in a shorter run so that it still reaches its peak lr.
        f"optim.warmup_steps={min(cfg.optim.warmup_steps, max(1, t1.steps // 6))}",
    ]
    return apply_overrides(cfg, [*base, *setting.overrides, *t1.overrides])


def finished(run: Path, cfg: JobConfig) -> tuple[dict[str, Any], float] | None:
    """The final metrics and wall time of a finished run of this very config in `run`, or None.

    table1_run.json (written after the fit) holds the config it was asked to run: results of any
    other config in the same place are an error, not a silent reuse."""
    marker, results = run / MARKER, run / "results.json"
    if not (marker.is_file() and results.is_file()):
        return None
    saved = json.loads(marker.read_text())
    if saved["config"] != to_dict(cfg):
        raise FileExistsError(
            f"{run} holds a finished run of another configuration (steps, seed or --set differ); "
            "pick another --run-dir"
        )
    return json.loads(results.read_text()), saved["wall_s"]


def summarise(runs: list[dict[str, Any]], settings: list[Setting]) -> list[dict[str, Any]]:
    """Per setting and task: the primary metric's mean and sample std over seeds (std None for one)."""
    rows = []
    for s in settings:
        mine = [r for r in runs if r["setting"] == s.key]
        row: dict[str, Any] = {"setting": s.key, "label": s.label, "seeds": [r["seed"] for r in mine]}
        for task, metric in TASKS.items():
            values = [r["metrics"][task][metric] for r in mine]
            row[task] = {
                "metric": metric,
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
        rows.append(row)
    return rows


def _pm(entry: dict[str, Any]) -> str:
    std = "n/a" if entry["std"] is None else f"{entry['std']:.2f}"
    return f"{entry['mean']:.2f} ± {std}"


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], t1: Table1Config) -> str:
    head = [f"{task} {metric}" for task, metric in TASKS.items()]
    lines = [
        f"GPPF Table 1 at demo scale: {t1.steps} steps per run, seeds {sorted({r['seed'] for r in runs})}, "
        "mean ± sample std over seeds.",
        "",
        "| setting | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    lines += [f"| {r['label']} | " + " | ".join(_pm(r[t]) for t in TASKS) + " |" for r in rows]
    lines += [
        "",
        "| run | seed | " + " | ".join(head) + " | wall s |",
        "|---|---|" + "---|" * (len(head) + 1),
    ]
    lines += [
        f"| {r['setting']} | {r['seed']} | "
        + " | ".join(f"{r['metrics'][t][m]:.2f}" for t, m in TASKS.items())
        + f" | {r['wall_s']:.0f} |"
        for r in runs
    ]
    lines += ["", f"Wall time of the runs: {sum(r['wall_s'] for r in runs) / 60:.1f} min. Settings:", ""]
    lines += [f"- `{r['setting']}`: `{' '.join(BY_KEY[r['setting']].overrides)}`" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> Table1Config:
    d = Table1Config()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=d.steps, help="training steps of every run")
    ap.add_argument("--seeds", type=int, default=d.seeds, help="seeds per setting (0, 1, ...)")
    ap.add_argument(
        "--settings", default=",".join(d.settings), help=f"comma-separated subset of {', '.join(BY_KEY)}"
    )
    ap.add_argument("--demo-root", default=d.demo_root, help="where the demo data is (generated if absent)")
    ap.add_argument("--demo-images", type=int, default=d.demo_images, help="training images per demo task")
    ap.add_argument("--run-dir", default=d.run_dir, help="parent of the runs' directories")
    ap.add_argument("--out", default=d.out, help="directory for table1_demo.md/.json (default: --run-dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    settings = tuple(s.strip() for s in a.settings.split(",") if s.strip())
    unknown = [s for s in settings if s not in BY_KEY]
    if unknown or not settings:
        ap.error(f"--settings: unknown {unknown}; choose from {', '.join(BY_KEY)}")
    if a.steps < 1 or a.seeds < 1:
        ap.error("--steps and --seeds must be >= 1")
    return Table1Config(a.steps, a.seeds, settings, a.demo_root, a.demo_images, a.run_dir, a.out, a.overrides)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from gppf.data.demo import generate
    from gppf.dist.ray_env import ensure_ray
    from gppf.launch.fit import fit

    t1 = parse_args(argv)
    n = max(8, t1.demo_images)
    demo_root = str(generate(Path(t1.demo_root).expanduser().absolute(), n, max(4, n // 4)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(t1.run_dir or f"~/gppf_runs/table1_demo-{stamp}").expanduser().absolute()
    out = Path(t1.out).expanduser().absolute() if t1.out else run_dir
    settings = [BY_KEY[k] for k in t1.settings]
    plan = [(s, seed) for seed in range(t1.seeds) for s in settings]  # seed-major: early rows compare
    ensure_ray()  # one Ray instance for every fit (each fit still starts its own worker group)
    runs: list[dict[str, Any]] = []
    t0, fitted, n_fits = time.time(), 0.0, 0  # ETA from the runs fitted here (not reused ones)
    for i, (setting, seed) in enumerate(plan):
        cfg = job_config(demo_root, setting, seed, t1, run_dir)
        here = run_dir / cfg.run_name
        print(f"\n[table1] run {i + 1}/{len(plan)}: {setting.key} seed {seed} ({setting.label})", flush=True)
        done = finished(here, cfg)
        if done is None:
            # A run stopped after its final checkpoint continues in place; otherwise it starts over.
            resume = str(here) if any(here.glob("checkpoint_*")) else None
            t_run = time.time()
            metrics = fit(cfg, resume_from=resume)
            wall = time.time() - t_run
            (here / MARKER).write_text(json.dumps({"config": to_dict(cfg), "wall_s": wall}, indent=2))
            fitted, n_fits = fitted + wall, n_fits + 1
        else:
            metrics, wall = done
            print(f"[table1] reusing the finished run in {here} (it took {wall:.0f}s)", flush=True)
        runs.append(
            {
                "setting": setting.key,
                "seed": seed,
                "run_dir": str(here),
                "wall_s": wall,
                "metrics": {t: metrics["final_eval"][t] for t in TASKS},
            }
        )
        shown = ", ".join(f"{t} {m} {metrics['final_eval'][t][m]:.2f}" for t, m in TASKS.items())
        left = len(plan) - i - 1
        eta = f"{fitted / n_fits * left / 60:.1f} min" if n_fits else "?"
        print(
            f"[table1] run {i + 1}/{len(plan)} done in {wall:.0f}s: {shown}; "
            f"elapsed {(time.time() - t0) / 60:.1f} min, ETA {eta} ({left} runs left)",
            flush=True,
        )
    rows = summarise(runs, settings)
    table = markdown(rows, runs, t1)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "steps": t1.steps,
        "seeds": list(range(t1.seeds)),
        "tasks": TASKS,
        "settings": {s.key: {"label": s.label, "overrides": list(s.overrides)} for s in settings},
        "overrides": t1.overrides,
        "demo_root": demo_root,
        "demo_images": n,
        "wall_s": time.time() - t0,  # this command's; reused runs took theirs earlier
        "runs_wall_s": sum(r["wall_s"] for r in runs),
        "summary": rows,
        "runs": runs,
    }
    (out / "table1_demo.md").write_text(table)
    (out / "table1_demo.json").write_text(json.dumps(result, indent=2))
    print(f"\n[table1] {len(plan)} runs in {(time.time() - t0) / 60:.1f} min; written to {out}\n\n{table}")
    return result


if __name__ == "__main__":
    run()
