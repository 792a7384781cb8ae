"""Masked allreduce: each parameter's gradient averaged over the workers that used it (GPPF §3.2).

    grad_p = sum_{workers i that used p} g_i[p] / N_p

A head used by 1 of 8 workers gets that worker's full gradient (DDP would give it 1/8); a
parameter nobody used gets `grad = None`, so the optimizer leaves it, its momentum and its weight
decay alone. The use counts travel in the same buckets as the gradients (one extra float per
parameter), plus a small vector of per-step statistics that every worker wants anyway (loss per
task, NaN flags), so a step costs one collective per bucket and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Bucket:
    params: list[nn.Parameter]
    numel: int


def make_buckets(params: list[nn.Parameter], bucket_mb: float = 25.0) -> list[Bucket]:
    """Group parameters (in a fixed order, identical on every rank) into ~bucket_mb buckets."""
    limit = int(bucket_mb * 1024 * 1024 / 4)
    buckets: list[Bucket] = []
    cur: list[nn.Parameter] = []
    size = 0
    for p in params:
        if cur and size + p.numel() > limit:
            buckets.append(Bucket(cur, size))
            cur, size = [], 0
        cur.append(p)
        size += p.numel()
    if cur:
        buckets.append(Bucket(cur, size))
    return buckets


class MaskedAllReduce:
    """Reusable reducer over a fixed parameter list.

    `reduce(extra)` all-reduces the gradients, the per-parameter use counts and `extra` (a small
    float vector summed across workers, returned). A parameter counts as used on a worker when its
    `.grad` is not None after backward.
    """

    def __init__(self, params: list[nn.Parameter], bucket_mb: float = 25.0, group=None):
        self.params = [p for p in params if p.requires_grad]
        self.buckets = make_buckets(self.params, bucket_mb)
        self.group = group

    def reduce(self, extra: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns (extra summed over workers, per-parameter use counts N_p).

        Afterwards each used parameter's `.grad` is a view into its bucket's reduced buffer (no copy
        back); `zero_grad(set_to_none=True)` releases it before the next step.
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        counts_all = []
        extra_out = None
        for i, bucket in enumerate(self.buckets):
            device = bucket.params[0].device
            parts = [
                p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
                for p in bucket.params
            ]
            flags = [0.0 if p.grad is None else 1.0 for p in bucket.params]
            parts.append(torch.tensor(flags, device=device))
            if i == 0 and extra is not None:
                parts.append(extra.reshape(-1).float())
            flat = torch.cat(parts)  # one copy in, like DDP's bucket
            if distributed:
                dist.all_reduce(flat, group=self.group)
            n_params = len(bucket.params)
            counts = flat[bucket.numel : bucket.numel + n_params]
            counts_all.append(counts)
            if i == 0 and extra is not None:
                extra_out = flat[bucket.numel + n_params :]
            self._scatter(bucket, flat, counts.tolist())  # one host sync per bucket
        if extra is not None and not self.buckets:
            extra_out = extra.float().clone()
            if distributed:
                dist.all_reduce(extra_out, group=self.group)
        counts = torch.cat(counts_all) if counts_all else torch.zeros(0)
        return extra_out, counts

    @staticmethod
    def _scatter(bucket: Bucket, flat: torch.Tensor, counts: list[float]) -> None:
        # Divide runs of neighbouring parameters with the same count in one op (the backbone is
        # one long run with count = world size), then hand out views.
        start, offset = 0, 0
        run_count, run_start = None, 0
        for p, c in zip(bucket.params, counts):
            if c != run_count:
                if run_count and run_count != 1.0:
                    flat[run_start:offset].div_(run_count)
                run_count, run_start = c, offset
            offset += p.numel()
        if run_count and run_count != 1.0:
            flat[run_start:offset].div_(run_count)
        for p, c in zip(bucket.params, counts):
            n = p.numel()
            p.grad = flat[start : start + n].view_as(p).to(p.dtype) if c > 0 else None
            start += n
