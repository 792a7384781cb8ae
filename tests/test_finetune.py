"""Sparse finetuning (GPPF §3.3) of the staged test run's lego checkpoint on a new task: dynamic
(new controller, routes exported as plain backbones), fixed-path on a named task's route, and
"retrain" on the route a dynamic finetuning found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from gppf.config.base import ConfigError
from gppf.config.job import (
    BackboneConfig,
    FinetuneConfig,
    JobConfig,
    OptimConfig,
    ScalingConfig,
    StreamConfig,
    TrainConfig,
)
from gppf.launch.finetune_config import prepare
from gppf.launch.fit import fit
from gppf.tools.export import load_trunk
from tests.tasks_for_tests import task_entries


def _job(root: Path, run_dir: Path, finetune: FinetuneConfig) -> JobConfig:
    return JobConfig(
        name="ft",
        run_dir=str(run_dir),
        tasks={"new_seg": task_entries(root)["seg_simple"]},
        backbone=BackboneConfig(name="resnet10t"),
        finetune=finetune,
        optim=OptimConfig(lr=0.02, warmup_steps=1),
        train=TrainConfig(steps=4, log_every=2, checkpoint_every=0, eval_max_batches=1),
        data=StreamConfig(min_rows_per_pass=16, chunk_rows=16, prefetch_batches=1),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
    )


def _config(run: dict) -> dict:
    return json.loads((Path(run["run_dir"]) / "config.json").read_text())


def test_dynamic_fixed_and_retrain(staged_run, demo_root, tmp_path):
    result, _, _ = staged_run
    ckpt = result["checkpoint"]

    dynamic = fit(_job(demo_root, tmp_path, FinetuneConfig(mode="dynamic", checkpoint=ckpt)))
    cfg = _config(dynamic)["backbone"]
    assert cfg["kind"] == "lego" and cfg["init_from"] == ckpt and cfg["lego"]["tau_decay_fraction"] == 0.5
    assert dynamic["tau"] == pytest.approx(0.01)  # τ reached its end half way and stayed
    route_file = Path(dynamic["run_dir"]) / "route_new_seg.pt"
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    plain.load_state_dict(torch.load(route_file, weights_only=True), strict=True)
    assert dynamic["final_eval"]["new_seg"]["mIoU"] >= 0.0

    # Fixed path on a named task's route: prepare() extracts it (the training of a static backbone
    # from a route file is the retrain below; tests/test_jobs.py runs the job's fixed finetuning).
    fixed_dir = tmp_path / "fixed"
    fixed_dir.mkdir()
    fixed = prepare(
        _job(demo_root, tmp_path, FinetuneConfig(mode="fixed", checkpoint=ckpt, route="det")), fixed_dir
    )
    extracted = fixed_dir / "route_det.pt"
    assert fixed.backbone.kind == "static" and fixed.backbone.init_from == str(extracted)
    trunk, _ = load_trunk(ckpt)
    expected = trunk.export("det")
    got = torch.load(extracted, weights_only=True)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    retrain = fit(_job(demo_root, tmp_path, FinetuneConfig(mode="fixed", route=str(route_file))))
    assert _config(retrain)["backbone"]["init_from"] == str(route_file)
    assert retrain["step"] == 4 and "new_seg" in retrain["final_eval"]


def test_bad_finetune_settings_are_named(staged_run, demo_root, tmp_path):
    result, _, _ = staged_run
    ckpt = result["checkpoint"]
    with pytest.raises(ConfigError, match=r"the checkpoint has no task 'coco'; its tasks: cls, det, seg"):
        prepare(
            _job(demo_root, tmp_path, FinetuneConfig(mode="fixed", checkpoint=ckpt, route="coco")), tmp_path
        )
    with pytest.raises(ConfigError, match=r"finetune.mode=dynamic needs a gppf checkpoint"):
        prepare(_job(demo_root, tmp_path, FinetuneConfig(mode="dynamic")), tmp_path)
    with pytest.raises(ConfigError, match=r"config.finetune.mode must be 'dynamic' or 'fixed'"):
        FinetuneConfig(mode="sparse")


def test_head_from_another_task_loads_everything_but_the_predictor(staged_run, demo_root, tmp_path):
    """GPPF Table 5: UODB's detection heads start from Objects365's, "but we do not load the final
    prediction layer". Here a new detection task starts from the staged checkpoint's det head."""
    from gppf.engine.trainer import Trainer
    from gppf.io.checkpoint import load_checkpoint, load_weights

    result, _, _ = staged_run
    ckpt = result["checkpoint"]
    finetune = FinetuneConfig(mode="fixed", checkpoint=ckpt, route="det", head_from="det")
    cfg = _job(demo_root, tmp_path, finetune)
    cfg.tasks = {"uodb": task_entries(demo_root)["det"]}
    prepared = prepare(cfg, tmp_path)
    assert prepared.model.init_map == {"heads.det.*": "heads.uodb.*"}
    assert prepared.model.init_skip == ["heads.uodb.roi_heads.box_predictor.*"]

    t = Trainer(prepared, torch.device("cpu"))
    plain = Trainer(prepared, torch.device("cpu"), initialise=False)  # same seed: the initial weights
    (report, *_) = t.init_reports
    source = load_checkpoint(ckpt)["model"]
    head = {k: v for k, v in t.model.state_dict().items() if k.startswith("heads.uodb.")}
    predictor = {k for k in head if ".box_predictor." in k}
    assert predictor and set(report.skipped) == predictor  # reported as left out
    for k, v in head.items():
        if k in predictor:  # as initialised
            assert torch.equal(v, plain.model.state_dict()[k]), k
        else:  # the det head's weights, under the new task's name
            assert torch.equal(v, source[k.replace("heads.uodb.", "heads.det.")]), k
    assert (
        "left out by model.init_skip (4)" in report.summary()
        and "heads.det.* -> heads.uodb.*" in report.summary()
    )

    # A predictor of another shape (another number of classes) is an error unless skipped.
    state = {
        k.replace("heads.det.", "heads.src."): v for k, v in source.items() if k.startswith("heads.det.")
    }
    state["heads.src.roi_heads.box_predictor.cls_score.weight"] = torch.zeros(9, 4)
    with pytest.raises(
        ValueError, match=r"heads\.uodb\.roi_heads\.box_predictor\.cls_score\.weight has shape"
    ):
        load_weights(plain.model, state, "src", {"heads.src.*": "heads.uodb.*"})
    report = load_weights(
        plain.model, state, "src", {"heads.src.*": "heads.uodb.*"}, ["heads.uodb.*.box_predictor.*"]
    )
    assert len(report.skipped) == 4
    with pytest.raises(ConfigError, match=r"the checkpoint has no task 'objects365'"):
        prepare(
            _job(
                demo_root, tmp_path, FinetuneConfig(mode="dynamic", checkpoint=ckpt, head_from="objects365")
            ),
            tmp_path,
        )
