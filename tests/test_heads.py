"""A head's optional abilities (gppf.api.heads) are checked when the model is built: a head that
has part of an ability fails there, with an error naming the task, the head and what it lacks;
the bundled heads declare theirs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gppf.api.heads import BindsTrunk, SyncsAcrossRanks, TakesBatch, abilities, check_head
from gppf.api.task import Task
from gppf.config.job import BackboneConfig, JobConfig
from gppf.config.task import TaskConfig
from gppf.models.build import build_model


class HalfSynced(nn.Module, SyncsAcrossRanks):
    """Declares SyncsAcrossRanks but implements only sync_slots."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def sync_slots(self) -> dict[str, int]:
        return {"keys": 4}

    def forward(self, feats):
        return self.fc(feats[-1].mean((2, 3)))


class DuckTyped(nn.Module):
    """Has `bind_trunk` (claims BindsTrunk by duck typing) and a complete TakesBatch."""

    takes_batch = True

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 1)
        self.trunk = None

    def bind_trunk(self, trunk: nn.Module) -> None:
        object.__setattr__(self, "trunk", trunk)

    def forward(self, feats, batch):
        return self.fc(feats[-1].mean((2, 3)))


class _Task(Task):
    head_cls: type = HalfSynced

    def build_head(self, features):
        return self.head_cls(features[-1].channels)


def _build(head_cls: type):
    task = _Task("probe", TaskConfig(batch_size=2))
    task.head_cls = head_cls
    cfg = JobConfig(tasks={"probe": {"type": "x"}}, backbone=BackboneConfig(name="resnet10t"))
    return build_model(cfg, [task])


def test_a_half_declared_ability_fails_at_build_naming_head_and_methods():
    with pytest.raises(TypeError, match=r"task 'probe': head HalfSynced has the ability SyncsAcrossRanks"):
        _build(HalfSynced)
    with pytest.raises(TypeError, match=r"lacks sync_put\(\), sync_get\(\), momentum_update\(\)"):
        _build(HalfSynced)


def test_a_complete_duck_typed_head_builds_and_is_bound_to_the_trunk():
    model = _build(DuckTyped)
    head = model.heads["probe"]
    assert head.trunk is model.backbone  # BindsTrunk: handed the trunk once it was built
    assert abilities(head) == ["TakesBatch", "BindsTrunk"]
    out, _ = model(torch.zeros(2, 3, 32, 32), "probe", {})  # TakesBatch: forward(feats, batch)
    assert out.shape == (2, 1)


def test_bundled_heads_declare_their_abilities():
    from task_plugins.detection.rcnn import RCNNHead
    from task_plugins.multihead import MultiHead
    from task_plugins.ssl.moco import MoCoHead

    # Declared by subclassing (Protocols with data members refuse issubclass: the MRO says it).
    assert TakesBatch in RCNNHead.__mro__ and TakesBatch in MultiHead.__mro__
    assert SyncsAcrossRanks in MoCoHead.__mro__ and BindsTrunk in MoCoHead.__mro__


def test_not_a_module():
    with pytest.raises(TypeError, match="task 't': build_head returned int"):
        check_head("t", 3)
