"""Gradient checkpointing with the lego backbone (GPPF App. D.1's "Model Checkpoint"): on 3 gloo
ranks running different tasks, under hard routes (a different unit per rank) and soft routes,
with cross-task BN, the checkpointed trunk gives the same features, gradients (controller logits
included) and BN running statistics as the plain one, recomputes in backward, and keeps fewer
activations for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from gppf.api.trunk import StepState
from gppf.config.job import LegoConfig
from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.dist.local_dist import run_distributed
from gppf.models.lego import LegoResNet

TASKS = ["a", "b", "c"]  # rank r runs task r
BATCH = [3, 2, 4]
MODES = ("hard", "soft")


def _model(mode: str) -> LegoResNet:
    torch.manual_seed(0)
    model = LegoResNet("resnet10t", TASKS, LegoConfig(num_units=2, mode=mode))
    CrossTaskBatchNorm2d.convert(model)
    with torch.no_grad():  # routes: a all unit 0, b all unit 1, c alternating
        layers = len(model.layers)
        for t, units in zip(TASKS, ([0] * layers, [1] * layers, [i % 2 for i in range(layers)])):
            logits = torch.full((layers, 2), -20.0)
            logits[torch.arange(layers), torch.tensor(units)] = 20.0
            model.controller.logits[t].copy_(logits)
    return model.double().train()


def _step(model: LegoResNet, rank: int) -> dict:
    model.set_step(StepState(seed=0, step=3, rank=rank, tau_step=0, tau_total=10))
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(BATCH[rank], 3, 64, 64, generator=g, dtype=torch.float64)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # activations kept for backward, parameters excluded
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = model(x, TASKS[rank])
    weights = [torch.randn(f.shape, generator=g, dtype=torch.float64) for f in feats]
    sum((f * w).sum() for f, w in zip(feats, weights)).backward()
    return {
        "feats": [f.detach() for f in feats],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "stats": {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n},
        "executed": [list(layer.executed) for layer in model.layers],
        "saved_mb": sum(saved.values()) / 2**20,
    }


def _rank_fn(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for mode in MODES:
        plain = _model(mode)
        init = {n: b.clone() for n, b in plain.named_buffers() if "running" in n or "num_batches" in n}
        ckpt = copy.deepcopy(plain)
        ckpt.set_grad_checkpointing(True)
        calls = [0]
        ckpt.layers[2].units[0].bn1.register_forward_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
        out[mode] = {
            "plain": _step(plain, rank),
            "ckpt": _step(ckpt, rank),
            "bn_calls": calls[0],
            "init": init,
        }
    return out


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    return run_distributed(_rank_fn, 3, timeout=240)


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_lego_equals_plain_on_three_ranks(three_ranks, mode):
    results = [r[mode] for r in three_ranks]
    for rank, res in enumerate(results):
        plain, ckpt = res["plain"], res["ckpt"]
        # Ranks really took different units (hard), and the recompute did not count as a run.
        assert ckpt["executed"] == plain["executed"]
        ran_unit0 = res["bn_calls"] > 0
        if mode == "hard":
            assert ran_unit0 == (rank in (0, 2))  # layer 2: a and c take unit 0 there, b unit 1
        # Layer 2 unit 0's BN ran in forward and again in the recompute.
        assert res["bn_calls"] in ((2,) if ran_unit0 else (0,))
        for fp, fc in zip(plain["feats"], ckpt["feats"]):
            torch.testing.assert_close(fc, fp, atol=1e-6, rtol=1e-6)
        assert ckpt["grads"].keys() == plain["grads"].keys()
        assert any("controller" in n for n in plain["grads"])
        for n in plain["grads"]:
            torch.testing.assert_close(ckpt["grads"][n], plain["grads"][n], atol=1e-6, rtol=1e-6, msg=n)
        # Running statistics moved once (not again in the recompute), the same on every rank.
        init = res["init"]
        moved = [n for n in plain["stats"] if not torch.equal(plain["stats"][n], init[n])]
        assert moved, "the step did not update any running statistic"
        for n in plain["stats"]:
            torch.testing.assert_close(ckpt["stats"][n], plain["stats"][n], atol=1e-6, rtol=1e-6, msg=n)
            torch.testing.assert_close(ckpt["stats"][n], results[0]["ckpt"]["stats"][n], atol=1e-12, rtol=0)
        assert ckpt["saved_mb"] < 0.6 * plain["saved_mb"], (ckpt["saved_mb"], plain["saved_mb"])
