"""Masked allreduce on 3 gloo processes running different tasks."""

from __future__ import annotations

import torch
from torch import nn

from gppf.dist.allreduce import MaskedAllReduce
from gppf.dist.local_dist import run_distributed

# rank -> task it runs this step. Head "a" is used by ranks 0 and 1, "b" by rank 2, "c" by nobody.
TASKS = ["a", "a", "b"]


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"shared": nn.Linear(4, 3), "a": nn.Linear(3, 2), "b": nn.Linear(3, 2), "c": nn.Linear(3, 2)}
    )


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2 + rank, 4, generator=g)  # different batch sizes per rank


def _local_grads(rank: int) -> dict[str, torch.Tensor]:
    m = _model()
    m[TASKS[rank]](torch.relu(m["shared"](_batch(rank)))).square().sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _rank_fn(rank: int, world: int):
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    reducer = MaskedAllReduce(list(m.parameters()), bucket_mb=0.0001)  # several buckets
    # Two steps, so momentum buffers exist for the used parameters and not for "c".
    out = {}
    for step in range(2):
        m[TASKS[rank]](torch.relu(m["shared"](_batch(rank)))).square().sum().backward()
        extra, counts = reducer.reduce(torch.tensor([float(rank)]))
        if step == 0:
            out["grads"] = {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}
            out["counts"] = counts.tolist()
            out["extra"] = extra.tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["after"] = {n: p.detach().clone() for n, p in m.named_parameters()}
    out["before"] = before
    out["n_buckets"] = len(reducer.buckets)
    return out


def test_masked_allreduce_task_average():
    results = run_distributed(_rank_fn, 3)
    local = [_local_grads(r) for r in range(3)]
    ref = {}
    for name in _model().state_dict():
        used = [g[name] for g in local if name in g]
        ref[name] = sum(used) / len(used) if used else None
    for res in results:
        assert res["n_buckets"] > 1
        assert res["extra"] == [3.0]  # 0 + 1 + 2
        for name, g in res["grads"].items():
            if ref[name] is None:
                assert g is None, name
            else:
                torch.testing.assert_close(g, ref[name], atol=1e-6, rtol=0)
    # Head "b" was used by 1 of 3 workers: it gets that worker's full gradient, not a third of it.
    torch.testing.assert_close(results[0]["grads"]["b.weight"], local[2]["b.weight"], atol=1e-6, rtol=0)
    # Shared layer: used by all three -> plain mean.
    torch.testing.assert_close(
        results[1]["grads"]["shared.weight"], sum(g["shared.weight"] for g in local) / 3, atol=1e-6, rtol=0
    )
    # Nobody used "c": bit-identical after two SGD steps with momentum and weight decay.
    for res in results:
        for name in ("c.weight", "c.bias"):
            assert torch.equal(res["after"][name], res["before"][name])
        assert not torch.equal(res["after"]["a.weight"], res["before"]["a.weight"])
    # Every rank ends with the same weights.
    for name in results[0]["after"]:
        assert torch.equal(results[0]["after"][name], results[2]["after"][name])
