"""Cross-task BN on 3 gloo processes equals one BN over the union of their batches."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.dist.local_dist import run_distributed

C = 5
# Different batch sizes, different spatial sizes, and one empty batch.
SHAPES = [(4, C, 6, 7), (2, C, 9, 5), (0, C, 8, 8)]


def _inputs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*s, generator=g, dtype=torch.float64) * 3 + 1 for s in SHAPES]
    gys = [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]
    return xs, gys


def _bn() -> CrossTaskBatchNorm2d:
    bn = CrossTaskBatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, C))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return bn


def _rank_fn(rank: int, world: int):
    xs, gys = _inputs()
    bn = _bn()
    x = xs[rank].clone().requires_grad_(True)
    y = bn(x)
    (y * gys[rank]).sum().backward()
    return {
        "y": y.detach(),
        "gx": x.grad,
        "gw": bn.weight.grad,
        "gb": bn.bias.grad,
        "rm": bn.running_mean.clone(),
        "rv": bn.running_var.clone(),
    }


def _reference():
    """Single-process BN over the union: flatten each batch to [C, N*H*W] and concatenate."""
    xs, gys = _inputs()
    bn = _bn()
    leaves = [x.clone().requires_grad_(True) for x in xs]
    flat = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in leaves], 1)[None]  # [1, C, L]
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = F.batch_norm(flat, rm, rv, bn.weight, bn.bias, training=True, momentum=0.1, eps=bn.eps)
    gflat = torch.cat([g.transpose(0, 1).reshape(C, -1) for g in gys], 1)[None]
    (y * gflat).sum().backward()
    outs, start = [], 0
    for x in xs:
        n = x.numel() // C
        outs.append(y[0, :, start : start + n].reshape(C, x.shape[0], *x.shape[2:]).transpose(0, 1))
        start += n
    return outs, [x.grad for x in leaves], bn.weight.grad, bn.bias.grad, rm, rv


def test_cross_task_bn_matches_union_of_batches():
    results = run_distributed(_rank_fn, 3)
    y_ref, gx_ref, gw_ref, gb_ref, rm_ref, rv_ref = _reference()
    for r, res in enumerate(results):
        assert res["y"].shape == SHAPES[r]
        torch.testing.assert_close(res["y"], y_ref[r].detach(), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(res["gx"], gx_ref[r], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(res["rm"], rm_ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(res["rv"], rv_ref, atol=1e-12, rtol=1e-10)
    # Parameter gradients are per-rank partial sums (the masked allreduce adds them up).
    torch.testing.assert_close(sum(r["gw"] for r in results), gw_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(sum(r["gb"] for r in results), gb_ref, atol=1e-10, rtol=1e-9)
    assert results[2]["gx"].numel() == 0


def test_single_process_equals_torch_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    ours, ref = CrossTaskBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_convert_keeps_weights_and_stats():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        m[1].weight.fill_(2.0)
        m[1].running_mean.fill_(0.5)
    CrossTaskBatchNorm2d.convert(m)
    assert isinstance(m[1], CrossTaskBatchNorm2d)
    assert torch.all(m[1].weight == 2.0) and torch.all(m[1].running_mean == 0.5)


# |mean| / std of the activations: E[x²] - E[x]² of float32 sums lost 9.6e-2 of the variance at 1000.
OFFSETS = (0.0, 100.0, 1000.0)
UNITS = 2  # hard routes: rank r runs unit r % 2 of a two-unit lego layer


def _offset_inputs(offset: float):
    """float32 activations with |mean|/std = offset (std 1): different batch and spatial sizes."""
    g = torch.Generator().manual_seed(1)
    shapes = SHAPES[:2] + [(3, C, 5, 6)]
    xs = [(torch.randn(*s, generator=g, dtype=torch.float64) + offset).float() for s in shapes]
    gys = [torch.randn(*s, generator=g, dtype=torch.float64).float() for s in shapes]
    return xs, gys


def _offset_rank_fn(rank: int, world: int, routed: bool):
    return {offset: _offset_rank(rank, offset, routed) for offset in OFFSETS}


def _offset_rank(rank: int, offset: float, routed: bool):
    from gppf.dist.cross_bn import unit_slot

    xs, gys = _offset_inputs(offset)
    bns = [_bn().float() for _ in range(UNITS)] if routed else [_bn().float()]
    for bn in bns:
        bn.siblings = bns if routed else []
    unit = rank % UNITS if routed else 0
    x = xs[rank].clone().requires_grad_(True)
    if routed:
        with unit_slot(UNITS, unit):
            y = bns[unit](x)
    else:
        y = bns[0](x)
    (y * gys[rank]).sum().backward()
    bn = bns[unit]
    return {"y": y.detach(), "gx": x.grad, "gw": bn.weight.grad, "rm": bn.running_mean, "rv": bn.running_var}


def _offset_reference(offset: float, ranks: list[int]):
    """torch's batch_norm over the union of `ranks`' pixels, in float64 (the exact values)."""
    xs, gys = _offset_inputs(offset)
    bn = _bn()
    leaves = [xs[r].double().requires_grad_(True) for r in ranks]
    flat = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in leaves], 1)[None]
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = F.batch_norm(flat, rm, rv, bn.weight, bn.bias, training=True, momentum=0.1, eps=bn.eps)
    gflat = torch.cat([gys[r].double().transpose(0, 1).reshape(C, -1) for r in ranks], 1)[None]
    (y * gflat).sum().backward()
    outs, start = {}, 0
    for r, x in zip(ranks, leaves):
        k = x.numel() // C
        outs[r] = y[0, :, start : start + k].reshape(C, x.shape[0], *x.shape[2:]).transpose(0, 1).detach()
        start += k
    return outs, {r: x.grad for r, x in zip(ranks, leaves)}, bn.weight.grad, rm, rv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("routed", [False, True], ids=["plain", "hard_routes"])
def test_cross_task_bn_is_exact_at_large_activation_means(routed):
    """float32 cross-task BN on 3 ranks against torch's BN over the union of the ranks' pixels
    (the ranks that ran the same unit, under hard routes): outputs, input and weight gradients and
    running statistics within 1e-5 relative, whatever the activations' mean."""
    by_rank = run_distributed(_offset_rank_fn, 3, routed)
    for offset in OFFSETS:
        results = [r[offset] for r in by_rank]
        groups = [[0, 2], [1]] if routed else [[0, 1, 2]]
        for ranks in groups:
            y_ref, gx_ref, gw_ref, rm_ref, rv_ref = _offset_reference(offset, ranks)
            for r in ranks:
                res = results[r]
                for key, got, ref in (("y", res["y"], y_ref[r]), ("gx", res["gx"], gx_ref[r])):
                    assert _rel(got, ref) <= 1e-5, (offset, routed, r, key, _rel(got, ref))
                assert _rel(res["rm"], rm_ref) <= 1e-5, (offset, routed, r, "rm", _rel(res["rm"], rm_ref))
                assert _rel(res["rv"], rv_ref) <= 1e-5, (offset, routed, r, "rv", _rel(res["rv"], rv_ref))
            gw = sum(results[r]["gw"] for r in ranks)  # per-rank partial sums: the masked allreduce adds them
            assert _rel(gw, gw_ref) <= 1e-5, (offset, routed, "gw", _rel(gw, gw_ref))


def test_precision_benchmark_runs():
    """benchmarks/bn_precision.py, whose figures docs/benchmarks.md shows."""
    from benchmarks.bn_precision import OFFSETS, relative_errors

    errors = relative_errors()
    assert set(errors) == set(OFFSETS) and max(errors.values()) <= 1e-6, errors
