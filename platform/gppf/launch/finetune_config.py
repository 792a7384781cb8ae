"""Sparse finetuning of a lego checkpoint on a new task (GPPF §3.3).

- `dynamic`: the job's tasks get new controllers that explore the checkpoint's units with
  Gumbel-softmax while backbone and controllers train together; τ decays over the first half of
  the steps, then stays (App. D.2). At the end each task's arg-max route is written to the run
  directory as a plain backbone (`route_<task>.pt`, loads into timm with strict=True).
- `fixed`: reuse a route: a task of the checkpoint (a detection task reusing COCO's) or a route
  file (the one a dynamic finetuning wrote: "retrain"). The route is extracted as a plain
  backbone first and trained as a static backbone.

    --set finetune.mode=dynamic --set finetune.checkpoint=RUN/checkpoint_...
    --set finetune.mode=fixed   --set finetune.checkpoint=RUN/checkpoint_... --set finetune.route=coco
    --set finetune.mode=fixed   --set finetune.route=RUN2/route_voc.pt          (retrain)
    --set finetune.head_from=objects365   (the task's head from that task's, minus its predictor)

The backbone architecture (timm name, units, shared layers, model_kwargs) comes from the
checkpoint's run, so a finetuning job only names its tasks.
"""

from __future__ import annotations

import copy
from pathlib import Path

from gppf.config.base import ConfigError
from gppf.config.job import JobConfig
from gppf.io import storage
from gppf.io.storage import UriPath


def prepare(cfg: JobConfig, run_dir: Path | UriPath) -> JobConfig:
    """The plain job a finetune section stands for (on the driver; a fixed route of a checkpoint
    is exported into `run_dir` here)."""
    f = cfg.finetune
    if not f.mode:
        return cfg
    from gppf.models.build import checkpoint_config
    from gppf.tools.export import export, load_trunk

    cfg = copy.deepcopy(cfg)
    if f.head_from:
        _head_from(cfg)
    if f.mode == "dynamic" or not Path(f.route).suffix:  # a task's route needs the checkpoint
        if not f.checkpoint:
            raise ConfigError(f"config.finetune.checkpoint: finetune.mode={f.mode} needs a gppf checkpoint")
        source = checkpoint_config(f.checkpoint).backbone
        if source.kind != "lego":
            raise ConfigError(
                f"config.finetune.checkpoint: {f.checkpoint} has a {source.kind} backbone; sparse "
                "finetuning starts from a lego one (a static backbone is plain: use backbone.init_from)"
            )
        job = cfg.backbone
        cfg.backbone = copy.deepcopy(source)
        if job.drop_path_rate is not None:  # the finetuning's stochastic depth (App. D.2's depth: 0.4)
            cfg.backbone.drop_path_rate = job.drop_path_rate
    if f.mode == "dynamic":
        cfg.backbone.init_from = f.checkpoint
        cfg.backbone.lego.tau_decay_fraction = f.tau_decay_fraction
        cfg.train.export_routes = True
        return cfg
    if not f.route:
        raise ConfigError(
            "config.finetune.route: fixed-path finetuning needs a task of the checkpoint or a route file"
        )
    if Path(f.route).suffix:  # a route file, e.g. from a dynamic finetuning ("retrain")
        route_file = storage.absolute(f.route)
    else:
        trunk, _ = load_trunk(f.checkpoint)
        if f.route not in trunk.routes():
            raise ConfigError(
                f"config.finetune.route: the checkpoint has no task {f.route!r}; its tasks: "
                f"{', '.join(sorted(trunk.routes()))}"
            )
        route_file = export(trunk, run_dir / f"route_{f.route}.pt", f.route)
    cfg.backbone.kind = "static"
    cfg.backbone.init_from = str(route_file)
    return cfg


def _head_from(cfg: JobConfig) -> None:
    """finetune.head_from: the job's task's head starts from that checkpoint task's head, through
    model.init_from with a key map, its `head_skip` parts left as initialised (reported)."""
    f = cfg.finetune
    if not f.checkpoint:
        raise ConfigError(
            "config.finetune.head_from needs finetune.checkpoint, the checkpoint holding that head"
        )
    if len(cfg.tasks) != 1:
        raise ConfigError(
            "config.finetune.head_from initialises the head of the job's one task; it has "
            f"{', '.join(cfg.tasks)}"
        )
    from gppf.models.build import checkpoint_config

    source = checkpoint_config(f.checkpoint)
    if f.head_from not in source.tasks:
        raise ConfigError(
            f"config.finetune.head_from: the checkpoint has no task {f.head_from!r}; its tasks: "
            f"{', '.join(sorted(source.tasks))}"
        )
    task = next(iter(cfg.tasks))
    cfg.model.init_from = f.checkpoint
    cfg.model.init_map = {f"heads.{f.head_from}.*": f"heads.{task}.*"}
    cfg.model.init_skip = [f"heads.{task}.{pattern}" for pattern in f.head_skip]
