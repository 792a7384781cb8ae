"""The configs behind jobs/gppf_swint.py, whose docstring says what it runs. They live apart from the
entry point, so that other jobs, sweeps and tests import them (a job file only runs)."""

from __future__ import annotations

from gppf.config.job import OptimConfig
from gppf.presets.gppf_r50 import demo_config as r50_demo
from gppf.presets.gppf_r50 import full_config as r50_full

SWIN = "swin_tiny_patch4_window7_224"


def full_config(data_root: str):
    cfg = r50_full(data_root)
    cfg.name = "gppf_swint"
    cfg.backbone.name = SWIN
    cfg.backbone.grad_checkpointing = True  # "training settings are similar": Model Checkpoint too
    # No decay on norms, biases and relative-position tables: Swin's own recipe (unspecified by GPPF).
    cfg.optim = OptimConfig(
        name="adamw", lr=1e-4, weight_decay=0.05, warmup_steps=50_000, norm_bias_decay=False
    )
    # "We also use Cascade R-CNN for 4 detection tasks in the GPPF-SwinT model" (App. D.1).
    for name in ("coco", "lvis", "objects365", "openimages"):
        task = cfg.tasks[name]
        task["head"] = {**task.get("head", {}), "cascade": True}
    # LVIS's second stage retrains the final classifier of each of the three cascade stages.
    cfg.stages[-1].train_only = [LVIS_CASCADE_CLASSIFIERS]
    return cfg


LVIS_CASCADE_CLASSIFIERS = "heads.lvis.roi_heads.stages.*.cls_score.*"


def demo_config(demo_root: str):
    """The embedded default: the R50 demo's three tasks on a lego Swin-T shrunk through timm's own
    arguments (half the width, two blocks per stage, 4x4 windows: the 64 px inputs give 16/8/4/2
    tokens per side, which 4x4 windows tile exactly; detection's 128 px tile too)."""
    cfg = r50_demo(demo_root)
    cfg.name = "gppf_swint_demo"
    cfg.backbone.name = SWIN
    cfg.backbone.model_kwargs = {
        "embed_dim": 48,
        "depths": [2, 2, 2, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 4,
    }
    cfg.optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=30, norm_bias_decay=False)
    return cfg
