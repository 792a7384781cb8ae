"""Command line shared by the job files: --data-root, --set key=value, --set-file, --tasks, --resume."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gppf.config.base import ConfigError, apply_overrides, apply_values, to_dict
from gppf.config.job import JobConfig
from gppf.io import storage


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data-root",
        default=None,
        help="directory (or pyarrow.fs URI: s3://bucket/prefix, gs://...) holding the real datasets; "
        "without it the job runs the embedded demo (local Ray, generated data, shrunken schedule)",
    )
    ap.add_argument(
        "--demo-root",
        default="~/.cache/gppf/demo_data",
        help="where the embedded demo writes its data (a directory, or a URI it uploads them to)",
    )
    ap.add_argument(
        "--demo-images",
        type=int,
        default=400,
        help="training images per demo task (validation: a quarter); a smaller set generates faster",
    )
    ap.add_argument(
        "--tasks",
        default=None,
        help="comma-separated subset of the job's tasks to train (applied after --set-file and --set, "
        "so it can select a task they add)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=0.1 --set tasks.in21k.batch_size=64",
    )
    ap.add_argument(
        "--set-file",
        dest="set_files",
        action="append",
        default=[],
        metavar="FILE",
        help="a JSON object of overrides {key: value} (e.g. a sweep's best_overrides.json), applied "
        "before --set",
    )
    ap.add_argument(
        "--resume",
        default=None,
        help="a run directory (continues that run in place, from its newest checkpoint) or a "
        "checkpoint directory (a new run continues from it)",
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument(
        "--plan",
        action="store_true",
        help="measure one forward+backward of every task on this machine, print the per-task table "
        "and the expected SIMT step time and idle fraction, suggest batch sizes, and exit",
    )
    ap.add_argument(
        "--plan-memory-gb",
        type=float,
        default=None,
        help="--plan: memory cap per worker (default: 90%% of the GPU, or of the free RAM shared "
        "by the workers)",
    )
    return ap


def select_tasks(cfg: JobConfig, names: str | None) -> JobConfig:
    if not names:
        return cfg
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in cfg.tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task {unknown[0]!r}; this job has {', '.join(cfg.tasks)}")
    cfg.tasks = {n: cfg.tasks[n] for n in wanted}
    return cfg


def read_set_file(path: str | Path) -> dict[str, Any]:
    """An override file: one JSON object of dotted keys to values."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--set-file {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--set-file {path}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"--set-file {path}: expected a JSON object of key: value, got {type(values).__name__}"
        )
    return values


def load_config(
    args: argparse.Namespace,
    full_config: Callable[[str], JobConfig],
    demo_config: Callable[[str], JobConfig],
) -> JobConfig:
    """The job's config from the command line: the full one with --data-root, else the embedded
    demo (its data generated first), then --set-file, --set and last --tasks. Errors exit with status 2."""
    try:
        if args.data_root:
            root = storage.path(args.data_root)
            if not root.is_dir():
                raise FileNotFoundError(f"--data-root {storage.display(root)} does not exist")
            if not any(root.iterdir()):
                raise FileNotFoundError(f"--data-root {storage.display(root)} is empty")
            cfg = full_config(storage.absolute(root))
        else:
            from gppf.data.demo import generate

            n = max(8, args.demo_images)
            cfg = demo_config(str(generate(storage.absolute(args.demo_root), n, max(4, n // 4))))
        for path in args.set_files:
            cfg = apply_values(cfg, read_set_file(path), where=f"--set-file {path}:")
        # The selection comes last, so that it can pick a task that --set-file or --set adds.
        return select_tasks(apply_overrides(cfg, args.overrides), args.tasks)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg: JobConfig, resume: str | None = None) -> dict:
    """Fit the job and print its results table."""
    from gppf.launch.fit import fit
    from gppf.tools.tables import results_table

    t0 = time.time()
    metrics = fit(cfg, resume_from=resume)
    print(
        f"\n[gppf] {cfg.name}: {metrics.get('step')} steps in {time.time() - t0:.0f}s; "
        f"run directory {storage.display(metrics.get('run_dir', ''))}"
    )
    print(results_table(metrics))
    return metrics


def main(
    description: str,
    full_config: Callable[[str], JobConfig],
    demo_config: Callable[[str], JobConfig],
    argv: list[str] | None = None,
) -> dict:
    """Build the job's config (full with --data-root, else the embedded demo), run it, print the table."""
    args = parser(description).parse_args(argv)
    return execute(args, load_config(args, full_config, demo_config))


def execute(args: argparse.Namespace, cfg: JobConfig) -> dict:
    """What the command line asks of a loaded config: print it, plan it, or run it."""
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return {}
    if args.plan:
        from gppf.launch.fit import resolve
        from gppf.tools.capacity import plan

        return {"plan": plan(resolve(cfg), args.plan_memory_gb)}
    return run(cfg, args.resume)
