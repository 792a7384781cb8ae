"""Masked allreduce: each parameter's gradient averaged over the workers that used it (GPPF §3.2).

    grad_p = sum_{workers i that used p} g_i[p] / N_p

A head used by 1 of 8 workers gets that worker's full gradient (DDP would give it 1/8); a
parameter nobody used gets `grad = None`, so the optimizer leaves it, its momentum and its weight
decay alone. The use counts travel in the same buckets as the gradients (one extra float per
parameter), plus a small vector of per-step statistics that every worker wants anyway (loss per
task, NaN flags), so a step costs one collective per bucket and nothing more.

Overlap with backward (as DDP does): `start(loss, extra)` after forward walks the autograd graph
once to learn which parameters this rank's backward will reach (other tasks' heads and the lego
units its hard route skipped are not); a post-accumulate-grad hook counts each reached
parameter's gradient in, and a bucket is sent (asynchronously) as soon as all its reached
parameters are final. Buckets are in reverse parameter order (roughly the order backward finishes
them) and are always sent in that order, on every rank: a bucket whose parameters this rank does
not use is ready at once and never holds the others back. `finish()` after backward sends what is
left, waits, and divides. `reduce(extra)` is the same exchange after backward, without overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Bucket:
    params: list[nn.Parameter]
    numel: int


def make_buckets(
    params: list[nn.Parameter], bucket_mb: float = 25.0, first_mb: float | None = None
) -> list[Bucket]:
    """Group parameters (in a fixed order, identical on every rank) into ~bucket_mb buckets, the
    first of them ~first_mb (DDP's is 1 MB, so that communication starts early in backward)."""
    buckets: list[Bucket] = []
    cur: list[nn.Parameter] = []
    size = 0
    for p in params:
        mb = first_mb if first_mb is not None and not buckets else bucket_mb
        if cur and size + p.numel() > int(mb * 1024 * 1024 / 4):
            buckets.append(Bucket(cur, size))
            cur, size = [], 0
        cur.append(p)
        size += p.numel()
    if cur:
        buckets.append(Bucket(cur, size))
    return buckets


def reached_parameters(roots: Sequence[torch.Tensor]) -> set[int]:
    """ids of the leaf tensors a backward from `roots` accumulates into (DDP's unused-parameter
    search: a walk over the autograd graph's AccumulateGrad nodes)."""
    seen: set = set()
    found: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)
        if leaf is not None:
            found.add(id(leaf))
            continue
        stack.extend(f for f, _ in fn.next_functions if f is not None and f not in seen)
    return found


