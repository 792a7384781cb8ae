"""`Trainer.train_step` reads the device from the host once per step (the masked allreduce's use
counts and the step payload, in one copy), so the CPU can run ahead of a GPU. Counted on the CPU
by gppf.tools.host_syncs.HostSyncs, a dispatch mode that records the operations which, on a GPU,
wait for it: scalar reads (`.item()`, `bool(t)`, `float(t)`), data-dependent shapes (boolean
indexing, `nonzero`, `masked_select`, `unique`) and copies to the host (`Tensor.cpu`,
`Tensor.tolist`; `numpy()` only ever reads a host tensor). On 2 gloo ranks: a static trunk and a
soft lego trunk read once; hard lego routes once more, for the units the sampled route runs (all
layers in one read)."""

from __future__ import annotations

import pytest
import torch

from gppf.config.job import BackboneConfig, JobConfig, LegoConfig, OptimConfig, TrainConfig
from gppf.dist.local_dist import run_distributed
from gppf.engine.trainer import Trainer
from gppf.tools.host_syncs import HostSyncs
from tests.test_trainer import FixedStream


def _trainer(kind: str, mode: str = "hard") -> Trainer:
    tasks = {
        name: {"type": "classification", "data_root": "/unused", "num_classes": n, "batch_size": 2}
        for name, n in (("a", 3), ("b", 4))
    }
    lego = LegoConfig(mode=mode, tau_start=1.0)
    cfg = JobConfig(
        tasks=tasks,
        backbone=BackboneConfig(name="resnet10t", kind=kind, lego=lego),
        optim=OptimConfig(lr=0.05, warmup_steps=0),
        train=TrainConfig(steps=10),
    )
    return Trainer(cfg, torch.device("cpu"))


def _count(rank: int, world: int, kind: str, mode: str) -> list[list[str]]:
    t = _trainer(kind, mode)
    g = torch.Generator().manual_seed(rank)
    for task in t.tasks:
        image = torch.randn(2, 3, 32, 32, generator=g)
        t.streams[task.name] = FixedStream({"image": image, "label": torch.randint(0, 3, (2,), generator=g)})
    t.train_step()  # the first step builds lazy state (optimizer buffers, payload)
    out = []
    for _ in range(2):
        with HostSyncs() as syncs:
            t.train_step()
        out.append(syncs.events)
    return out


@pytest.mark.parametrize(
    "kind, mode, expected",
    [
        ("static", "soft", ["Tensor.cpu"]),
        ("lego", "soft", ["Tensor.cpu"]),
        ("lego", "hard", ["Tensor.tolist", "Tensor.cpu"]),  # the route's units, then the step's copy
    ],
)
def test_train_step_reads_the_device_once(kind, mode, expected):
    for rank, steps in enumerate(run_distributed(_count, 2, kind, mode)):
        for events in steps:
            assert events == expected, (kind, mode, rank, events)


def test_the_counter_sees_what_syncs():
    x = torch.randn(6)
    with HostSyncs() as syncs:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        x.cpu()
        x.nonzero()
    assert syncs.events == [
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten.index.Tensor",
        "Tensor.cpu",
        "aten.nonzero.default",
    ]
