"""Cross-task BatchNorm: batch statistics over the union of every worker's batch.

Each worker runs a different task with its own batch size and image size, so statistics are
synchronised as (sum, sum of squares, count) weighted by count (detectron2's stats_mode="N"),
accumulated in float64 about each rank's own mean so that a large activation mean costs no
precision.
`torch.nn.SyncBatchNorm` refuses CPU tensors and issues collectives that hang when a rank has an
empty batch; this is one small autograd function over `torch.distributed` that runs the same on
gloo and NCCL: one all_reduce forward, one backward.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

_state = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks a gradient-checkpoint recompute: BN must not update running stats a second time."""
    prev = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = prev


def _is_recomputing() -> bool:
    return getattr(_state, "recomputing", False)


def _recompute_contexts():
    return contextlib.nullcontext(), recomputing()


def checkpoint(fn, *args):
    """`torch.utils.checkpoint` of `fn(*args)` (non-reentrant) whose recompute in backward does not
    update BN running statistics a second time. The recompute issues cross-task BN's forward
    collectives again; every rank recomputes the same layers in the same (reverse) order, so they
    still line up. State `fn` depends on, such as a hard route's `unit_slot`, must be entered
    inside `fn` so that the recompute sees it too."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(fn, *args, use_reentrant=False, context_fn=_recompute_contexts)


@contextlib.contextmanager
def unit_slot(num_units: int, unit: int):
    """Hard routing: BNs called inside run as unit `unit` of `num_units` candidates.

    Ranks that run different units of the same lego layer must still issue the same collectives,
    and must not mix statistics. Inside this context each BN all-reduces a [num_units, 2C+1]
    stack with its own statistics in row `unit` and zeros elsewhere, then uses its row: one
    collective per BN position, whichever unit a rank runs (DESIGN.md).
    """
    prev = getattr(_state, "slot", None)
    _state.slot = (num_units, unit)
    try:
        yield
    finally:
        _state.slot = prev


def _stacked_all_reduce(vec: torch.Tensor, slot, group) -> torch.Tensor:
    """all_reduce `vec` ([1, len] result), or, inside unit_slot, a [num_units, len] stack holding
    `vec` in the unit's row and zeros elsewhere (every unit's global sums come back)."""
    if slot is None:
        if _synced():
            dist.all_reduce(vec, group=group)
        return vec[None]
    n, k = slot
    stack = vec.new_zeros(n, vec.numel())
    stack[k] = vec
    if _synced():
        dist.all_reduce(stack, group=group)
    return stack


def _synced() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _CrossTaskBNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        c = x.shape[1]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 inputs accumulate in fp32
        xf = x.transpose(0, 1).reshape(c, -1).to(acc)  # [C, N*H*W]
        n = xf.shape[1]
        # Sums about this rank's own mean `shift`: E[x²] - E[x]² of raw float32 sums cancels when
        # |mean| >> std (relative error 6e-2 at |mean|/std = 1000). x - shift is exact in float32
        # (Sterbenz) for data near its mean and its sums are of the data's scale, not its offset;
        # turned into raw sums in float64 they lose nothing: still one all_reduce of 2C+1 numbers.
        shift = xf.sum(1) / max(n, 1)
        d = xf - shift[:, None]
        s1, s2 = d.sum(1).double(), (d * d).sum(1).double()
        shift64 = shift.double()
        raw = torch.cat([n * shift64 + s1, s2 + 2 * shift64 * s1 + n * shift64 * shift64])
        count = torch.full((1,), float(n), dtype=torch.float64, device=x.device)
        slot = getattr(_state, "slot", None)
        stack = _stacked_all_reduce(torch.cat([raw, count]), slot, group)
        local = stack[slot[1] if slot else 0]
        total = local[-1].clamp(min=1.0)
        mean = local[:c] / total
        var = (local[c : 2 * c] / total - mean * mean).clamp(min=0.0)
        invstd = torch.rsqrt(var + eps).to(acc)
        shape = (1, c) + (1,) * (x.dim() - 2)
        # x - mean as (x - shift) - (mean - shift): both terms near the data's scale, not its offset.
        offset = (mean - shift64).to(acc)
        xhat = (x.to(acc) - shift.view(shape) - offset.view(shape)) * invstd.view(shape)
        y = xhat * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = total.to(acc)
        ctx.group = group
        ctx.slot = slot  # backward runs outside the unit_slot context
        ctx.mark_non_differentiable(stack)
        return y.to(x.dtype), stack

    @staticmethod
    def backward(ctx, gy, _gstack):
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[1]
        shape = (1, c) + (1,) * (xhat.dim() - 2)
        g = gy.to(xhat.dtype)
        dims = [0] + list(range(2, g.dim()))
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * xhat).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype)  # local: the masked allreduce averages it
        grad_bias = sum_dy.to(weight.dtype)
        both = _stacked_all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.slot, ctx.group)
        both = both[ctx.slot[1] if ctx.slot else 0]
        mean_dy = (both[:c] / ctx.count).view(shape)
        mean_dy_xhat = (both[c:] / ctx.count).view(shape)
        gx = (g - mean_dy - xhat * mean_dy_xhat) * (weight.to(xhat.dtype) * invstd).view(shape)
        return gx.to(gy.dtype), grad_weight, grad_bias, None, None


class CrossTaskBatchNorm2d(nn.BatchNorm2d):
    """Drop-in BatchNorm2d whose training statistics span all workers (and all their tasks).

    With a world size of 1 (or no process group) it computes plain BN, so single-process tests
    and evaluation need nothing special. `group` restricts the sync to a process group.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.group = group
        self.siblings: list[CrossTaskBatchNorm2d] = []  # same BN position in the other lego units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        y, stack = _CrossTaskBNFn.apply(x, self.weight, self.bias, self.eps, self.group)
        if not _is_recomputing():
            # Under hard routing the stack holds every sibling unit's global sums at this BN
            # position, so every rank updates every unit's running stats alike, including units it
            # did not run. (`siblings` is set by the lego layer; plain BN has none.)
            mods = self.siblings if len(stack) > 1 else [self]
            for bn, row in zip(mods, stack):
                bn._update_running_stats(row)
        return y

    def _update_running_stats(self, sums: torch.Tensor) -> None:
        # No .item(): a host sync per BN layer would stall the GPU. A global count <= 1 (all
        # batches empty, or a unit nobody ran) leaves the running stats as they were.
        c = self.num_features
        with torch.no_grad():
            count = sums[-1]
            valid = count > 1
            mean = sums[:c] / count.clamp(min=1.0)
            var = (sums[c : 2 * c] / count.clamp(min=1.0) - mean * mean).clamp(min=0.0)
            unbiased = var * (count / (count - 1).clamp(min=1.0))
            rate = torch.where(
                valid, torch.tensor(self.momentum, dtype=self.running_mean.dtype, device=sums.device), 0.0
            )
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), rate)
            self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))

    @classmethod
    def convert(cls, module: nn.Module, group=None) -> nn.Module:
        """Replace every BatchNorm2d under `module` (keeping its weights and stats)."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum or 0.1, group=group)
            ref = module.running_mean if module.running_mean is not None else module.weight
            new = new.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                if module.affine:
                    new.weight.copy_(module.weight)
                    new.bias.copy_(module.bias)
                if module.track_running_stats:
                    new.running_mean.copy_(module.running_mean)
                    new.running_var.copy_(module.running_var)
                    new.num_batches_tracked.copy_(module.num_batches_tracked)
            return new
        for name, child in module.named_children():
            new_child = cls.convert(child, group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def to_local_bn(module: nn.Module) -> nn.Module:
    """Replace every CrossTaskBatchNorm2d under `module` by a plain BatchNorm2d with the same
    weights and statistics (the inverse of `CrossTaskBatchNorm2d.convert`)."""
    if isinstance(module, CrossTaskBatchNorm2d):
        new = nn.BatchNorm2d(module.num_features, module.eps, module.momentum)
        new = new.to(device=module.running_mean.device, dtype=module.running_mean.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = to_local_bn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
