"""The trunk contract: one registry for static and lego, ResNet and Swin; per-step state, parameter
groups, export / load_plain, local-BN copies, and Swin at any input size."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.swin_transformer import get_relative_position_index

from gppf.api.trunk import StepState
from gppf.config.job import BackboneConfig, LegoConfig
from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.models.backbone import Backbone
from gppf.models.build import build_trunk
from gppf.models.lego import LegoResNet
from gppf.models.swin import LegoSwin, StaticSwin, _relative_index, window_and_shift

SWIN = "swin_tiny_patch4_window7_224"
SMALL_SWIN = {"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8)}


@pytest.mark.parametrize(
    "kind, name, cls",
    [
        ("static", "resnet10t", Backbone),
        ("static", "efficientnet_b0", Backbone),  # any timm features_only model
        ("lego", "resnet10t", LegoResNet),
        ("static", SWIN, StaticSwin),
        ("lego", SWIN, LegoSwin),
    ],
)
def test_one_door_for_every_trunk(kind, name, cls):
    kwargs = SMALL_SWIN if "swin" in name else {}
    trunk = build_trunk(BackboneConfig(name=name, kind=kind, model_kwargs=kwargs), ["a", "b"])
    assert type(trunk) is cls
    assert [f.reduction for f in trunk.feature_info] == [4, 8, 16, 32]
    trunk.set_step(StepState(seed=0, step=3, rank=1, tau_step=3, tau_total=10))
    feats = trunk(torch.randn(2, 3, 64, 64), "a")
    assert [f.shape[1] for f in feats] == [f.channels for f in trunk.feature_info]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_unknown_kind_or_model_is_named():
    with pytest.raises(
        ValueError, match=r"no trunk for backbone.kind='nope'.*registered kind/family pairs: .*lego/resnet"
    ):
        build_trunk(BackboneConfig(name="resnet18", kind="nope"), ["a"])
    with pytest.raises(ValueError, match=r"backbone.name='resnet_typo' is not a timm model"):
        build_trunk(BackboneConfig(name="resnet_typo"), ["a"])
    with pytest.raises(ValueError, match=r"no trunk for backbone.kind='lego' with 'efficientnet_b0'"):
        build_trunk(BackboneConfig(name="efficientnet_b0", kind="lego"), ["a"])


def test_lego_step_state_and_param_groups():
    cfg = BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(controller_lr=0.5))
    trunk = build_trunk(cfg, ["a"])
    trunk.set_step(StepState(seed=0, step=0, rank=0, tau_step=450, tau_total=1000))
    assert trunk.tau == pytest.approx(5.0 + (0.01 - 5.0) * 0.5)
    noise = trunk.generator.initial_seed()
    trunk.set_step(StepState(seed=0, step=0, rank=1, tau_step=450, tau_total=1000))
    assert (
        trunk.generator.initial_seed() != noise
    )  # Gumbel noise differs per rank, fixed per (seed, step, rank)
    (group,) = trunk.param_groups(lr=0.1)
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in trunk.controller.parameters()}
    assert build_trunk(BackboneConfig(name="resnet10t"), ["a"]).param_groups(0.1) == []


def test_local_bn_copy_issues_no_collectives_and_matches():
    torch.manual_seed(0)
    trunk = build_trunk(BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(mode="hard")), ["a"])
    trunk.set_step(StepState(0, 0, 0, 0, 10))
    trunk.train()
    trunk(torch.randn(4, 3, 32, 32), "a")  # move running stats
    copy = trunk.local_bn_copy()
    assert not any(isinstance(m, CrossTaskBatchNorm2d) for m in copy.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
    assert any(isinstance(m, CrossTaskBatchNorm2d) for m in trunk.modules())  # the original is untouched
    assert not any(p.requires_grad for p in copy.parameters())
    trunk.eval()
    copy.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for f, g in zip(trunk(x, "a"), copy(x, "a")):
            torch.testing.assert_close(f, g)


def test_plain_state_dict_round_trip_through_a_lego_trunk():
    static = build_trunk(BackboneConfig(name="resnet10t"), ["a"])
    plain = static.export()
    lego = build_trunk(BackboneConfig(name="resnet10t", kind="lego"), ["a", "b"])
    report = lego.load_plain(plain, "test")
    assert not report.missing and not report.unexpected
    for task in ("a", "b"):  # every unit starts from the plain weights, so every route is that network
        exported = lego.export(task)
        assert exported.keys() == plain.keys()
        assert all(torch.equal(exported[k], plain[k]) for k in plain)


def test_swin_window_rule_and_relative_positions():
    assert window_and_shift((56, 56), (7, 7), (3, 3)) == ((7, 7), (3, 3))
    assert window_and_shift((7, 7), (7, 7), (3, 3)) == ((7, 7), (0, 0))  # timm: no shift at the window size
    assert window_and_shift((4, 25), (7, 7), (3, 3)) == ((4, 7), (0, 3))
    full = _relative_index((7, 7), (7, 7), torch.device("cpu"))
    assert torch.equal(full, get_relative_position_index(7, 7))
    small = _relative_index((3, 3), (7, 7), torch.device("cpu"))  # offsets -2..2 read from the 7x7 table
    assert small.shape == (9, 9) and small[0, 0] == full[0, 0] and small[0, 8] == full[0, 16]


@pytest.mark.parametrize("size", [96, 100, 131])
def test_static_swin_takes_any_input_size_and_matches_timm_at_224(size):
    torch.manual_seed(0)
    trunk = StaticSwin(SWIN)
    trunk.train()
    feats = trunk(torch.randn(2, 3, size, size))
    assert [f.shape[-1] for f in feats] == [-(-size // s) for s in (4, 8, 16, 32)]
    sum(f.mean() for f in feats).backward()
    assert all(p.grad is not None for p in trunk.parameters())
    ref = timm.create_model(SWIN, pretrained=False, num_classes=0)
    ref.load_state_dict(trunk.export(), strict=True)
    ref.eval()
    trunk.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            trunk(x)[-1], ref.forward_features(x).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5
        )


def test_static_swin_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    no_drop = {**SMALL_SWIN, "drop_path_rate": 0.0}  # timm's Swin-T drops paths (0.1) by default
    plain = StaticSwin(SWIN, no_drop)
    ckpt = StaticSwin(SWIN, no_drop, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 72, 72)
    for m in (plain, ckpt):
        sum((f * (i + 1)).mean() for i, f in enumerate(m(x))).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert all(stage.grad_checkpointing for stage in ckpt.body.layers)
