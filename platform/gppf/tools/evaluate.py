"""Evaluate a checkpoint on its tasks' validation splits, in this process (no Ray Train).

    python -m gppf.tools.evaluate RUN_DIR/checkpoint_.../ [--tasks a,b] [--max-batches N]

The job's config is read from config.json in the run directory (the checkpoint's parent).
Prints one row per metric; exits 2 with a message naming the path when something is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from gppf.api.task import Task
from gppf.models.build import LoadedModel


def checkpoint_model(ckpt_dir: str | Path) -> tuple[LoadedModel, list[Task]]:
    """The checkpoint's whole model (CPU, eval mode) and its run's tasks, built from the run's
    config.json (gppf.models.build.load_model); starts local Ray for the decode tasks."""
    from gppf.api.registry import build_tasks
    from gppf.dist.ray_env import ensure_ray
    from gppf.models.build import checkpoint_config, load_model

    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    tasks = build_tasks(checkpoint_config(ckpt_dir))
    loaded = load_model(ckpt_dir, tasks)
    ensure_ray()
    return loaded, tasks


def evaluate_checkpoint(
    ckpt_dir: str | Path, tasks: list[str] | None = None, max_batches: int = 0
) -> dict[str, Any]:
    from gppf.engine.evaluation import evaluate

    loaded, all_tasks = checkpoint_model(ckpt_dir)
    chosen = [t for t in all_tasks if not tasks or t.name in tasks]
    metrics = evaluate(loaded.model, chosen, loaded.cfg.data, torch.device("cpu"), max_batches=max_batches)
    return {"step": loaded.step, "final_eval": metrics}


def main(argv: list[str] | None = None) -> None:
    from gppf.tools.tables import results_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (holds state.pt)")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    ap.add_argument("--max-batches", type=int, default=0, help="per task; 0 = the whole split")
    args = ap.parse_args(argv)
    try:
        tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
        metrics = evaluate_checkpoint(args.checkpoint, tasks, args.max_batches)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(results_table(metrics))


if __name__ == "__main__":
    main()
