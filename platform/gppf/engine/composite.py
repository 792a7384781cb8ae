"""CompL's composite mode: an auxiliary task that rides along with a target task's steps.

A task with `composite_with: <target>` is never sampled on its own: every step in which a
worker samples the target also takes a batch of the attached task, both go through one trunk
forward (gppf.models.model.MultiTaskModel.forward_composite) and the loss is L_t + λ L_a, λ being the
attached task's loss_weight (CompL eq. 1; 8 + 8 images with batch_size 8 each).
"""

from __future__ import annotations

from gppf.api.task import Task
from gppf.config.base import ConfigError


def attached_tasks(tasks: list[Task]) -> dict[int, list[int]]:
    """{index of a target task: indices of the tasks attached to it}, validated."""
    index = {t.name: i for i, t in enumerate(tasks)}
    out: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        target = t.cfg.composite_with
        if not target:
            continue
        where = f"tasks.{t.name}.composite_with"
        if target not in index:
            raise ConfigError(f"{where}: no task named {target!r} (tasks: {', '.join(index)})")
        if target == t.name:
            raise ConfigError(f"{where}: a task cannot be attached to itself")
        host = tasks[index[target]]
        if host.cfg.composite_with:
            raise ConfigError(f"{where}: {target!r} is itself attached to {host.cfg.composite_with!r}")
        if host.cfg.input_size != t.cfg.input_size:
            raise ConfigError(
                f"{where}: one trunk forward takes both inputs, so input_size must match "
                f"({t.name}: {t.cfg.input_size}, {target}: {host.cfg.input_size})"
            )
        out.setdefault(index[target], []).append(i)
    return out


def sampling_weights(tasks: list[Task]) -> dict[str, float]:
    """Each task's sampling weight; an attached task's is 0 (it runs with its target)."""
    return {t.name: 0.0 if t.cfg.composite_with else t.cfg.sampling_weight for t in tasks}
