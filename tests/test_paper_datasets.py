"""jobs/gppf_r50.py --data-root DIR on a tiny fake copy of the paper's eight datasets (each in its
real layout and format) builds all eight tasks and runs a few SIMT steps on 4 workers: the 8-task
rehearsal (benchmarks/rehearsal.py) shortened."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.paper_layouts import make_paper_layouts

JOB = Path(__file__).resolve().parents[1] / "jobs" / "gppf_r50.py"
DET = ("coco", "lvis", "objects365", "openimages")
SEG = ("ade20k", "cocostuff", "voc")
STEPS = 4


def _job():
    spec = importlib.util.spec_from_file_location("gppf_r50_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eight_task_rehearsal_on_fake_paper_layouts(tmp_path, ray_session):
    """benchmarks/rehearsal.py shortened: the full config's eight tasks (App. D.1 weights and
    heads) on 4 workers with a tiny lego trunk; every task evaluates, no step stalls, and the
    report holds each task's data wait, the object-store peak and every worker's memory."""
    from benchmarks.rehearsal import rehearse

    root = make_paper_layouts(tmp_path / "data")
    report = rehearse(root, tmp_path / "runs", steps=STEPS, workers=4)
    assert report["steps"] == STEPS
    final = report["final_eval"]
    assert set(final) == {"in21k", *DET, *SEG}
    assert "top1" in final["in21k"]
    for t in DET:
        assert ("box_AP50" if t == "openimages" else "box_AP") in final[t]
    assert "oid_classes" in final["openimages"]  # scored by the challenge's AP50
    assert "mask_AP" in final["coco"] and "mask_AP" in final["lvis"] and "mask_AP" not in final["objects365"]
    # LVIS is scored by its federated AP, with frequency groups; COCO by COCOeval.
    assert any(f"box_AP{f}" in final["lvis"] for f in "rcf") and "box_APr" not in final["coco"]
    for t in SEG:
        assert 0.0 <= final[t]["mIoU"] <= 100.0
    tasks = report["tasks"]
    assert set(tasks) == {"in21k", *DET, *SEG}
    assert sum(w["worker_steps"] for w in tasks.values()) == 4 * STEPS  # every rank, every step
    assert report["max_step_s"] < 60  # after the first step (stream start-up), none stalls
    assert len(report["worker_rss"]) == 4 and all(m["peak_mb"] > 100 for m in report["worker_rss"].values())
    assert report["object_store_peak_mb"] > 0
    # The job's second stage (LVIS's class-balanced classifier) ran last, on LVIS alone.
    import json

    lines = [json.loads(x) for x in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    stage_of = {m["step"]: (m["stage"], m["task_choices"]) for m in lines if "task_choices" in m}
    assert [stage_of[s][0] for s in range(1, STEPS + 1)] == ["joint"] * (STEPS - 1) + ["lvis_cb"]
    lvis = list(json.loads((Path(report["run_dir"]) / "config.json").read_text())["tasks"]).index("lvis")
    assert {t for ranks in stage_of[STEPS][1] for t in ranks} == {lvis}


def test_missing_dataset_names_task_and_path(tmp_path):
    import shutil

    from gppf.launch.fit import resolve

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
