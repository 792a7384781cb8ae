"""The optional abilities of a head, as Protocols.

A head is any `nn.Module` whose `forward(feats)` takes the trunk's (or the neck's) levels. Some
heads need more from the model or the trainer; each such ability is one Protocol below. A head
class declares an ability by subclassing it (`class MoCoHead(nn.Module, SyncsAcrossRanks,
BindsTrunk, RoutesTask)`), which documents it where a reader looks and lets the type checker
hold it to the signatures. Duck typing still works for plugins written before: a head that has
any member of an ability claims it. Either way `check_head` runs when the model is built
(gppf.models.build) and names the head and the missing method of a half-declared ability,
instead of an AttributeError thousands of steps later on one rank.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TakesBatch(Protocol):
    """`forward(feats, batch)`: the head also reads the batch (detection: targets, image sizes)."""

    takes_batch: bool

    def forward(self, feats: list[torch.Tensor], batch: dict[str, Any] | None) -> Any: ...


@runtime_checkable
class BindsTrunk(Protocol):
    """Handed the trunk once it is built (MoCo's momentum encoder starts as its copy)."""

    def bind_trunk(self, trunk: nn.Module) -> None: ...


@runtime_checkable
class RoutesTask(Protocol):
    """Told, at every forward, whose lego route the trunk ran (composite steps take the target's)."""

    route_task: str


@runtime_checkable
class SyncsAcrossRanks(Protocol):
    """State every rank updates alike (MoCo's queue of keys, its momentum encoder): the head puts
    floats into the step payload, reads every rank's after the allreduce, and updates after the
    optimizer step."""

    def sync_slots(self) -> dict[str, int]: ...

    def sync_put(self) -> dict[str, torch.Tensor]: ...

    def sync_get(self, summed: dict[str, torch.Tensor]) -> None: ...

    def momentum_update(self) -> None: ...


ABILITIES: tuple[type, ...] = (TakesBatch, BindsTrunk, RoutesTask, SyncsAcrossRanks)

# Members by which a duck-typed head claims an ability (`forward` is every module's).
_CLAIMS = {
    TakesBatch: ("takes_batch",),
    BindsTrunk: ("bind_trunk",),
    RoutesTask: ("route_task",),
    SyncsAcrossRanks: ("sync_slots", "sync_put", "sync_get", "momentum_update"),
}
_METHODS = {"forward", "bind_trunk", "sync_slots", "sync_put", "sync_get", "momentum_update"}


def _declared(head: nn.Module, ability: type) -> bool:
    return ability in type(head).__mro__


def claims(head: nn.Module, ability: type) -> bool:
    """Whether `head` has `ability`: declared by subclassing, or claimed by one of its members.
    (`takes_batch = False` is a head that says it does not take the batch.)"""
    if ability is TakesBatch and not getattr(head, "takes_batch", _declared(head, TakesBatch)):
        return False
    return _declared(head, ability) or any(hasattr(head, m) for m in _CLAIMS[ability])


def _missing(head: nn.Module, ability: type) -> list[str]:
    out = []
    for member in _CLAIMS[ability] + (("forward",) if ability is TakesBatch else ()):
        own = getattr(type(head), member, None)
        if member in _METHODS:
            # A method inherited from the Protocol itself is its `...` stub: not implemented.
            if not callable(getattr(head, member, None)) or own is getattr(ability, member, None):
                out.append(f"{member}()")
        elif not hasattr(head, member):
            out.append(member)
    return out


def check_head(task: str, head: nn.Module) -> None:
    """Every ability `head` declares or claims is complete; else a TypeError naming the task, the
    head class, the ability and what it lacks."""
    if not isinstance(head, nn.Module):
        raise TypeError(f"task {task!r}: build_head returned {type(head).__name__}, not a torch.nn.Module")
    for ability in ABILITIES:
        if claims(head, ability):
            missing = _missing(head, ability)
            if missing:
                raise TypeError(
                    f"task {task!r}: head {type(head).__qualname__} has the ability {ability.__name__} "
                    f"(gppf.api.heads) but lacks {', '.join(missing)}"
                )


def abilities(head: nn.Module) -> list[str]:
    """The names of the abilities `head` has (for messages and docs)."""
    return [a.__name__ for a in ABILITIES if claims(head, a)]
