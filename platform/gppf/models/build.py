"""Building models, in one place for training and every tool: the trunk a backbone config names,
the whole multi-task model (trunk, shared neck, one head per task; `build_model`), and a
checkpoint's model with its weights (`load_model`, from the run's config.json next to it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gppf.models  # noqa: F401  (registers the bundled trunks)
from gppf.api.heads import check_head
from gppf.api.trunk import _TRUNKS, Trunk, timm_family
from gppf.config.base import from_dict
from gppf.config.job import JobConfig
from gppf.io import storage
from gppf.io.checkpoint import load_checkpoint
from gppf.models.model import MultiTaskModel
from gppf.models.neck import build_neck

if TYPE_CHECKING:
    from gppf.api.task import Task
    from gppf.config.job import BackboneConfig
    from gppf.io.storage import UriPath

CONFIG_FILE = "config.json"  # the resolved job config, in the run directory beside its checkpoints


def build_trunk(cfg: BackboneConfig, task_names: list[str]) -> Trunk:
    """The trunk for `cfg` (backbone.kind and backbone.name) serving `task_names`."""
    family = timm_family(cfg.name)
    builder = _TRUNKS.get((cfg.kind, family)) or _TRUNKS.get((cfg.kind, "*"))
    if builder is None:
        known = ", ".join(f"{k}/{f}" for k, f in sorted(_TRUNKS))
        raise ValueError(
            f"no trunk for backbone.kind={cfg.kind!r} with {cfg.name!r} (timm family {family!r}); "
            f"registered kind/family pairs: {known}"
        )
    return builder(cfg, task_names)


def build_model(cfg: JobConfig, tasks: Sequence[Task], heads: Sequence[str] | None = None) -> MultiTaskModel:
    """Trunk and neck serving all of `tasks` (a lego trunk has a route per task), with the heads of
    `heads` (default: every task). Each head's optional abilities (gppf.api.heads) are checked
    here: a half-declared one fails now, naming the head and what it lacks."""
    trunk = build_trunk(cfg.backbone, [t.name for t in tasks])
    neck = build_neck(cfg.model, trunk.feature_info, list(tasks))
    chosen = list(tasks) if heads is None else [t for t in tasks if t.name in set(heads)]
    model = MultiTaskModel(trunk, chosen, neck)
    for name, head in model.heads.items():
        check_head(name, head)
    return model


def checkpoint_config(ckpt_dir: str | Path | UriPath) -> JobConfig:
    """The job config of the run a checkpoint belongs to (config.json next to the checkpoint)."""
    config = storage.path(storage.absolute(ckpt_dir)).parent / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"no {storage.display(config)}: pass a checkpoint directory inside a gppf run directory"
        )
    return from_dict(JobConfig, json.loads(config.read_text()), where=storage.display(config))


@dataclass
class LoadedModel:
    """A checkpoint's model (eval mode, weights loaded), its run's config and its training state
    (step, optimizer, streams: what a tool may want besides the weights)."""

    model: MultiTaskModel
    cfg: JobConfig
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_model(
    ckpt_dir: str | Path | UriPath,
    tasks: Sequence[Task] | None = None,
    heads: Sequence[str] | None = None,
) -> LoadedModel:
    """The model of checkpoint `ckpt_dir`, built by `build_model` from its run's config for `tasks`
    (the run's tasks, built from that config: `gppf.api.registry.build_tasks(checkpoint_config(..))`),
    with the heads of `heads` (default all). The load is strict: a head whose task changed (other
    classes) is an error naming the task. With no `tasks`, the model is the trunk alone (what
    export needs; no plugin is loaded)."""
    cfg = checkpoint_config(ckpt_dir)
    if tasks is None:
        model = MultiTaskModel(build_trunk(cfg.backbone, list(cfg.tasks)), [], None)
        state = load_checkpoint(storage.absolute(ckpt_dir))
        trunk = {k: v for k, v in state["model"].items() if k.startswith("backbone.")}
        model.load_state_dict(trunk, strict=True)
        return LoadedModel(model.eval(), cfg, state)
    known = set(cfg.tasks)
    for name in heads if heads is not None else [t.name for t in tasks]:
        if name not in known:
            where = storage.display(ckpt_dir)
            raise ValueError(f"{where} has no head for task {name!r}; its tasks: {', '.join(cfg.tasks)}")
    model = build_model(cfg, tasks, heads)
    state = load_checkpoint(storage.absolute(ckpt_dir))
    weights = state["model"]
    if heads is not None:
        own = tuple(f"heads.{h}." for h in heads)
        weights = {k: v for k, v in weights.items() if not k.startswith("heads.") or k.startswith(own)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        where = storage.display(ckpt_dir)
        raise ValueError(f"{where} does not fit the tasks {', '.join(known)} it is loaded for: {e}") from None
    return LoadedModel(model.eval(), cfg, state)
