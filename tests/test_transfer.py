"""GPPF App. D.2's transfer settings (jobs/finetune.py --target ...) resolve on fake copies of
their datasets from the staged test run's lego checkpoint, with the paper's settings; KITTI depth
and UODB VOC train and evaluate shrunk; jobs/tune_downstream.py runs its lr x weight-decay grid."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from gppf.launch.finetune_config import prepare
from gppf.launch.fit import fit, resolve
from tests.paper_layouts import make_transfer_layouts
from tests.test_jobs import load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.fixture(scope="module")
def finetune_job():
    return load_job(JOBS / "finetune.py")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, demo_root):
    return make_transfer_layouts(tmp_path_factory.mktemp("transfer"), demo_root)


def _from_checkpoint(cfg, ckpt):
    """The staged run's checkpoint stands for a GPPF-R50 one: its det task for COCO and Objects365."""
    cfg.finetune.checkpoint, cfg.finetune.route = ckpt, "det"
    if cfg.finetune.head_from:
        cfg.finetune.head_from = "det"
    return cfg


def test_every_target_resolves_with_the_papers_settings(finetune_job, layouts, staged_run, tmp_path):
    ckpt = staged_run[0]["checkpoint"]
    configs = {}
    for target in finetune_job.TARGETS:
        cfg = _from_checkpoint(finetune_job.target_config(target, str(layouts)), ckpt)
        if target.startswith("uodb_") and target != "uodb_voc":
            cfg.tasks["uodb"]["data_root"] = str(layouts / "uodb" / "voc")  # one fake UODB dataset
        run_dir = tmp_path / target
        run_dir.mkdir()
        configs[target] = resolve(prepare(cfg, run_dir))
    # Table 8 and App. D.2's UODB settings: 16 images a step, SGD 0.01 decayed x0.1 twice, test size,
    # anchors, the head from Objects365's but its predictor.
    voc, lesion, wider = configs["uodb_voc"], configs["uodb_deeplesion"], configs["uodb_widerface"]
    assert voc.scaling.num_workers * voc.tasks["uodb"]["batch_size"] == 16
    assert (voc.optim.lr, voc.optim.momentum, voc.optim.weight_decay) == (0.01, 0.9, 4e-5)
    assert (
        voc.optim.schedule == "step"
        and voc.optim.decay_steps == [12_000, 16_000]
        and voc.train.steps == 18_000
    )
    assert voc.tasks["uodb"]["test_size"] == 800 and lesion.tasks["uodb"]["test_size"] == 512
    assert voc.tasks["uodb"]["head"]["anchor_size"] == 32 and wider.tasks["uodb"]["head"]["anchor_size"] == 16
    assert voc.model.init_map == {"heads.det.*": "heads.uodb.*"}
    assert voc.model.init_skip == ["heads.uodb.roi_heads.box_predictor.*"]
    assert voc.backbone.kind == "static" and voc.backbone.init_from.endswith("route_det.pt")
    # Table 4 / App. D.2's depth recipe on KITTI's Eigen split with Garg's crop.
    kitti = configs["kitti_depth"]
    task = kitti.tasks["kitti"]
    assert kitti.scaling.num_workers * task["batch_size"] == 32 and task["loss_weight"] == 0.1
    assert (kitti.optim.name, kitti.optim.lr, kitti.optim.weight_decay, kitti.optim.momentum) == (
        "sgd",
        0.01,
        1e-8,
        0.9,
    )
    assert (
        kitti.train.steps == 30_000 and kitti.optim.warmup_steps == 1000 and kitti.optim.schedule == "cosine"
    )
    assert kitti.backbone.drop_path_rate == 0.4  # stochastic depth, over the checkpoint's backbone
    assert task["crop_size"] == [352, 704] and task["kb_crop"] == [352, 1216] and task["eval_crop"] == "garg"
    # Table 6: 300 epochs at batch 2048 with 20 warmup epochs, counted by gppf.engine.epochs.
    in1k = configs["in1k"]
    per_step = in1k.scaling.num_workers * in1k.tasks["in1k"]["batch_size"]
    assert per_step == 2048 and in1k.train.steps == math.ceil(300 * 1_281_167 / 2048)
    assert in1k.optim.warmup_steps == math.ceil(20 * 1_281_167 / 2048) and in1k.optim.lr == 0.01
    assert in1k.tasks["in1k"]["mixup"] == 0.8 and in1k.tasks["in1k"]["eval_resize"] == 256
    # Table 7's protocol: 20000 iterations at batch 256, weight decay divided by the lr.
    down = configs["downstream_cls"]
    assert down.train.steps == 20_000 and down.scaling.num_workers * down.tasks["cls"]["batch_size"] == 256
    assert down.optim.decay_divided_by_lr and down.tasks["cls"]["eval_resize"] == 256


