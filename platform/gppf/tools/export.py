"""Export a task's backbone from a checkpoint as a plain timm state_dict (GPPF §3.3: a task's path
through the lego backbone is an ordinary network).

    python -m gppf.tools.export RUN_DIR/checkpoint_.../ --task coco -o coco_route.pt

The file loads with `timm.create_model(NAME, num_classes=0).load_state_dict(torch.load(FILE))`
(strict) and as `backbone.init_from` of another job. A static backbone needs no --task.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from gppf.api.trunk import Trunk
from gppf.config.job import JobConfig
from gppf.io import storage
from gppf.io.storage import UriPath
from gppf.models.build import load_model


def load_trunk(ckpt_dir: str | Path) -> tuple[Trunk, JobConfig]:
    """The trunk of a checkpoint with its weights, and its run's config (gppf.models.build.load_model)."""
    loaded = load_model(ckpt_dir)
    return loaded.model.backbone, loaded.cfg


def export(trunk: Trunk, out: str | Path | UriPath, task: str | None = None) -> Path | UriPath:
    """Write `trunk.export(task)` to `out`; a lego trunk needs the task whose route it is."""
    routes = trunk.routes()
    if routes and task not in routes:
        raise ValueError(
            f"a lego backbone has one route per task: pass --task, one of {', '.join(sorted(routes))}"
        )
    out = storage.path(out)
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trunk.export(task), out)
    else:
        buf = io.BytesIO()
        torch.save(trunk.export(task), buf)
        out.write_bytes(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (holds state.pt)")
    ap.add_argument("--task", default=None, help="whose route to export (lego backbones)")
    ap.add_argument("-o", "--out", required=True, help="output file (.pt)")
    args = ap.parse_args(argv)
    try:
        trunk, cfg = load_trunk(args.checkpoint)
        path = export(trunk, args.out, args.task)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    route = f", route {trunk.routes()[args.task]['route']}" if args.task and trunk.routes() else ""
    print(f"{path}: timm.create_model({cfg.backbone.name!r}, num_classes=0) loads it (strict){route}")


if __name__ == "__main__":
    main()
