"""The shipped full configs hold the papers' settings (GPPF App. D.1; docs/fidelity.md's rows)."""

from __future__ import annotations

from pathlib import Path

from tests.test_jobs import load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"
ORDER = ("in21k", "coco", "lvis", "objects365", "openimages", "ade20k", "cocostuff", "voc")


def test_gppf_r50_full_config_is_app_d1(tmp_path):
    cfg = load_job(JOBS / "gppf_r50.py").full_config(str(tmp_path))
    t = cfg.tasks
    assert [t[n]["sampling_weight"] for n in ORDER] == [4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0]
    assert [t[n]["batch_size"] for n in ORDER] == [96, 8, 8, 12, 12, 8, 8, 8]
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.momentum) == ("sgd", 0.16, 5e-4, 0.9)
    joint = cfg.stages[0]
    assert (joint.steps, joint.warmup_steps, joint.schedule) == (500_000, 50_000, "stage")
    assert cfg.scaling.num_workers == 56 and cfg.backbone.grad_checkpointing
    lego = cfg.backbone.lego
    assert (lego.num_units, lego.mode, lego.tau_start, lego.tau_end, lego.tau_decay_fraction) == (
        2,
        "soft",
        5.0,
        0.01,
        0.9,
    )
    assert not lego.shared_stem  # the stem is a lego layer (App. B plots its selection)
    # IN-21K's augmentations, LSJ 1024 with copy-paste on COCO and LVIS, Faster R-CNN on the box-only sets
    assert (
        t["in21k"]["mixup"],
        t["in21k"]["cutmix"],
        t["in21k"]["reprob"],
        t["in21k"]["label_smoothing"],
    ) == (
        0.8,
        1.0,
        0.25,
        0.1,
    )
    assert t["coco"]["copy_paste"] == t["lvis"]["copy_paste"] == 1.0
    assert t["objects365"]["masks"] is False and t["openimages"]["masks"] is False
    assert t["lvis"]["evaluation"] == "lvis" and t["openimages"]["evaluation"] == "oid_challenge"
    assert t["ade20k"]["reduce_zero_label"] and all(t[n].get("input_size") == 512 for n in ORDER[5:])
    assert cfg.stages[1].name == "lvis_cb" and cfg.stages[1].tasks == ["lvis"]


def test_gppf_swint_full_config_is_app_d1(tmp_path):
    cfg = load_job(JOBS / "gppf_swint.py").full_config(str(tmp_path))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-4, 0.05)
    assert all(cfg.tasks[n]["head"]["cascade"] for n in ("coco", "lvis", "objects365", "openimages"))
    assert cfg.backbone.grad_checkpointing and cfg.backbone.name == "swin_tiny_patch4_window7_224"
