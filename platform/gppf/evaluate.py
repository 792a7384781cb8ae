"""Evaluate a checkpoint on its tasks' validation splits, in this process (no Ray Train).

    python -m gppf.evaluate RUN_DIR/checkpoint_.../ [--tasks a,b] [--max-batches N]

The job's config is read from config.json in the run directory (the checkpoint's parent).
Prints one row per metric; exits 2 with a message naming the path when something is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gppf.config import from_dict
from gppf.job_config import JobConfig

if TYPE_CHECKING:
    from gppf.trainer import Trainer


def checkpoint_worker(ckpt_dir: str | Path) -> Trainer:
    """A single-process Trainer (CPU) holding the checkpoint's whole state, built from the run's
    config.json; starts local Ray for its data streams. `close()` it when done."""
    from gppf.checkpoint import load_checkpoint
    from gppf.data.stream import configure_data_context
    from gppf.runner import ensure_ray
    from gppf.trainer import Trainer

    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    config = ckpt_dir.parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no {config}: pass a checkpoint directory inside a gppf run directory")
    cfg = from_dict(JobConfig, json.loads(config.read_text()), where=str(config))
    state = load_checkpoint(ckpt_dir)
    ensure_ray()
    configure_data_context(cfg.data)
    worker = Trainer(cfg, torch.device("cpu"), initialise=False)
    worker.load_state_dict(state)
    return worker


def evaluate_checkpoint(
    ckpt_dir: str | Path, tasks: list[str] | None = None, max_batches: int = 0
) -> dict[str, Any]:
    worker = checkpoint_worker(ckpt_dir)
    if tasks:
        worker.tasks = [t for t in worker.tasks if t.name in tasks]
    try:
        return {"step": worker.step, "final_eval": worker.evaluate(max_batches)}
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    from gppf.runner import results_table

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
