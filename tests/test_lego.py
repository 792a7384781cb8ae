"""Lego layers, Gumbel controllers, τ schedule, route export (GPPF §3.2, App. D.1)."""

from __future__ import annotations

import pytest
import timm
import torch

from gppf.config.job import LegoConfig
from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.models.lego import LegoResNet, gumbel_tau
from gppf.models.swin import LegoSwin


def _lego(mode: str, name: str = "resnet18") -> LegoResNet:
    torch.manual_seed(0)
    m = LegoResNet(name, ["a", "b"], LegoConfig(num_units=2, mode=mode))
    with torch.no_grad():  # distinct preferences, so routes differ between tasks
        m.controller.logits["a"].normal_()
        m.controller.logits["b"].normal_()
    return m


def test_tau_schedule():
    assert gumbel_tau(0, 1000) == pytest.approx(5.0)
    assert gumbel_tau(450, 1000) == pytest.approx(5.0 + (0.01 - 5.0) * 0.5)
    assert gumbel_tau(900, 1000) == pytest.approx(0.01)
    assert gumbel_tau(999, 1000) == pytest.approx(0.01)
    # GPPF-R50: 5.0 at the start, 0.01 from 450k of 500k iterations on
    assert gumbel_tau(450_000, 500_000) == pytest.approx(0.01)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_controllers_get_finite_gradients(mode):
    m = _lego(mode)
    m.train()
    m.tau = 1.0
    for task in ("a", "b"):
        feats = m(torch.randn(2, 3, 32, 32), task)
        sum(f.mean() for f in feats).backward()
        g = m.controller.logits[task].grad
        assert g is not None and torch.isfinite(g).all()
        assert g[1:].abs().sum() > 0  # the stem (layer 0) is shared: no choice there
    assert m.controller.logits["a"].grad is not None


def test_hard_mode_runs_exactly_one_unit_per_layer():
    m = _lego("hard")
    m.train()
    m(torch.randn(2, 3, 32, 32), "a")
    for layer in m.layers:
        assert sum(layer.executed) == 1
    soft = _lego("soft")
    soft.train()
    soft(torch.randn(2, 3, 32, 32), "a")
    assert all(sum(layer.executed) == layer.num_units for layer in soft.layers)


def test_eval_runs_the_argmax_unit():
    m = _lego("soft")
    m.eval()
    m(torch.randn(1, 3, 32, 32), "b")
    route = m.controller.route("b")
    for idx, layer in enumerate(m.layers):
        if layer.num_units > 1:
            assert layer.executed == [int(route[idx] == 0), int(route[idx] == 1)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_export_loads_strict_into_timm_and_matches(name):
    m = _lego("soft", name)
    assert any(isinstance(x, CrossTaskBatchNorm2d) for x in m.modules()) is False  # converted by the caller
    CrossTaskBatchNorm2d.convert(m)
    m.train()
    m.tau = 1.0
    with torch.no_grad():  # move running stats away from their init so the check means something
        for task in ("a", "b"):
            m(torch.randn(4, 3, 64, 64), task)
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    for task in ("a", "b"):
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ref.load_state_dict(m.export(task), strict=True)
        ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(ref.forward_features(x), m(x, task)[-1], atol=1e-5, rtol=1e-5)
    assert m.controller.route("a") != m.controller.route("b")


def test_swin_export_loads_strict_into_timm_and_matches():
    name = "swin_tiny_patch4_window7_224"
    torch.manual_seed(0)
    m = LegoSwin(name, ["a", "b"], LegoConfig(num_units=2, mode="soft"))
    with torch.no_grad():
        m.controller.logits["a"].normal_()
        m.controller.logits["b"].normal_()
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # LayerNorm only
    m.eval()
    x = torch.randn(1, 3, 224, 224)
    feats = m(x, "a")
    assert [f.shape[1] for f in feats] == [96, 192, 384, 768] and feats[0].shape[-1] == 56
    for task in ("a", "b"):
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ref.load_state_dict(m.export(task), strict=True)
        ref.eval()
        with torch.no_grad():
            out = ref.forward_features(x).permute(0, 3, 1, 2)
            torch.testing.assert_close(out, m(x, task)[-1], atol=1e-5, rtol=1e-5)
    assert m.controller.route("a") != m.controller.route("b")


def test_a_learned_stem_has_units_trains_and_exports():
    """GPPF's stem is a lego layer like the others (App. B plots its selection): shared_stem=false."""
    torch.manual_seed(0)
    m = LegoResNet("resnet10t", ["a", "b"], LegoConfig(num_units=2, mode="soft", shared_stem=False))
    assert m.layers[0].num_units == 2
    m.train()
    m.tau = 1.0
    sum(f.mean() for f in m(torch.randn(2, 3, 32, 32), "a")).backward()
    assert m.controller.logits["a"].grad[0].abs().sum() > 0  # the stem's choice gets a gradient
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    ref.load_state_dict(m.export("a"), strict=True)


def test_a_frozen_controller_runs_the_argmax_route_in_training():
    """A stage that freezes the lego trunk (LVIS's classifier stage) runs the route evaluation and
    export see, not Gumbel samples: the controller goes to eval mode with the frozen BNs."""
    from gppf.engine.stages import frozen_modules

    m = _lego("soft")
    frozen = frozen_modules(m, {n for n, _ in m.named_parameters()})
    m.train()
    for module in frozen:
        module.eval()
    assert not m.controller.training
    x = torch.randn(2, 3, 32, 32)
    m.generator = torch.Generator().manual_seed(1)
    a = m(x, "a")
    m.generator = torch.Generator().manual_seed(2)  # other Gumbel noise: no effect now
    b = m(x, "a")
    m.eval()
    ref = m(x, "a")
    assert all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(a, b, ref))
