"""The masked allreduce overlapped with backward (gppf.dist.allreduce: start/finish) gives the same
gradients, statistics and weights as the exchange after backward, on 3 gloo ranks that run
different tasks through different hard lego routes with cross-task BN, and sends every bucket
during backward (none waits for finish())."""

from __future__ import annotations

import torch

from gppf.config.job import BackboneConfig, JobConfig, LegoConfig, OptimConfig, TrainConfig
from gppf.dist.local_dist import run_distributed
from gppf.engine.trainer import Trainer
from tests.test_trainer import FixedStream

TASK_OF_RANK = [0, 0, 1]  # task "c" is run by nobody: its head must not be stepped


def _trainer(overlap: str) -> Trainer:
    tasks = {
        name: {"type": "classification", "data_root": "/unused", "num_classes": n, "batch_size": 2}
        for name, n in (("a", 3), ("b", 4), ("c", 5))
    }
    cfg = JobConfig(
        tasks=tasks,
        backbone=BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(mode="hard", tau_start=1.0)),
        optim=OptimConfig(lr=0.05, warmup_steps=0),
        train=TrainConfig(steps=10, bucket_mb=0.05, overlap_allreduce=overlap),  # ~20 buckets
    )
    return Trainer(cfg, torch.device("cpu"))


def _run(rank: int, overlap: str) -> dict:
    t = _trainer(overlap)
    g = torch.Generator().manual_seed(rank)
    for task in t.tasks:
        n = task.cfg.num_classes
        image, label = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, n, (2,), generator=g)
        t.streams[task.name] = FixedStream({"image": image, "label": label})
    t.task_at = lambda step: TASK_OF_RANK[rank]
    grads, sent_in_backward = [], []
    finish, step = t.reducer.finish, t.optimizer.step

    def finish_and_count():
        sent_in_backward.append(t.reducer.sent)
        return finish()

    def step_and_record(*a, **k):
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in t.model.named_parameters()})
        return step(*a, **k)

    t.reducer.finish, t.optimizer.step = finish_and_count, step_and_record
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    stats = [t.train_step().stats for _ in range(2)]
    return {
        "grads": grads,
        "stats": stats,
        "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
        "before": before,
        "buffers": {n: b.clone() for n, b in t.model.named_buffers()},
        "routes": [list(layer.executed) for layer in t.model.backbone.layers],
        "sent_in_backward": sent_in_backward,
        "buckets": len(t.reducer.buckets),
    }


def _rank_fn(rank: int, world: int) -> dict:
    return {"overlap": _run(rank, "on"), "after": _run(rank, "off")}


def test_overlapped_masked_allreduce_equals_the_exchange_after_backward():
    results = run_distributed(_rank_fn, 3, timeout=300)
    routes = [res["overlap"]["routes"] for res in results]
    assert len({str(r) for r in routes}) > 1, "the ranks should follow different hard routes"
    for res in results:
        ov, ref = res["overlap"], res["after"]
        assert ov["buckets"] > 10
        assert ov["sent_in_backward"] == [ov["buckets"]] * 2, "every bucket should go out during backward"
        assert ov["routes"] == ref["routes"]
        for s_ov, s_ref in zip(ov["stats"], ref["stats"]):
            torch.testing.assert_close(s_ov, s_ref, atol=1e-6, rtol=0)
        for g_ov, g_ref in zip(ov["grads"], ref["grads"]):
            assert g_ov.keys() == g_ref.keys()
            for name in g_ov:
                assert (g_ov[name] is None) == (g_ref[name] is None), name
                if g_ov[name] is not None:
                    torch.testing.assert_close(g_ov[name], g_ref[name], atol=1e-6, rtol=0, msg=name)
        for kind in ("params", "buffers"):
            for name, v in ov[kind].items():
                torch.testing.assert_close(v, ref[kind][name], atol=1e-6, rtol=0, msg=f"{kind} {name}")
        # Nobody ran task c: its head has no gradient and is bit-identical after two steps.
        assert all(g["heads.c.fc.weight"] is None for g in ov["grads"])
        for name, v in ov["params"].items():
            if name.startswith("heads.c."):
                assert torch.equal(v, ov["before"][name]), name
        assert results[0]["overlap"]["params"].keys() == ov["params"].keys()
        for name, v in ov["params"].items():  # every rank holds the same weights
            torch.testing.assert_close(v, results[0]["overlap"]["params"][name], atol=0, rtol=0, msg=name)
