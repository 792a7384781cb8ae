"""GPPF-SwinT's setting on 2 ranks: one lego Swin-T serves three tasks at three input sizes that
are not multiples of one window grid (100, 96, 64 px) in one SIMT run; afterwards each task's
exported route strict-loads into timm's swin_tiny_patch4_window7_224 and matches its outputs at
224 px."""

from __future__ import annotations

import timm
import torch

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    LegoConfig,
    OptimConfig,
    ScalingConfig,
    StreamConfig,
    TrainConfig,
)
from gppf.launch.fit import fit
from gppf.tools.export import load_trunk
from tests.tasks_for_tests import task_entries

SWIN = "swin_tiny_patch4_window7_224"
SIZES = {"cls": 100, "seg": 96, "det": 64}  # patch 4 x window 7 = 28 px: none is a multiple


def test_lego_swin_three_input_sizes_then_exact_export(demo_root, ray_session, tmp_path):
    entries = task_entries(demo_root)
    tasks = {
        "cls": {**entries["cls_folder"], "input_size": SIZES["cls"], "batch_size": 4},
        "seg": {**entries["seg"], "input_size": SIZES["seg"], "batch_size": 2},
        "det": {**entries["det"], "input_size": SIZES["det"]},
    }
    cfg = JobConfig(
        name="swin3",
        run_dir=str(tmp_path),
        tasks=tasks,
        backbone=BackboneConfig(name=SWIN, kind="lego", lego=LegoConfig(num_units=2, mode="hard")),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=1),
        train=TrainConfig(steps=6, log_every=6, checkpoint_every=0, eval_at_start=False, eval_max_batches=1),
        data=StreamConfig(min_rows_per_pass=16, chunk_rows=16, prefetch_batches=1),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
    )
    out = fit(cfg)
    assert out["step"] == 6
    for task in SIZES:  # every input size really ran (6 steps x 2 ranks over 3 tasks)
        assert out[f"worker_steps/{task}"] > 0, task
        assert out[f"loss/{task}"] == out[f"loss/{task}"]  # finite, not NaN
    assert set(out["final_eval"]) == set(SIZES)

    trunk, _ = load_trunk(out["checkpoint"])
    x = torch.randn(1, 3, 224, 224)
    for task in SIZES:
        ref = timm.create_model(SWIN, pretrained=False, num_classes=0)
        ref.load_state_dict(trunk.export(task), strict=True)
        ref.eval()
        with torch.no_grad():
            expected = ref.forward_features(x).permute(0, 3, 1, 2)
            torch.testing.assert_close(trunk(x, task)[-1], expected, atol=1e-5, rtol=1e-5)
    assert set(out["routes"]) == set(SIZES)
