"""3 gloo ranks follow different hard routes through the same lego layers: no hang, and BN
statistics and gradients equal a single-process reference per unit."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.dist.local_dist import run_distributed
from gppf.models.lego import LegoLayer

ROUTES = [0, 1, 0]  # rank -> unit it runs
BATCH = [3, 2, 4]


def _unit(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).double()


def _data(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(BATCH[rank], 3, 5, 5, generator=g, dtype=torch.float64)
    gy = torch.randn(BATCH[rank], 4, 5, 5, generator=g, dtype=torch.float64)
    return x, gy


def _rank_fn(rank: int, world: int):
    layer = LegoLayer([_unit(0), _unit(1)])
    CrossTaskBatchNorm2d.convert(layer)
    x, gy = _data(rank)
    x.requires_grad_(True)
    w = torch.zeros(2, dtype=torch.float64)
    w[ROUTES[rank]] = 1.0
    w.requires_grad_(True)
    y = layer(x, w, hard=True)
    (y * gy).sum().backward()
    return {
        "y": y.detach(),
        "gx": x.grad,
        "executed": list(layer.executed),
        "grads": {n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
        "stats": {n: b.clone() for n, b in layer.named_buffers() if "running" in n},
    }


def test_hard_routes_sync_per_unit():
    results = run_distributed(_rank_fn, 3, timeout=90)
    for r, res in enumerate(results):
        assert res["executed"] == [int(ROUTES[r] == 0), int(ROUTES[r] == 1)]
    for k in (0, 1):
        ranks = [r for r in range(3) if ROUTES[r] == k]
        ref = _unit(k)
        ref.train()
        xs, gys = zip(*[_data(r) for r in ranks])
        x = torch.cat(xs).requires_grad_(True)
        y = ref(x)
        (y * torch.cat(gys)).sum().backward()
        start = 0
        for r in ranks:
            n = BATCH[r]
            torch.testing.assert_close(results[r]["y"], y[start : start + n].detach(), atol=1e-10, rtol=1e-9)
            torch.testing.assert_close(results[r]["gx"], x.grad[start : start + n], atol=1e-10, rtol=1e-9)
            start += n
        for name, p in ref.named_parameters():
            total = sum(results[r]["grads"][f"units.{k}.{name}"] for r in ranks)
            torch.testing.assert_close(total, p.grad, atol=1e-10, rtol=1e-9)
        for name, b in ref.named_buffers():
            if "running" in name:
                for r in range(3):  # every rank holds the same statistics for unit k
                    torch.testing.assert_close(
                        results[r]["stats"][f"units.{k}.{name}"], b, atol=1e-12, rtol=1e-10
                    )
        # Ranks that did not run unit k have no gradient for it (the masked allreduce skips them).
        for r in range(3):
            if r not in ranks:
                assert not any(n.startswith(f"units.{k}.") for n in results[r]["grads"])


def test_reference_is_not_trivially_equal():
    # The per-unit references differ from one BN over all three batches.
    a = copy.deepcopy(_unit(0)).train()
    xs = [_data(r)[0] for r in range(3)]
    all_three = a(torch.cat(xs))[:3]
    b = copy.deepcopy(_unit(0)).train()
    only_routed = b(torch.cat([xs[0], xs[2]]))[:3]
    assert not torch.allclose(all_three, only_routed)


# Two stacked lego layers; every rank takes a different route: (0, 1), (1, 1), (0, 0).
ROUTES2 = [(0, 1), (1, 1), (0, 0)]


def _unit2(layer: int, unit: int) -> nn.Sequential:
    torch.manual_seed(100 * layer + unit)
    c_in = 3 if layer == 0 else 4
    return nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()


def _rank_fn_two_layers(rank: int, world: int):
    layers = [LegoLayer([_unit2(j, 0), _unit2(j, 1)]) for j in range(2)]
    for layer in layers:
        CrossTaskBatchNorm2d.convert(layer)
    x, gy = _data(rank)
    x.requires_grad_(True)
    h = x
    for j, layer in enumerate(layers):
        w = torch.zeros(2, dtype=torch.float64)
        w[ROUTES2[rank][j]] = 1.0
        h = layer(h, w.requires_grad_(True), hard=True)
    (h * gy).sum().backward()
    return {
        "y": h.detach(),
        "gx": x.grad,
        "grads": {
            f"{j}.{n}": p.grad
            for j, m in enumerate(layers)
            for n, p in m.named_parameters()
            if p.grad is not None
        },
        "stats": {
            f"{j}.{n}": b.clone()
            for j, m in enumerate(layers)
            for n, b in m.named_buffers()
            if "running" in n
        },
    }


def test_three_ranks_on_three_different_routes():
    results = run_distributed(_rank_fn_two_layers, 3, timeout=90)
    refs = [[_unit2(j, k).train() for k in range(2)] for j in range(2)]
    xs, gys = zip(*[_data(r) for r in range(3)])
    leaves = [x.clone().requires_grad_(True) for x in xs]
    h = list(leaves)
    for j in range(2):  # each unit runs once on the union of the batches of the ranks routed to it
        out = [None] * 3
        for k in range(2):
            ranks = [r for r in range(3) if ROUTES2[r][j] == k]
            if not ranks:
                continue
            y = refs[j][k](torch.cat([h[r] for r in ranks]))
            for r, part in zip(ranks, torch.split(y, [BATCH[r] for r in ranks])):
                out[r] = part
        h = out
    sum((h[r] * gys[r]).sum() for r in range(3)).backward()
    for r in range(3):
        torch.testing.assert_close(results[r]["y"], h[r].detach(), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(results[r]["gx"], leaves[r].grad, atol=1e-10, rtol=1e-9)
    for j in range(2):
        for k in range(2):
            ranks = [r for r in range(3) if ROUTES2[r][j] == k]
            for name, p in refs[j][k].named_parameters():
                key = f"{j}.units.{k}.{name}"
                total = sum(results[r]["grads"][key] for r in ranks)
                torch.testing.assert_close(total, p.grad, atol=1e-10, rtol=1e-9)
            for name, b in refs[j][k].named_buffers():
                if "running" in name:
                    for r in range(3):
                        torch.testing.assert_close(
                            results[r]["stats"][f"{j}.units.{k}.{name}"], b, atol=1e-12, rtol=1e-10
                        )
