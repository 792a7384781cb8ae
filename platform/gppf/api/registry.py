"""The one task registry: `@register_task("name")`, plus the `gppf.tasks` entry-point group.

A plugin in its own pip package declares, in its pyproject.toml:

    [project.entry-points."gppf.tasks"]
    my_task = "my_package.module:MyTask"

and its class is found the first time a job names `my_task`.
"""

from __future__ import annotations

import importlib
import math
from importlib import metadata
from typing import TYPE_CHECKING, Any

from gppf.api.task import Task
from gppf.config.base import ConfigError, from_dict
from gppf.config.task import TaskConfig

if TYPE_CHECKING:
    from gppf.config.job import JobConfig

ENTRY_POINT_GROUP = "gppf.tasks"

_REGISTRY: dict[str, type[Task]] = {}


class TaskRegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def register_task(name: str):
    """Class decorator registering a Task subclass under `name`; a duplicate name is an error."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(
                f"@register_task({name!r}) must decorate a gppf.api.task.Task subclass, got {cls!r}"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            if f"{existing.__module__}.{existing.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
                raise TaskRegistryError(
                    f"task type {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; "
                    f"{cls.__module__}.{cls.__qualname__} cannot take the same name"
                )
        _REGISTRY[name] = cls
        cls.task_type = name
        return cls

    return deco


def _load_entry_point(name: str) -> type[Task] | None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()  # importing the module runs its @register_task
            if name not in _REGISTRY:
                register_task(name)(cls)
            return _REGISTRY[name]
    return None


def available() -> list[str]:
    names = set(_REGISTRY)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_task_class(name: str) -> type[Task]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    cls = _load_entry_point(name)
    if cls is not None:
        return cls
    raise TaskRegistryError(f"unknown task type {name!r}; registered task types: {', '.join(available())}")


def build_task(name: str, entry: dict[str, Any]) -> Task:
    """Build task instance `name` from a job's `tasks.<name>` entry ({"type": ..., **config}).

    `plugin_module` (written by the driver when it resolves a config) is imported first, so a
    plugin registered by a module the job script imported is found on every worker too.
    """
    entry = dict(entry)
    if "type" not in entry:
        raise ConfigError(f"tasks.{name}: missing key 'type' (one of {', '.join(available())})")
    task_type = entry.pop("type")
    module = entry.pop("plugin_module", None)
    if module and task_type not in _REGISTRY:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TaskRegistryError(
                f"tasks.{name}: cannot import plugin module {module!r} for task type {task_type!r} "
                f"({e}); install it on every node or keep it next to the job script"
            ) from None
    try:
        cls = get_task_class(task_type)
    except TaskRegistryError as e:
        raise TaskRegistryError(f"tasks.{name}: {e}") from None
    cfg = from_dict(cls.config_cls, entry, where=f"tasks.{name}")
    check_common(name, cfg)
    return cls(name, cfg)


def check_common(name: str, cfg: TaskConfig) -> None:
    """The fields every task has (gppf.config.task.TaskConfig), whatever its plugin checks besides."""
    for key in ("loss_weight", "sampling_weight"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"tasks.{name}.{key} must be a finite number >= 0, got {value}")
    if cfg.batch_size < 1:
        raise ConfigError(f"tasks.{name}.batch_size must be >= 1, got {cfg.batch_size}")
    if not 0 < cfg.label_fraction <= 1:
        raise ConfigError(f"tasks.{name}.label_fraction must be in (0, 1], got {cfg.label_fraction}")


def build_tasks(cfg: JobConfig) -> list[Task]:
    """The job's tasks in its order. Their types are found in the registry, which loads plugins
    through their entry points (the bundled ones included) or a task's `plugin_module`."""
    return [build_task(name, entry) for name, entry in cfg.tasks.items()]