def _shrunk(cfg, run_dir, steps=2):
    cfg.run_dir = str(run_dir)
    cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker = 1, False, 0.5
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = steps, 1, 0
    cfg.train.eval_at_start, cfg.train.eval_max_batches, cfg.train.eval_every = False, 1, 0
    cfg.optim.warmup_steps = 1
    cfg.data.min_rows_per_pass, cfg.data.chunk_rows, cfg.data.prefetch_batches = 4, 4, 1
    return cfg


def test_kitti_depth_and_uodb_train_and_evaluate_shrunk(
    finetune_job, layouts, staged_run, tmp_path, ray_session
):
    ckpt = staged_run[0]["checkpoint"]
    kitti = _shrunk(_from_checkpoint(finetune_job.target_config("kitti_depth", str(layouts)), ckpt), tmp_path)
    kitti.tasks["kitti"]["batch_size"] = 2
    out = fit(kitti)
    metrics = out["final_eval"]["kitti"]
    assert out["step"] == 2 and math.isfinite(metrics["rmse"]) and 0 <= metrics["d1"] <= 1

    voc = _from_checkpoint(finetune_job.target_config("uodb_voc", str(layouts)), ckpt)
    voc = _shrunk(voc, tmp_path)
    voc.optim.decay_steps = [1]  # the step schedule, shrunk
    voc.tasks["uodb"].update({"input_size": 128, "test_size": 96, "test_max_size": 160})
    # The staged run's det head is narrow: the UODB head takes its sizes to load it.
    staged_det = json.loads((Path(staged_run[1]) / "config.json").read_text())["tasks"]["det"]
    voc.tasks["uodb"]["head"] = {
        **staged_det["head"],
        "anchor_size": voc.tasks["uodb"]["head"]["anchor_size"],
    }
    out = fit(voc)
    assert out["step"] == 2 and "box_AP50" in out["final_eval"]["uodb"]
    assert out["lr"] == pytest.approx(0.001)  # x0.1 after step 1


def test_downstream_grid_runs_every_point(layouts, tmp_path, ray_session, demo_root):
    job = load_job(JOBS / "tune_downstream.py")
    assert len(job.LRS) == 7 and job.LRS[0] == pytest.approx(1e-6) and job.LRS[-1] == pytest.approx(0.1)
    assert (
        job.WEIGHT_DECAYS[0] == 0.0
        and len(job.WEIGHT_DECAYS) == 8
        and job.WEIGHT_DECAYS[-1] == pytest.approx(1e-3)
    )
    job.DEMO_LRS = [0.1]  # two grid points (weight decay 0 and not) keep the test short
    argv = ["--demo-root", str(demo_root), "--demo-images", "48", "--name", "grid"]
    sets = [
        "train.steps=2",
        "train.log_every=1",
        "train.eval_max_batches=1",
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        f"run_dir={tmp_path}",
    ]
    argv += [a for s in sets for a in ("--set", s)] + ["--sweep", f"sweep_dir={tmp_path / 'sweeps'}"]
    summary = job.run(argv)
    assert summary["complete"]
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "grid" / "results.csv")))
    points = {(float(r["optim.lr"]), float(r["optim.weight_decay"])) for r in rows}
    assert points == {(lr, wd) for lr in job.DEMO_LRS for wd in job.DEMO_WEIGHT_DECAYS}


def test_downstream_test_transform_is_torchvisions_resize_then_center_crop():
    """App. D.2's test transform (shorter side to 256, centre 224): `eval_resize` equals
    torchvision's Resize(256) + CenterCrop(224) on the same PIL image, pixel for pixel."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from task_plugins.classification import _resize_then_center_crop

    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    rng = np.random.default_rng(0)
    for w, h in ((500, 375), (333, 500), (300, 300), (257, 1000)):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8))
        ours = np.asarray(_resize_then_center_crop(img, 256, 224))
        assert ours.shape == (224, 224, 3) and np.array_equal(ours, np.asarray(reference(img)))
