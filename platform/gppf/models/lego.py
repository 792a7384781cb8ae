"""Lego layers and per-task Gumbel-softmax controllers (GPPF §3.2, eq. 1, App. D.1).

A lego layer holds N units of identical architecture and separate weights. Each task has logits
α_l ∈ R^N per layer; in training it samples u = softmax((log softmax(α) + G) / τ) with Gumbel
noise G and
- soft: out = Σ_k u_k · unit_k(x)       (every unit runs: N× activation memory)
- hard: out = u_k* · unit_k*(x), u one-hot by straight-through, so only the chosen unit runs and
        the controller still gets a gradient through u_k* (value 1)
In evaluation only the arg-max unit runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.task import FeatureInfo
from gppf.api.trunk import StepState, Trunk, register_trunk, timm_kwargs
from gppf.config.job import LegoConfig
from gppf.dist.cross_bn import CrossTaskBatchNorm2d, checkpoint, unit_slot
from gppf.io.checkpoint import LoadReport, load_weights

if TYPE_CHECKING:
    from gppf.config.job import BackboneConfig


def gumbel_tau(
    step: int, total_steps: int, start: float = 5.0, end: float = 0.01, fraction: float = 0.9
) -> float:
    """Linear decay from `start` to `end` over the first `fraction` of training, then constant."""
    decay = max(1.0, fraction * total_steps)
    return end if step >= decay else start + (end - start) * step / decay


class GumbelController(nn.Module):
    """Per-task selection logits α[task] of shape [layers, units]. A stage that freezes them puts
    the controller in eval mode (gppf.engine.stages.frozen_modules): the trunk then runs every task's
    arg-max route, the network evaluation and export see, instead of sampling Gumbel routes."""

    eval_when_frozen = True

    def __init__(self, tasks: Sequence[str], num_layers: int, num_units: int):
        super().__init__()
        self.num_units = num_units
        self.logits = nn.ParameterDict({t: nn.Parameter(torch.zeros(num_layers, num_units)) for t in tasks})

    def probabilities(self, task: str) -> torch.Tensor:
        return F.softmax(self.logits[task], -1)

    def route(self, task: str) -> list[int]:
        """The arg-max unit of every layer: what evaluation runs and what export extracts."""
        return self.logits[task].argmax(-1).tolist()

    def sample(
        self, task: str, tau: float, hard: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Eq. 1: u = softmax((log p + G) / τ), straight-through one-hot when `hard`. [layers, units]"""
        logits = self.logits[task]
        u = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
        y = F.softmax((F.log_softmax(logits, -1) + gumbel) / tau, -1)
        if not hard:
            return y
        # scatter, not F.one_hot: one_hot checks the indices' range on the host (a device read)
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        return one_hot - y.detach() + y


class _HardGate(torch.autograd.Function):
    """out * w for a straight-through weight whose forward value is exactly 1: returns `out`
    itself (a view, no new activation) and still sends d(loss)/dw = <grad, out> to the controller.
    A plain `out * w` would keep a second copy of every block output alive for backward."""

    @staticmethod
    def forward(ctx, out, w):
        ctx.save_for_backward(out, w)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        out, w = ctx.saved_tensors
        return grad * w, (grad * out).sum().to(w.dtype)


