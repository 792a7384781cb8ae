"""The shared neck, its five adapter designs, the language-guided adapters and the adapt stage."""

from __future__ import annotations

import socket

import pytest
import torch

from gppf.config.base import ConfigError, apply_overrides
from gppf.config.job import (
    ADAPTERS,
    VARIANTS,
    BackboneConfig,
    JobConfig,
    LanguageConfig,
    ModelConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
)
from gppf.dist.local_dist import run_distributed
from gppf.engine.hooks import StageHook
from gppf.engine.trainer import Trainer
from tests.test_trainer import FixedStream

NAMES = {"a": ["car", "bus", "person"], "s": ["road", "sidewalk", "sky"]}


def _config(adapter: str = "fpn", variant: str = "", stages=(), steps: int = 2) -> JobConfig:
    tasks = {
        "a": {"type": "classification", "data_root": "/unused", "num_classes": 3, "batch_size": 2},
        "s": {
            "type": "segmentation",
            "data_root": "/unused",
            "num_classes": 3,
            "batch_size": 2,
            "head": "upernet",
            "head_channels": 16,
            "aux_channels": 8,
        },
    }
    for name, entry in tasks.items():
        entry["class_names"] = NAMES[name]
    return JobConfig(
        tasks=tasks,
        backbone=BackboneConfig(name="resnet10t"),
        model=ModelConfig(
            neck="fpn", neck_channels=32, adapter=adapter, language=LanguageConfig(variant=variant)
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, warmup_steps=0),
        train=TrainConfig(steps=steps),
        stages=list(stages),
    )


def _trainer(cfg: JobConfig) -> Trainer:
    t = Trainer(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    t.streams["a"] = FixedStream(
        {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 3, (2,), generator=g)}
    )
    t.streams["s"] = FixedStream(
        {
            "image": torch.randn(2, 3, 64, 64, generator=g),
            "mask": torch.randint(0, 3, (2, 64, 64), generator=g),
        }
    )
    return t


