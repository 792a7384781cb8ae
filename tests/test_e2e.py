"""End-to-end Ray Train runs: 2 workers, 2 tasks, checkpoint, restart from it, continue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    MultiTaskMetricsConfig,
    OptimConfig,
    ScalingConfig,
    StreamConfig,
    TrainConfig,
)
from gppf.engine.sampler import sample_task
from gppf.io.checkpoint import load_checkpoint
from gppf.launch.fit import fit
from gppf.tools.tables import results_table
from tests.tasks_for_tests import task_entries


def _config(root: Path, run_dir: Path, steps: int, **train) -> JobConfig:
    entries = task_entries(root)
    return JobConfig(
        name="e2e",
        run_dir=str(run_dir),
        tasks={"cls": entries["cls_folder"], "seg": entries["seg"]},
        backbone=BackboneConfig(name="resnet10t"),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        train=TrainConfig(
            steps=steps,
            log_every=3,
            checkpoint_every=3,
            eval_max_batches=1,
            collective_timeout_s=120,
            **train,
        ),
        data=StreamConfig(min_rows_per_pass=32, chunk_rows=32),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
    )


def test_train_checkpoint_restart_continue(demo_root, ray_session, tmp_path):
    cfg = _config(demo_root, tmp_path, steps=6)
    cfg.metrics = MultiTaskMetricsConfig(
        groups={"all": ["cls/top1", "seg/mIoU"]}, baselines={"cls/top1": 50.0}
    )
    first = fit(cfg)
    assert first["step"] == 6 and first["start_step"] == 0
    assert "data_wait_s/rank1" in first and 0.0 <= first["data_wait_fraction"] < 1.0
    tasks = {"cls", "seg", "multitask"}
    assert set(first["final_eval"]) == tasks and set(first["initial_eval"]) == tasks
    final = first["final_eval"]
    assert final["multitask"]["VTDA"] == pytest.approx((final["cls"]["top1"] + final["seg"]["mIoU"]) / 2)
    assert first["val/multitask/delta_m"] == pytest.approx(2 * (final["cls"]["top1"] - 50.0))  # Tune reads it
    ckpt = first["checkpoint"]
    state = load_checkpoint(ckpt)  # weights_only=True load
    assert state["step"] == 6 and len(state["streams"]) == 2
    run_dir = Path(first["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["tasks"]["cls"]["num_classes"] == 4
    assert any((run_dir / "tensorboard").iterdir())
    assert "cls" in results_table(first) and "mIoU" in results_table(first) and "VTDA" in results_table(first)

    second = fit(_config(demo_root, tmp_path, steps=9), resume_from=ckpt)
    assert second["start_step"] == 6  # continued at the checkpointed step, not from 0
    assert second["step"] == 9
    assert second["initial_eval"] == first["initial_eval"]  # carried in the checkpoint


def test_ablation_switches_run(demo_root, ray_session, tmp_path):
    cfg = _config(demo_root, tmp_path, steps=6, sampler="per_batch")
    cfg.train.log_every = 6
    cfg.backbone.cross_task_bn = False  # local-BN ablation in the same run
    out = fit(cfg)
    assert out["step"] == 6
    # Per-batch sampling: at each step both workers ran the task rank 0 would run.
    weights = [1.0, 1.0]
    per_batch = [sample_task(weights, 0, s, 0, per_batch=True) for s in range(6)]
    simt = [sample_task(weights, 0, s, r) for s in range(6) for r in range(2)]
    expected = {name: 2 * per_batch.count(i) for i, name in enumerate(["cls", "seg"])}
    assert expected != {name: simt.count(i) for i, name in enumerate(["cls", "seg"])}  # the check can fail
    assert {name: out[f"worker_steps/{name}"] for name in expected} == expected


def test_lego_backbone_hard_routes_train_end_to_end(demo_root, ray_session, tmp_path):
    cfg = _config(demo_root, tmp_path, steps=4)
    cfg.backbone.kind = "lego"
    cfg.backbone.lego.mode = "hard"
    out = fit(cfg)
    assert out["step"] == 4
    routes = out["routes"]
    assert set(routes) == {"cls", "seg"}
    n_layers = len(routes["cls"]["route"])
    assert n_layers == 1 + 4  # stem + resnet10t's four blocks
    for r in routes.values():
        assert all(abs(sum(p) - 1.0) < 1e-5 for p in r["probs"])
    state = load_checkpoint(out["checkpoint"])
    assert any(".controller.logits.cls" in k for k in state["model"])
    assert (Path(out["run_dir"]) / "selection.png").is_file()  # the selection plot of the run