class MaskedAllReduce:
    """Reusable reducer over a fixed parameter list (`close()` it when it is replaced: with
    `overlap` it holds a hook on every parameter).

    A parameter counts as used on a worker when its `.grad` is not None after backward. The
    extra vector rides in the last bucket sent (the one backward finishes last)."""

    def __init__(
        self, params: list[nn.Parameter], bucket_mb: float = 25.0, group=None, overlap: bool = False
    ):
        self.params = [p for p in params if p.requires_grad]
        # Backward meets the last parameters first; with overlap, a small first bucket starts the
        # communication early.
        self.buckets = make_buckets(self.params[::-1], bucket_mb, min(1.0, bucket_mb) if overlap else None)
        self.group = group
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self.hooks = (
            [p.register_post_accumulate_grad_hook(self._arrived) for p in self.params] if overlap else []
        )
        self.armed = False
        self.error = ""
        self.buffers: dict[int, torch.Tensor] = {}
        self.host_extra: torch.Tensor | None = None  # the last step's extra vector, on the host

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # -- one step -------------------------------------------------------------------------------
    def start(self, loss: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """After forward, before `loss.backward()`: arm the hooks for this step's backward."""
        if not self.hooks:
            raise RuntimeError("MaskedAllReduce.start needs overlap=True")
        reached = reached_parameters([loss])
        self.pending = [sum(id(p) in reached for p in b.params) for b in self.buckets]
        self._begin(extra)
        self.armed = True
        self._send_ready()  # buckets this rank does not use at all go now

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """After backward: send what is left (a reached parameter whose gradient never came is
        unused), wait, divide. Returns (extra summed over workers, per-parameter use counts N_p);
        each used parameter's `.grad` is then a view into its bucket's reduced buffer (no copy
        back); `zero_grad(set_to_none=True)` releases it before the next step."""
        self.armed = False
        while self.sent < len(self.buckets):
            self._send(self.sent)
        out = self._complete()  # every rank completes the same collectives, even on the error below
        if self.error:
            raise RuntimeError(self.error)
        return out

    def reduce(self, extra: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The whole exchange after backward (no overlap). Same results as start/finish."""
        self._begin(extra)
        return self.finish()

    # -- internals ------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _begin(self, extra: torch.Tensor | None) -> None:
        self.world = dist.get_world_size(self.group) if self._distributed() else 1
        self.extra = extra
        self.sent = 0
        self.flats: list[torch.Tensor] = []
        self.works: list = []
        self.error = ""

    def _arrived(self, p: torch.Tensor) -> None:
        if not self.armed:  # a backward outside a training step (the planner, a test)
            return
        i = self.where[id(p)]
        if i < self.sent:  # cannot happen when the graph walk is right; never send a stale bucket
            self.error = f"a gradient of bucket {i} arrived after the bucket was sent"
            return
        self.pending[i] -= 1
        if self.pending[i] == 0:
            self._send_ready()

    def _send_ready(self) -> None:
        while self.sent < len(self.buckets) and self.pending[self.sent] <= 0:
            self._send(self.sent)

    def _send(self, i: int) -> None:
        bucket = self.buckets[i]
        device = bucket.params[0].device
        extra = (
            self.extra.reshape(-1).float() if i == len(self.buckets) - 1 and self.extra is not None else None
        )
        n_params = len(bucket.params)
        flat = self._buffer(i, bucket.numel + n_params + (0 if extra is None else extra.numel()), device)
        # One pass: copy each gradient in, divided by the world size on the way (as DDP does); the
        # parameters fewer ranks used are rescaled after the exchange (_scatter), a small pass.
        scale, offset = 1.0 / self.world, 0
        for p in bucket.params:
            n = p.numel()
            if p.grad is None:
                flat[offset : offset + n].zero_()
            else:
                torch.mul(p.grad.reshape(-1), scale, out=flat[offset : offset + n])
            offset += n
        flags = [0.0 if p.grad is None else 1.0 for p in bucket.params]
        flat[offset : offset + n_params].copy_(torch.tensor(flags), non_blocking=True)
        if extra is not None:
            flat[offset + n_params :].copy_(extra)
        work = dist.all_reduce(flat, group=self.group, async_op=True) if self._distributed() else None
        self.flats.append(flat)
        self.works.append(work)
        self.sent = i + 1

    def _buffer(self, i: int, numel: int, device: torch.device) -> torch.Tensor:
        """Bucket i's flat buffer, kept from step to step as DDP keeps its buckets: a fresh 25 MB
        tensor each step costs page faults on CPU. The reduced gradients are views into it until
        `zero_grad(set_to_none=True)`; a gradient still viewing it (zeroed in place instead) gets
        a fresh buffer, so no copy ever reads what it writes."""
        buf = self.buffers.get(i)
        if buf is None or buf.numel() != numel or buf.device != device:
            buf = self.buffers[i] = torch.empty(numel, device=device)
        ptr = buf.untyped_storage().data_ptr()
        if any(
            p.grad is not None and p.grad.untyped_storage().data_ptr() == ptr for p in self.buckets[i].params
        ):
            return torch.empty(numel, device=device)
        return buf

    def _complete(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        counts_all = []
        extra_out = None
        for bucket, flat, work in zip(self.buckets, self.flats, self.works):
            if work is not None:
                work.wait()
            n_params = len(bucket.params)
            counts_all.append(flat[bucket.numel : bucket.numel + n_params])
            if bucket is self.buckets[-1] and self.extra is not None:
                extra_out = flat[bucket.numel + n_params :]
        if self.extra is not None and not self.buckets:
            extra_out = self.extra.float().clone()
            if self._distributed():
                dist.all_reduce(extra_out, group=self.group)
        # The step's one device-to-host copy: every bucket's use counts (which gradients become
        # None) and the extra vector together, instead of a wait per bucket.
        parts = counts_all + ([extra_out] if extra_out is not None else [])
        host = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.float32)
        offset = 0
        for bucket, flat, counts in zip(self.buckets, self.flats, counts_all):
            self._scatter(bucket, flat, host[offset : offset + len(counts)].tolist())
            offset += len(counts)
        self.host_extra = torch.from_numpy(host[offset:].copy()) if extra_out is not None else None
        counts = torch.cat(counts_all).flip(0) if counts_all else torch.zeros(0)  # parameter order
        self.flats, self.works = [], []
        return extra_out, counts

    def _scatter(self, bucket: Bucket, flat: torch.Tensor, counts: list[float]) -> None:
        # The bucket holds sum_i g_i / world: rescale runs of neighbouring parameters used by
        # c != world ranks by world / c in one op each (the backbone is one long run with
        # c = world, which needs nothing), then hand out views.
        start, offset = 0, 0
        run_count, run_start = None, 0
        for p, c in zip(bucket.params, counts):
            if c != run_count:
                if run_count and run_count != self.world:
                    flat[run_start:offset].mul_(self.world / run_count)
                run_count, run_start = c, offset
            offset += p.numel()
        if run_count and run_count != self.world:
            flat[run_start:offset].mul_(self.world / run_count)
        for p, c in zip(bucket.params, counts):
            n = p.numel()
            p.grad = flat[start : start + n].view_as(p).to(p.dtype) if c > 0 else None
            start += n
