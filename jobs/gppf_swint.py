"""GPPF-SwinT: SIMT multi-task pre-training of a lego Swin-T on the paper's eight datasets.

Submit to a Ray cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/gppf_swint.py --data-root /data/gppf

or run locally with no arguments for the embedded default (local Ray, generated demo data, a
narrow Swin-T with 4x4 windows, a shrunken schedule). Settings are those of GPPF-R50 (see
jobs/gppf_r50.py) except, per App. D.1, AdamW with lr 1e-4 and weight decay 0.05 (none on norms,
biases and relative-position tables, as Swin's own recipe), and Cascade R-CNN heads for the four
detection tasks. The Swin-T backbone uses LayerNorm, so cross-task BN has
nothing to do; SIMT and the masked allreduce still do.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import demo_config as r50_demo  # noqa: E402
from gppf_r50 import full_config as r50_full  # noqa: E402

from gppf.cli import main  # noqa: E402
from gppf.job_config import OptimConfig  # noqa: E402

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


if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