def _snapshot(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _steps_of_every_design(rank: int, world: int) -> dict:
    """One SIMT step per adapter design and language variant, on this rank."""
    out = {}
    runs = [(a, "") for a in ADAPTERS] + [("fpn", v) for v in VARIANTS]
    for adapter, variant in runs:
        t = _trainer(_config(adapter, variant, steps=1))
        before = _snapshot(t)
        step = t.train_step()
        after = t.model.state_dict()
        changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
        out[(adapter, variant)] = {
            "task": step.task,
            "changed": changed,
            "neck": type(t.model.neck.pre[0] if t.model.neck.pre is not None else t.model.neck.fpn).__name__,
            "gates": {k: v.flatten()[:3].tolist() for k, v in before.items() if k.endswith(".gate")},
            "checksum": float(sum(v.float().sum() for v in after.values())),
        }
    return out


def test_every_adapter_design_and_language_variant_trains_a_simt_step_on_two_ranks():
    r0, r1 = run_distributed(_steps_of_every_design, 2, timeout=600)
    for key, res in r0.items():
        assert res["checksum"] == r1[key]["checksum"], f"{key}: ranks disagree after the step"
        assert any(k.startswith("neck.") for k in res["changed"]), f"{key}: the neck did not train"
    assert {r0[k]["task"] for k in r0} | {r1[k]["task"] for k in r1} == {0, 1}  # both tasks ran somewhere
    for adapter, n in (("pre_scalar", 1), ("pre_vector", 3)):
        gates = r0[(adapter, "")]["gates"]
        assert len(gates) == 4, f"{adapter}: one learnable gate per trunk level expected"
        assert all(values == pytest.approx([1e-3] * n) for values in gates.values())
    assert r0[("pre", "")]["neck"] == "ConvAdapter" and r0[("fpn", "")]["neck"] == "FeaturePyramidNetwork"


def test_adapter_and_variant_names_are_checked():
    with pytest.raises(ConfigError, match="model.adapter must be one of"):
        apply_overrides(_config(), ["model.adapter=side"])
    with pytest.raises(ConfigError, match="model.language.variant must be one of"):
        apply_overrides(_config(), ["model.language.variant=clip"])
    with pytest.raises(ConfigError, match="set model.neck=fpn"):
        apply_overrides(_config(), ["model.neck=", "model.adapter=pre"])
    cfg = apply_overrides(_config(), ["model.adapter=pre_vector", "model.language.variant=naive"])
    assert cfg.model.adapter == "pre_vector" and cfg.model.language.variant == "naive"


ADAPT = StageConfig("adapt", 3, freeze=["backbone.*", "heads.*"], lr_factor=10.0, schedule="stage")
FINETUNE = StageConfig("finetune", 3, schedule="stage", warmup_steps=2, warmup_factor=0.01)


@pytest.mark.parametrize("variant", ["", "lv_adapter"])
def test_adapt_stage_trains_exactly_the_adapter(variant):
    t = _trainer(_config("pre_scalar", variant, stages=[ADAPT, FINETUNE]))
    encoder = t.model.neck.language.encoder if variant else None
    enc_before = {k: v.clone() for k, v in encoder.state_dict().items()} if encoder else {}
    before = _snapshot(t)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in t.model.named_parameters() if n.startswith("neck.")}
    tasks_run = {t.tasks[t.train_step().task].name for _ in range(3)}
    after = t.model.state_dict()
    for k in before:  # parameters and BN running statistics alike
        if not k.startswith("neck."):
            assert torch.equal(before[k], after[k]), f"{k} changed in the adapt stage"
    frozen = [p for n, p in t.model.named_parameters() if not n.startswith("neck.")]
    assert all(p not in t.optimizer.state for p in frozen)  # no optimizer state either
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "neck.fpn.layer_blocks.3.0.weight" in changed and "neck.pre.3.gate" in changed
    if variant:
        assert {f"neck.language.prompts.{n}.ctx" for n in tasks_run} <= changed
        assert any(k.startswith("neck.language.decoder.") for k in changed)
        assert "neck.language.proj.weight" in changed
    # finetune: everything trains but the text encoder
    StageHook().before_step(t)
    assert t.stage_index == 1
    assert all(p.requires_grad for p in t.model.parameters())
    mid = _snapshot(t)
    for _ in range(3):
        t.train_step()
    after = t.model.state_dict()
    stem = next(k for k in mid if k.startswith("backbone.") and k.endswith(".weight"))
    assert not torch.equal(mid[stem], after[stem]), f"{stem} did not train in finetune"
    assert any(not torch.equal(mid[k], after[k]) for k in mid if k.startswith("heads."))
    if encoder is not None:
        assert all(not p.requires_grad for p in encoder.parameters())
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in enc_before.items())
        assert not any(k.startswith("neck.language.encoder") for k in after)  # not in checkpoints


def test_finetune_warmup_starts_at_the_warmup_factor():
    t = _trainer(_config(stages=[ADAPT, FINETUNE]))
    assert t.plan.lr_multiplier(0) == pytest.approx(10.0)  # adapt: 10 x the finetune lr
    assert t.plan.lr_multiplier(3) == pytest.approx(0.01)  # finetune's first step: lr x 0.01
    assert t.plan.lr_multiplier(4) == pytest.approx(0.01 + 0.99 / 2)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_lv_adapter_offline_packaged_encoder_prompts_and_p5(no_network):
    from gppf.models.language import LanguageAdapter
    from gppf.models.text_encoders import MiniLMEncoder

    torch.manual_seed(0)
    lv = LanguageAdapter(LanguageConfig(variant="lv_adapter"), NAMES, channels=32)
    assert isinstance(lv.encoder, MiniLMEncoder) and lv.encoder.width == 384
    assert not any(n.startswith("encoder") for n, _ in lv.named_parameters())
    assert lv.prompts["a"].ctx.shape == (16, 384)
    p5 = torch.randn(2, 32, 3, 4, requires_grad=True)
    out = lv(p5, "a")
    out.square().mean().backward()
    assert all(p.grad is None for p in lv.encoder.parameters())  # frozen: no gradient
    assert lv.prompts["a"].ctx.grad is not None and lv.prompts["a"].ctx.grad.abs().sum() > 0
    assert lv.prompts["s"].ctx.grad is None  # another task's prompts are not touched
    lv.eval()
    with torch.no_grad():
        text = lv.proj(lv.prompts["a"](lv.encoder))
        expected = lv.decoder(p5.flatten(2).transpose(1, 2), text.unsqueeze(0).expand(2, -1, -1))
        assert torch.allclose(lv(p5, "a"), expected.transpose(1, 2).reshape(2, 32, 3, 4))
        # the class names matter: other names, other text features
        other = lv.proj(lv.prompts["s"](lv.encoder))
        assert not torch.allclose(text, other)
    assert torch.equal(lv(p5, "depth_task_without_classes"), p5)


