"""MoCo v2 and DenseCL as CompL auxiliary tasks (CompL §3.2-3.3; He et al. 2020, Chen et al.
2020, Wang et al. 2021).

The query view runs through the shared trunk like any task's input (one trunk forward per rank
and step, so cross-task BN stays in lockstep); the key view runs through the head's momentum
encoder, a copy of the trunk that

- has no gradient and no optimizer state: it changes only by the EMA `momentum_update`, which
  the trainer calls on every rank after every optimizer step (the online weights are the same on
  every rank, so the copies stay identical);
- uses plain BatchNorm in eval mode, with running statistics copied from the online trunk at
  each update: it issues no collective (ranks that did not sample this task do not run it),
  and a key does not depend on which other images share its batch, which is the leak MoCo's
  shuffle-BN exists to prevent (docs/design.md);
- runs a lego trunk's arg-max route of the task whose route the query took.

The queue of negatives is the same on every rank: each rank that ran the task puts its keys into
a slot of the step payload, which is summed in the masked allreduce with the gradients, and
every rank enqueues all of them in rank order (MoCo's all-gather of keys, at no extra round trip).
λ is the task's `loss_weight` (CompL: 0.2 for MoCo and DenseCL).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.heads import BindsTrunk, RoutesTask, SyncsAcrossRanks, TakesBatch
from gppf.api.registry import register_task
from gppf.api.task import Evaluator, FeatureInfo
from gppf.config.base import ConfigError
from task_plugins.ssl.data import (
    SSLConfig,
    SSLTask,
    Top1Evaluator,
    chw,
    eval_view,
    seeded_views,
    view_transform,
)


@dataclass
class MoCoConfig(SSLConfig):
    loss_weight: float = 0.2  # λ (CompL: 0.2 for MoCo and DenseCL)
    dim: int = 128  # embedding size (MoCo v2)
    hidden: int = 0  # MLP hidden width; 0 = the trunk's last-level channels (MoCo v2: 2048 for R50)
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    key_size: int = 0  # side of the key view; 0 = input_size

    def __post_init__(self):
        if self.queue_size < 1 or self.dim < 1:
            raise ConfigError(f"queue_size and dim must be >= 1, got {self.queue_size}, {self.dim}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class DenseCLConfig(MoCoConfig):
    dense_weight: float = 0.5  # DenseCL's λ between the global and the dense loss
    grid: int = 0  # pool dense features to grid x grid before matching; 0 = the level's own size


def mlp(c_in: int, hidden: int, c_out: int, conv: bool = False) -> nn.Sequential:
    layer = (lambda a, b: nn.Conv2d(a, b, 1)) if conv else nn.Linear
    return nn.Sequential(layer(c_in, hidden), nn.ReLU(inplace=True), layer(hidden, c_out))


class MoCoHead(nn.Module, TakesBatch, BindsTrunk, RoutesTask, SyncsAcrossRanks):
    """Projection MLP, momentum encoder (trunk copy + MLP copy) and the queue of negative keys."""

    takes_batch = True

    def __init__(self, channels: int, cfg: MoCoConfig, task: str):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.route_task = task  # set by the model per forward (composite steps take the target's route)
        self.proj = mlp(channels, cfg.hidden or channels, cfg.dim)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.key_trunk: nn.Module | None = None
        self.pending: dict[str, torch.Tensor] = {}

    # -- the momentum encoder ------------------------------------------------------------------
    def bind_trunk(self, trunk: nn.Module) -> None:
        """Called by the model once the trunk exists: the key encoder starts as its copy."""
        self.key_trunk = trunk.local_bn_copy().eval()
        self.key_heads = nn.ModuleDict(
            {n: copy.deepcopy(m).requires_grad_(False) for n, m in self.online_heads()}
        )
        object.__setattr__(
            self, "_online", trunk
        )  # a reference, not a submodule: no second copy in the state

    def online_heads(self) -> list[tuple[str, nn.Module]]:
        return [("proj", self.proj)]

    def train(self, mode: bool = True) -> MoCoHead:
        super().train(mode)
        if self.key_trunk is not None:
            self.key_trunk.eval()  # always: running statistics, no collective, no dropout
        return self

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k <- m θ_k + (1 - m) θ_q for the trunk copy and the MLPs; BN statistics copied."""
        m = self.cfg.momentum
        online = dict(self._online.named_parameters())
        pairs = [(p, online[n]) for n, p in self.key_trunk.named_parameters()]
        for name, head in self.online_heads():
            pairs += list(zip(self.key_heads[name].parameters(), head.parameters()))
        keys, queries = [k for k, _ in pairs], [q.detach() for _, q in pairs]
        torch._foreach_lerp_(keys, queries, 1.0 - m)
        online_buffers = dict(self._online.named_buffers())
        for name, b in self.key_trunk.named_buffers():
            b.copy_(online_buffers[name])

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised global keys, the key trunk's last level)."""
        f = self.key_trunk(x, self.route_task)[-1]
        return F.normalize(self.key_heads["proj"](f.mean((2, 3))), dim=1), f

    # -- the queue, shared through the step payload --------------------------------------------
    def queues(self) -> list[str]:
        return ["queue"]

    def sync_slots(self) -> dict[str, int]:
        """Floats this head puts into the step payload per rank (its keys)."""
        return {q: self.batch_keys * self.cfg.dim for q in self.queues()}

    def sync_put(self) -> dict[str, torch.Tensor]:
        out, self.pending = {k: v.flatten() for k, v in self.pending.items()}, {}
        return out

    @torch.no_grad()
    def sync_get(self, summed: dict[str, torch.Tensor]) -> None:
        """Every rank, every step: enqueue the keys all ranks produced, in rank order."""
        n_new = 0
        for name, vec in summed.items():
            keys = vec.view(-1, self.batch_keys, self.cfg.dim).flatten(0, 1)
            keys = keys[keys.norm(dim=1) > 0.5]  # ranks that did not run the task left zeros
            n_new = self._enqueue(getattr(self, name), keys)
        self.queue_ptr.fill_((int(self.queue_ptr) + n_new) % self.cfg.queue_size)

    def _enqueue(self, queue: torch.Tensor, keys: torch.Tensor) -> int:
        size = queue.shape[1]
        keys = keys[-size:].to(queue.dtype)
        idx = (int(self.queue_ptr) + torch.arange(len(keys), device=queue.device)) % size
        queue[:, idx] = keys.T
        return len(keys)

    # -- forward ---------------------------------------------------------------------------------
    def contrast(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """InfoNCE logits, positive first: [q.k, q.queue] / T."""
        pos = (q * k).sum(-1, keepdim=True)
        neg = q @ queue.clone().detach()
        return torch.cat([pos, neg], dim=-1) / self.cfg.temperature

    def forward(self, feats: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        q = F.normalize(self.proj(feats[-1].mean((2, 3))), dim=1)
        k, _ = self.encode_keys(batch["key"])
        if self.training:
            self.pending = {"queue": k}
        return self.contrast(q, k, self.queue)


class DenseCLHead(MoCoHead):
    """MoCo v2 plus DenseCL's dense branch: per-location projections of the last level, each
    query location's positive is the key location most similar in trunk features (so the two
    views may have different sizes), negatives from a second queue of per-image mean keys."""

    def __init__(self, channels: int, cfg: DenseCLConfig, task: str):
        super().__init__(channels, cfg, task)
        self.dense = mlp(channels, cfg.hidden or channels, cfg.dim, conv=True)
        self.register_buffer("queue_dense", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))

    def online_heads(self) -> list[tuple[str, nn.Module]]:
        return [("proj", self.proj), ("dense", self.dense)]

    def queues(self) -> list[str]:
        return ["queue", "queue_dense"]

    def _grid(self, f: torch.Tensor) -> torch.Tensor:
        g = self.cfg.grid
        return F.adaptive_avg_pool2d(f, min(g, f.shape[-2]), min(g, f.shape[-1])) if g else f

    def forward(
        self, feats: list[torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self._grid(feats[-1])
        q = F.normalize(self.proj(feats[-1].mean((2, 3))), dim=1)
        q_grid = F.normalize(self.dense(f).flatten(2), dim=1)  # N x D x Sq
        k, kf = self.encode_keys(batch["key"])
        logits = self.contrast(q, k, self.queue)
        if not self.training:
            return logits
        with torch.no_grad():
            kf = self._grid(kf)
            k_grid = F.normalize(self.key_heads["dense"](kf).flatten(2), dim=1)  # N x D x Sk
            sim = F.normalize(f.detach().flatten(2), dim=1).transpose(1, 2) @ F.normalize(
                kf.flatten(2), dim=1
            )
            match = sim.argmax(-1)  # N x Sq: the key location each query location pairs with
            k_pos = torch.gather(k_grid, 2, match[:, None, :].expand(-1, k_grid.shape[1], -1))
        dense = self.contrast(q_grid.transpose(1, 2), k_pos.transpose(1, 2), self.queue_dense)
        self.pending = {"queue": k, "queue_dense": F.normalize(k_grid.mean(2), dim=1)}
        return logits, dense.flatten(0, 1)


@register_task("moco")
class MoCoTask(SSLTask):
    config_cls = MoCoConfig
    cfg: MoCoConfig
    head_cls = MoCoHead

    def image_keys(self) -> tuple[str, ...]:
        return ("image", "key")

    def preprocess(self, batch: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
        size, key_size = self.cfg.input_size, self.cfg.key_size or self.cfg.input_size
        tq, tk = view_transform(self.cfg, size), view_transform(self.cfg, key_size)
        n = len(batch["image"])
        out = {
            "image": np.empty((n, 3, size, size), dtype=np.uint8),
            "key": np.empty((n, 3, key_size, key_size), dtype=np.uint8),
        }
        for i in range(n):
            path = str(batch["image"][i])
            img = self.load(path)
            if train:
                q, k = seeded_views([tq, tk], img, seed, path)
            else:  # evaluation: the same image as query and key (is it its own nearest key?)
                q, k = eval_view(img, size), eval_view(img, key_size)
            out["image"][i], out["key"][i] = chw(q), chw(k)
        return out

    def build_head(self, features: list[FeatureInfo]) -> nn.Module:
        head = self.head_cls(features[-1].channels, self.cfg, self.name)
        head.batch_keys = self.cfg.batch_size
        return head

    def loss(self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor:
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, zeros)

    def evaluator(self) -> Evaluator:
        return Top1Evaluator("contrast_top1")


@register_task("densecl")
class DenseCLTask(MoCoTask):
    config_cls = DenseCLConfig
    cfg: DenseCLConfig
    head_cls = DenseCLHead

    def loss(self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor:
        if not isinstance(outputs, tuple):
            return super().loss(outputs, batch)
        logits, dense = outputs
        w = self.cfg.dense_weight
        zeros = torch.zeros(dense.shape[0], dtype=torch.long, device=dense.device)
        return (1 - w) * super().loss(logits, batch) + w * F.cross_entropy(dense, zeros)
