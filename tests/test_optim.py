"""Optimizer settings of the papers: step decay (App. D.2, VTD), weight decay divided by the lr
(App. D.2's grid), no decay on norms, biases and position tables, and Swin's output-stage norms
(Swin's detection / segmentation backbone)."""

from __future__ import annotations

import pytest
import timm
import torch

from gppf.config.base import ConfigError
from gppf.config.job import LegoConfig, OptimConfig, StageConfig
from gppf.engine.optim import build_optimizer, warmup_step
from gppf.engine.stages import StagePlan
from gppf.models.swin import LegoSwin, StaticSwin

SWIN = "swin_tiny_patch4_window7_224"
SMALL = {"embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 3, 6], "window_size": 4}


def test_step_schedule_decays_at_the_given_steps():
    # UODB VOC (Table 8): 18k steps, x0.1 at 12k and 16k, after a warmup
    plan = StagePlan([], {"a": 1.0}, 18_000, 500, decay_steps=[12_000, 16_000], decay_factor=0.1)
    assert plan.lr_multiplier(0) == pytest.approx(1 / 500) and plan.lr_multiplier(499) == 1.0
    assert [plan.lr_multiplier(s) for s in (500, 11_999, 12_000, 15_999, 16_000, 17_999)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    assert warmup_step(10, 0, [5, 8]) == pytest.approx(0.01)
    # A stage's own schedule stays its cosine; its lr_factor multiplies the step schedule.
    staged = StagePlan([StageConfig("a", 10, lr_factor=0.5)], {"a": 1.0}, 10, 0, decay_steps=[5])
    assert staged.lr_multiplier(4) == 0.5 and staged.lr_multiplier(5) == pytest.approx(0.05)
    with pytest.raises(ConfigError, match=r"decay_steps must be increasing"):
        OptimConfig(schedule="step", decay_steps=[16_000, 12_000])
    with pytest.raises(ConfigError, match=r"optim.schedule must be"):
        OptimConfig(schedule="poly")


def test_weight_decay_divided_by_lr():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=1e-4, decay_divided_by_lr=True))
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-2)  # lr x wd per step = 1e-4
    plain = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=1e-4))
    assert plain.param_groups[0]["weight_decay"] == pytest.approx(1e-4)


def _decay_of(model, opt) -> dict[str, float]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_swin_norms_biases_and_position_tables_get_no_weight_decay():
    trunk = StaticSwin(SWIN, SMALL)
    opt = build_optimizer(trunk, OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, norm_bias_decay=False))
    decay = _decay_of(trunk, opt)
    assert len(decay) == len(list(trunk.parameters()))
    for name, wd in decay.items():
        exempt = "norm" in name or name.endswith(".bias") or "relative_position_bias_table" in name
        assert wd == (0.0 if exempt else 0.05), name
    assert decay["out_norms.0.weight"] == 0.0 and decay["body.layers.0.blocks.0.attn.qkv.weight"] == 0.05
    everything = _decay_of(trunk, build_optimizer(trunk, OptimConfig(name="adamw", weight_decay=0.05)))
    assert set(everything.values()) == {0.05}  # the default decays everything, as before


def test_swin_output_stages_are_layer_normed_and_routes_still_export_to_timm():
    torch.manual_seed(0)
    for trunk in (
        StaticSwin(SWIN, SMALL),
        LegoSwin(SWIN, ["a"], LegoConfig(num_units=2, mode="hard"), SMALL),
    ):
        assert len(trunk.out_norms) == 3
        trunk.eval()
        feats = trunk(torch.randn(2, 3, 64, 64), "a")
        for f in feats:  # every stage normalised over channels at each position (LN at init)
            assert f.mean(1).abs().max() < 1e-4 and (f.var(1, unbiased=False) - 1).abs().max() < 1e-2
        with torch.no_grad():
            trunk.out_norms[0].weight.fill_(2.0)
        assert trunk(torch.randn(1, 3, 64, 64), "a")[0].var(1, unbiased=False).mean() > 3.0
        ref = timm.create_model(SWIN, pretrained=False, num_classes=0, **SMALL)
        export = trunk.export("a") if isinstance(trunk, LegoSwin) else trunk.export()
        ref.load_state_dict(export, strict=True)  # the output norms are the trunk's, not timm's
        assert not any(k.startswith("out_norms") for k in export)


def test_gppf_swint_full_config_uses_swins_decay_rule(tmp_path):
    import importlib.util
    from pathlib import Path

    from tests.paper_layouts import make_paper_layouts

    path = Path(__file__).resolve().parents[1] / "jobs" / "gppf_swint.py"
    spec = importlib.util.spec_from_file_location("gppf_swint_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = job.full_config(str(make_paper_layouts(tmp_path / "data")))
    assert cfg.optim.name == "adamw" and cfg.optim.weight_decay == 0.05 and not cfg.optim.norm_bias_decay
    # LVIS's second stage on the cascade head retrains each stage's final classifier.
    assert cfg.stages[-1].name == "lvis_cb" and cfg.tasks["lvis"]["head"]["cascade"]
    assert cfg.stages[-1].train_only == ["heads.lvis.roi_heads.stages.*.cls_score.*"]