def test_fixed_prompts_match_the_encoder_on_the_template():
    from gppf.models.language import LanguageAdapter

    lv = LanguageAdapter(LanguageConfig(variant="template"), {"a": ["car", "bus"]}, channels=32)
    ids, mask = lv.encoder.tokenize(["there is a car in the scene.", "there is a bus in the scene."])
    direct = lv.encoder.encode(lv.encoder.embed(ids), ids, mask)
    assert torch.allclose(lv.prompts["a"](lv.encoder), direct, atol=1e-6)
    ens = LanguageAdapter(LanguageConfig(variant="ensemble"), {"a": ["car", "bus"]}, channels=32)
    feats = ens.prompts["a"](ens.encoder)
    assert feats.shape == (2, 384) and torch.allclose(feats.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(feats, direct)


def test_heads_with_their_own_fpn_read_the_neck_pyramid_instead():
    from gppf.api.task import FeatureInfo
    from task_plugins.detection.rcnn import RCNNConfig, RCNNHead
    from task_plugins.segmentation.upernet import UperNetHead

    pyramid = [FeatureInfo(32, s, pyramid=True) for s in (4, 8, 16, 32)]
    head = RCNNHead(pyramid, num_classes=3, masks=False, cfg=RCNNConfig(conv_channels=16, fc_channels=32))
    assert head.fpn is None
    assert UperNetHead(pyramid, 3, 16).own_fpn is False
    assert RCNNHead([FeatureInfo(64, s) for s in (4, 8, 16, 32)], 3, False, RCNNConfig()).fpn is not None
    feats = [torch.randn(2, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    batch = {
        "image": torch.randn(2, 3, 64, 64),
        "boxes": torch.tensor([[[4.0, 4.0, 30.0, 40.0]], [[10.0, 12.0, 60.0, 50.0]]]),
        "labels": torch.tensor([[1], [2]]),
        "size": torch.tensor([[64, 64], [64, 64]]),
    }
    losses = head.train()(feats, batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and head.rpn.head.conv[0][0].weight.grad is not None


def test_open_clip_text_tower_from_a_local_file_matches_open_clip(tmp_path, no_network):
    open_clip = pytest.importorskip("open_clip")  # a dev dependency: installed in CI
    from gppf.models.text_encoders import build_text_encoder

    torch.manual_seed(0)
    model = open_clip.create_model("RN50").eval()  # random weights, written where a user's would be
    weights = tmp_path / "rn50_clip.pt"
    torch.save(model.state_dict(), weights)
    enc = build_text_encoder(f"open_clip:RN50:{weights}")
    ids, mask = enc.tokenize(["there is a car in the scene.", "x x x bus."])
    with torch.no_grad():
        assert torch.allclose(
            enc.encode(enc.embed(ids), ids, mask), model.encode_text(ids, normalize=True), atol=1e-5
        )
    assert all(not p.requires_grad for p in enc.parameters())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_text_encoder(f"open_clip:RN50:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="open_clip:<arch>:<local weights file>"):
        build_text_encoder("open_clip:RN50")


def test_head_convs_take_any_width():
    from task_plugins.segmentation.upernet import conv_gn_relu

    assert conv_gn_relu(8, 30, 3)(torch.randn(1, 8, 4, 4)).shape == (1, 30, 4, 4)  # 7 groups used to fail
