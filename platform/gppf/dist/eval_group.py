"""The process group evaluation's collectives use: CPU (gloo) and with its own, longer timeout.

Rank 0 alone scores some metrics (COCOeval of an Objects365-sized split takes many minutes) while
the other ranks wait for its numbers. On the training group they would wait under
`train.collective_timeout_s` (30 minutes by default, kept short so that a hung training step
fails fast) and could time out while rank 0 is still working; on this group they wait up to
`train.eval_timeout_s`. Gloo also keeps the gathered detections off the GPUs under NCCL.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

_GROUP: dist.ProcessGroup | None = None


def init_eval_group(timeout_s: float) -> None:
    """Every rank, once, in the same order (new_group is a collective of the default group)."""
    global _GROUP
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def eval_group() -> dist.ProcessGroup | None:
    """The evaluation group; None (the default group) where none was set up."""
    return _GROUP