class LegoLayer(nn.Module):
    """N candidate units of one layer. `forward(x, weights)`:

    weights None -> unit 0 (shared layer) ; a [N] soft vector -> weighted sum of all units ;
    a [N] straight-through one-hot (hard) -> only the chosen unit runs ; an int -> that unit (eval).
    """

    def __init__(self, units: Sequence[nn.Module]):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.executed = [0] * len(units)  # how often each unit ran (tests, selection stats)
        self._linked = False
        # Recompute each unit's activations in backward (backbone.grad_checkpointing).
        self.grad_checkpointing = False

    @property
    def num_units(self) -> int:
        return len(self.units)

    def link_siblings(self) -> None:
        """Tell each cross-task BN which BNs hold the same position in the other units, so a hard-
        routed step can update all their running stats from the stacked collective."""
        per_unit = [[m for m in u.modules() if isinstance(m, CrossTaskBatchNorm2d)] for u in self.units]
        for group in zip(*per_unit):
            for bn in group:
                object.__setattr__(bn, "siblings", list(group))  # plain list: not submodules

    def _link(self) -> bool:
        if not self._linked:
            self.link_siblings()
            self._linked = True
        return True

    def _run(self, k: int, x: torch.Tensor, hard_slot: bool) -> torch.Tensor:
        self.executed[k] += 1
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # The unit slot is entered inside the checkpointed function, so the recompute in
            # backward all-reduces the same [N, 2C+1] stack as the forward did.
            return checkpoint(self._unit, k, x, hard_slot)
        return self._unit(k, x, hard_slot)

    def _unit(self, k: int, x: torch.Tensor, hard_slot: bool) -> torch.Tensor:
        if hard_slot and self.num_units > 1:
            with unit_slot(self.num_units, k):
                return self.units[k](x)
        return self.units[k](x)

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor | int | None = None,
        hard: bool = False,
        unit: int | None = None,
    ):
        if self.num_units == 1 or weights is None:
            return self._run(0, x, False)
        if isinstance(weights, int):
            # One fixed unit: evaluation, or training under a frozen controller (arg-max routes).
            # Training, its cross-task BN takes the hard route's slot, so that ranks running other
            # units of this layer still issue the same collective.
            return self._run(weights, x, self._link() if self.training else False)
        if hard:  # `unit`: the arg-max, read by the caller for all layers at once
            k = unit if unit is not None else int(weights.detach().argmax())
            return _HardGate.apply(self._run(k, x, self._link()), weights[k])
        return sum(weights[k] * self._run(k, x, False) for k in range(self.num_units))


