"""Cross-task BN on 3 gloo processes equals one BN over the union of their batches."""

from __future__ import annotations

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
