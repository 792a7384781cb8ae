"""jobs/gppf_r50.py --data-root DIR on a tiny fake copy of the paper's eight datasets (each in its
real layout and format) builds all eight tasks and runs a few SIMT steps with the paper's backbone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.paper_layouts import make_paper_layouts

JOB = Path(__file__).resolve().parents[1] / "jobs" / "gppf_r50.py"
DET = ("coco", "lvis", "objects365", "openimages")
SEG = ("ade20k", "cocostuff", "voc")


def _job():
    spec = importlib.util.spec_from_file_location("gppf_r50_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(run_dir: Path) -> list[str]:
    sets = [
        "tasks.*.batch_size=2",
        "tasks.*.input_size=64",
        "scaling.num_workers=2",
        "scaling.use_gpu=false",
        "scaling.cpus_per_worker=0.5",
        "train.steps=6",
        "train.log_every=3",
        "train.checkpoint_every=0",
        "train.eval_at_start=false",
        "train.eval_max_batches=1",
        "optim.warmup_steps=2",
        "data.min_rows_per_pass=8",
        "data.chunk_rows=8",
        f"run_dir={run_dir}",
    ]
    for t in DET:
        sets += [
            f"tasks.{t}.head.{k}={v}"
            for k, v in (
                ("fpn_channels", 16),
                ("conv_channels", 16),
                ("fc_channels", 32),
                ("anchor_size", 8),
                ("roi_batch_per_image", 32),
                ("rpn_post_nms_train", 64),
                ("rpn_post_nms_test", 32),
            )
        ]
    for t in SEG:
        sets += [f"tasks.{t}.head_channels=16", f"tasks.{t}.aux_channels=8"]
    return [a for s in sets for a in ("--set", s)]


def test_full_config_on_fake_paper_layouts(tmp_path, ray_session):
    root = make_paper_layouts(tmp_path / "data")
    job = _job()
    from gppf.cli import main

    metrics = main(
        job.__doc__, job.full_config, job.demo_config, ["--data-root", str(root), *_tiny(tmp_path / "runs")]
    )
    assert metrics["step"] == 6
    final = metrics["final_eval"]
    assert set(final) == {"in21k", *DET, *SEG}
    assert "top1" in final["in21k"]
    for t in DET:
        assert "box_AP" in final[t]
    assert "mask_AP" in final["coco"] and "mask_AP" in final["lvis"] and "mask_AP" not in final["objects365"]
    for t in SEG:
        assert 0.0 <= final[t]["mIoU"] <= 100.0


def test_missing_dataset_names_task_and_path(tmp_path):
    import shutil

    from gppf.runner import resolve

    root = make_paper_layouts(tmp_path / "data")
    shutil.rmtree(root / "ADEChallengeData2016")
    cfg = _job().full_config(str(root))
    with pytest.raises(
        FileNotFoundError, match=r"task 'ade20k': data root .*ADEChallengeData2016 does not exist"
    ):
        resolve(cfg)
    del cfg.tasks["ade20k"]
    (root / "coco" / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"task 'coco': annotation file .*instances_val2017\.json does not"
    ):
        resolve(cfg)
