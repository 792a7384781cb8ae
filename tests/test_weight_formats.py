"""backbone.init_from reads the checkpoint formats people have (fixtures made here, no downloads):
a gppf checkpoint, an exported route, timm, torchvision, MoCo v1/v2 and DenseCL releases."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from gppf.config.job import BackboneConfig, LegoConfig
from gppf.io.checkpoint import save_checkpoint
from gppf.models.build import build_trunk
from gppf.models.weight_formats import load_backbone

X = torch.randn(2, 3, 64, 64)


def _features(trunk):
    trunk.eval()
    with torch.no_grad():
        return trunk(X, "a")[-1]


def _torchvision_r18():
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    tv.eval()
    body = torch.nn.Sequential(*list(tv.children())[:-2])  # up to layer4
    with torch.no_grad():
        expected = body(X)
    return tv.state_dict(), expected


def _static(name="resnet18"):
    torch.manual_seed(2)
    return build_trunk(BackboneConfig(name=name), ["a"])


def test_torchvision_resnet(tmp_path):
    state, expected = _torchvision_r18()
    torch.save(state, tmp_path / "tv.pth")
    trunk = _static()
    report = load_backbone(trunk, str(tmp_path / "tv.pth"))
    assert report.dropped == ["fc.weight", "fc.bias"] and not report.missing
    torch.testing.assert_close(_features(trunk), expected)


def test_timm_checkpoint_with_a_wrapper_and_classifier(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": model.state_dict()}, tmp_path / "timm.pth.tar")
    trunk = _static()
    report = load_backbone(trunk, str(tmp_path / "timm.pth.tar"))
    assert set(report.dropped) == {"fc.weight", "fc.bias"}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_features(trunk), model.forward_features(X))


def _moco(state: dict, densecl: bool = False) -> dict:
    q = "module.encoder_q.0." if densecl else "module.encoder_q."
    out = {q + k: v for k, v in state.items() if not k.startswith("fc.")}
    out |= {"module.encoder_k." + k: torch.zeros_like(v) for k, v in state.items()}
    out["module.queue"] = torch.randn(128, 64)
    out["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if densecl:  # the neck: global and dense projection heads, and a second queue
        out |= {
            "module.encoder_q.1.mlp.0.weight": torch.randn(2048, 512),
            "module.encoder_q.1.mlp2.0.weight": torch.randn(2, 2),
        }
        out["module.queue2"] = torch.randn(128, 64)
    else:  # MoCo v2's MLP head sits where torchvision's fc was
        out |= {
            "module.encoder_q.fc.0.weight": torch.randn(512, 512),
            "module.encoder_q.fc.2.weight": torch.randn(128, 512),
        }
    return {
        "epoch": 200,
        "arch": "resnet18",
        "state_dict": out,
        "optimizer": {"state": {}, "param_groups": []},
    }


@pytest.mark.parametrize("densecl", [False, True], ids=["moco_v2", "densecl"])
def test_self_supervised_releases(tmp_path, densecl):
    state, expected = _torchvision_r18()
    torch.save(_moco(state, densecl), tmp_path / "ssl.pth.tar")
    trunk = _static()
    report = load_backbone(trunk, str(tmp_path / "ssl.pth.tar"))
    assert ("DenseCL" if densecl else "MoCo") in report.fmt and not report.missing
    assert "module.queue" in report.dropped and any(k.startswith("module.encoder_k.") for k in report.dropped)
    assert any(".fc." in k or ".1.mlp" in k for k in report.dropped)  # projection heads left out
    torch.testing.assert_close(_features(trunk), expected)
    assert "left out, not backbone" in report.summary()


def test_an_unmapped_key_is_named(tmp_path):
    state, _ = _torchvision_r18()
    ckpt = _moco(state)
    ckpt["state_dict"]["module.encoder_q.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"'module.encoder_q.layer5.0.conv1.weight' maps to no parameter"):
        load_backbone(_static(), str(tmp_path / "bad.pth"))
    wrong = {k: v for k, v in state.items() if not k.startswith("fc.")}
    wrong["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(
        ValueError, match=r"conv1.weight has shape \(64, 3, 3, 3\) in the file but \(64, 3, 7, 7\)"
    ):
        load_backbone(_static(), str(tmp_path / "shape.pth"))


def test_exported_route_and_gppf_checkpoint_into_lego_and_static(tmp_path):
    torch.manual_seed(4)
    lego = build_trunk(BackboneConfig(name="resnet18", kind="lego", lego=LegoConfig(num_units=2)), ["a", "b"])
    with torch.no_grad():
        lego.controller.logits["a"].normal_()
    route = lego.export("a")
    torch.save(route, tmp_path / "route.pt")
    static = _static()
    assert load_backbone(static, str(tmp_path / "route.pt")).fmt.startswith("plain")
    lego.eval()
    with torch.no_grad():
        torch.testing.assert_close(_features(static), lego(X, "a")[-1])
    # A gppf checkpoint holds the whole model in the platform's keys: it loads into the same kind
    # of trunk (other tasks' controllers are reported, not loaded) ...
    save_checkpoint(
        {"step": 5, "optimizer": {}, "model": {f"backbone.{k}": v for k, v in lego.state_dict().items()}},
        tmp_path,
    )
    other = build_trunk(BackboneConfig(name="resnet18", kind="lego"), ["a", "new"])
    report = load_backbone(other, str(tmp_path))
    assert report.fmt == "gppf checkpoint" and "controller.logits.b" in report.unexpected
    assert "controller.logits.new" in report.missing
    with torch.no_grad():
        torch.testing.assert_close(_features(other), lego(X, "a")[-1])
    # ... and not into a static one: the error says what to do.
    with pytest.raises(ValueError, match="export a route first"):
        load_backbone(_static(), str(tmp_path))
    # A plain ResNet into a lego trunk: every unit starts from it.
    tv_state, expected = _torchvision_r18()
    torch.save(tv_state, tmp_path / "tv.pth")
    lego2 = build_trunk(BackboneConfig(name="resnet18", kind="lego"), ["a"])
    load_backbone(lego2, str(tmp_path / "tv.pth"))
    torch.testing.assert_close(_features(lego2), expected)