class _Stem(nn.Module):
    """A ResNet stem as one unit, keeping timm's child names (conv1, bn1, ...) for export."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        for n in names:
            self.add_module(n, getattr(model, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.children():
            x = m(x)
        return x


class LegoBackbone(Trunk):
    """A stack of lego layers with per-task controllers. Layer 0 is the stem (shared by default).

    `forward(x, task)` returns one feature map per stage (NCHW) along the task's route;
    `export(task)` returns the arg-max path as a state_dict of the plain timm model.
    Subclasses build `layers` as (timm module path, units) pairs from N timm models.
    """

    def __init__(
        self,
        model_name: str,
        layers: list[tuple[str, list[nn.Module]]],
        stage_ends: list[int],
        feature_info: list,
        tasks: Sequence[str],
        cfg: LegoConfig,
        channels_last_features: bool = False,
    ):
        super().__init__()
        self.timm_name = model_name
        self.cfg = cfg
        self.layer_names = [n for n, _ in layers]
        self.layers = nn.ModuleList(LegoLayer(units) for _, units in layers)
        self.stage_ends = stage_ends
        self.feature_info = feature_info
        self.controller = GumbelController(tasks, len(layers), cfg.num_units)
        self.channels_last_features = channels_last_features  # Swin computes NHWC
        self.channels_last_layers = channels_last_features
        self.tau = cfg.tau_start
        self.generator: torch.Generator | None = None  # set per step by the trainer (reproducible)

    @staticmethod
    def shared_set(cfg: LegoConfig) -> set[int]:
        return set(cfg.shared_layers) | ({0} if cfg.shared_stem else set())

    def forward(self, x: torch.Tensor, task: str) -> list[torch.Tensor]:
        hard = self.cfg.mode == "hard"
        sampling = self.training and self.controller.training  # a frozen controller: arg-max routes
        if sampling:
            weights = self.controller.sample(task, self.tau, hard, self.generator)
            # Hard routes: which unit each layer runs, read from the device once for all layers.
            units = weights.detach().argmax(-1).tolist() if hard else [None] * len(self.layers)
        else:
            route = self.controller.route(task)
        feats = []
        for idx, layer in enumerate(self.layers):
            if layer.num_units == 1:
                x = layer(x)
            elif sampling:
                x = layer(x, weights[idx], hard=hard, unit=units[idx])
            else:
                x = layer(x, route[idx])
            if idx in self.stage_ends:
                feats.append(x.permute(0, 3, 1, 2).contiguous() if self.channels_last_features else x)
        return feats

    def analysis_layers(self) -> list[tuple[str, nn.Module]]:
        """Every lego layer (its output is that of the unit the route runs)."""
        return [(name or "stem", layer) for name, layer in zip(self.layer_names, self.layers)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every lego layer's activations in backward (per block, whichever units run)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    # -- the trunk contract -----------------------------------------------------------------
    def set_step(self, state: StepState) -> None:
        """Gumbel temperature and noise for this step: a pure function of (seed, step, rank)."""
        c = self.cfg
        self.tau = gumbel_tau(state.tau_step, state.tau_total, c.tau_start, c.tau_end, c.tau_decay_fraction)
        seed = int(np.random.default_rng([state.seed, state.step, state.rank, 7]).integers(2**62))
        self.generator = torch.Generator().manual_seed(seed)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The controller logits: their own lr (`controller_lr`, 0 = the optimizer's), no weight decay."""
        return [
            {
                "params": list(self.controller.parameters()),
                "lr": self.cfg.controller_lr or lr,
                "weight_decay": 0.0,
            }
        ]

    def routes(self) -> dict[str, dict[str, Any]]:
        return {
            t: {
                "route": self.controller.route(t),
                "probs": self.controller.probabilities(t).detach().cpu().tolist(),
            }
            for t in self.controller.logits
        }

    def export(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """The task's arg-max path as a plain state_dict of `timm.create_model(name, num_classes=0)`."""
        if task not in self.controller.logits:
            raise KeyError(
                f"no route for task {task!r}; this lego backbone has {', '.join(self.controller.logits)}"
            )
        route = self.controller.route(task)
        state = {}
        for idx, (prefix, layer) in enumerate(zip(self.layer_names, self.layers)):
            unit = layer.units[route[idx] if layer.num_units > 1 else 0]
            for key, value in unit.state_dict().items():
                state[f"{prefix}.{key}" if prefix else key] = value.detach().clone()
        return state

    def load_plain(self, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        """Every unit of every layer starts from the plain network's weights of that layer."""
        report = LoadReport(source)
        used: set[str] = set()
        for prefix, layer in zip(self.layer_names, self.layers):
            dot = f"{prefix}." if prefix else ""
            own_keys = set(layer.units[0].state_dict())
            part = {
                k[len(dot) :]: v for k, v in state.items() if k.startswith(dot) and k[len(dot) :] in own_keys
            }
            used.update(dot + k for k in part)
            for u, unit in enumerate(layer.units):
                r = load_weights(unit, part, source)
                report.loaded += [
                    f"{dot}{k}" + (f" (unit {u})" if layer.num_units > 1 else "") for k in r.loaded
                ]
                if u == 0:
                    report.missing += [dot + k for k in r.missing]
        report.unexpected = [k for k in state if k not in used]
        return report

    def local_bn_copy(self) -> Trunk:
        generator, self.generator = self.generator, None  # a torch.Generator does not deep-copy
        try:
            return super().local_bn_copy()
        finally:
            self.generator = generator


def _timm_model(name: str, kwargs: dict | None) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, **(kwargs or {}))


def _models(name: str, n: int, kwargs: dict | None, build=_timm_model) -> list[nn.Module]:
    # N independently initialised models: their blocks are the units (same architecture).
    return [build(name, kwargs) for _ in range(n)]


class LegoResNet(LegoBackbone):
    """timm ResNet: the stem and every residual block (layer1.0 ... layer4.2 for ResNet-50) are
    lego layers; features are the four stage outputs (strides 4, 8, 16, 32)."""

    STEM = ("conv1", "bn1", "act1", "maxpool")

    def __init__(self, name: str, tasks: Sequence[str], cfg: LegoConfig, model_kwargs: dict | None = None):
        models = _models(name, cfg.num_units, model_kwargs)
        shared = self.shared_set(cfg)
        pick = lambda idx: models[:1] if idx in shared else models  # noqa: E731
        layers = [("", [_Stem(m, self.STEM) for m in pick(0)])]
        stage_ends = []
        for s in range(1, 5):
            for b in range(len(getattr(models[0], f"layer{s}"))):
                layers.append((f"layer{s}.{b}", [getattr(m, f"layer{s}")[b] for m in pick(len(layers))]))
            stage_ends.append(len(layers) - 1)
        info = [FeatureInfo(f["num_chs"], f["reduction"]) for f in models[0].feature_info[-4:]]
        super().__init__(name, layers, stage_ends, info, tasks, cfg)


@register_trunk("lego", "resnet")
def _lego_resnet(cfg: BackboneConfig, task_names: list[str]) -> Trunk:
    model = LegoResNet(cfg.name, task_names, cfg.lego, timm_kwargs(cfg.drop_path_rate, cfg.model_kwargs))
    if cfg.cross_task_bn:
        CrossTaskBatchNorm2d.convert(model)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model
