"""BDD100K: a tiny fake copy in the release's layout, converted by gppf.tools.bdd100k_to_coco
(its main() and `python -m`), the three tasks of gppf.presets.bdd100k checked, preprocessed and
trained for a few SIMT steps; converter errors name the file, the frame and the label."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.presets.bdd100k import bdd100k_tasks
from gppf.tools.bdd100k_to_coco import CATEGORIES, convert
from gppf.tools.bdd100k_to_coco import main as bdd100k_to_coco

REPO = Path(__file__).resolve().parents[1]
SIZE = (96, 54)  # BDD100K's 1280x720 aspect, shrunk


def _frame(rng: np.random.Generator, stem: str, k: int) -> tuple[Image.Image, dict]:
    """A noise image with two filled boxes and its Scalabel frame."""
    img = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    labels = []
    for j, cat in enumerate((CATEGORIES[k % 10], CATEGORIES[(k + 3) % 10])):
        x1, y1 = int(rng.integers(0, 50)), int(rng.integers(0, 25))
        x2, y2 = x1 + int(rng.integers(12, 40)), y1 + int(rng.integers(10, 25))
        draw.rectangle((x1, y1, x2, y2), fill=(40 * j, 200, 255 - 40 * j))
        labels.append(
            {
                "id": str(100 * k + j),
                "category": cat,
                "attributes": {"occluded": False, "truncated": False, "trafficLightColor": "NA"},
                "manualShape": True,
                "box2d": {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)},
            }
        )
    frame = {
        "name": f"{stem}.jpg",
        "attributes": {"weather": "clear", "timeofday": "daytime", "scene": "city street"},
        "timestamp": 10000,
        "labels": labels,
    }
    return img, frame


def make_bdd100k_layout(root: Path, seed: int = 0) -> Path:
    """root/bdd100k as the release's archives unpack (see gppf.presets.bdd100k)."""
    rng = np.random.default_rng(seed)
    bdd = root / "bdd100k"
    for split, n in (("train", 4), ("val", 2)):
        images = bdd / "images" / "100k" / split
        drivable = bdd / "labels" / "drivable" / "masks" / split
        images.mkdir(parents=True)
        drivable.mkdir(parents=True)
        frames = []
        for i in range(n):
            stem = f"{i:04x}{split[0]}77c-{i:04x}be58"
            img, frame = _frame(rng, stem, i)
            img.save(images / f"{stem}.jpg", quality=90)
            Image.fromarray(rng.choice(np.array([0, 1, 2], np.uint8), size=(SIZE[1], SIZE[0]))).save(
                drivable / f"{stem}.png"
            )
            frames.append(frame)
        frames[0]["labels"].append(  # a det_20 category outside the 10 classes: skipped, counted
            {"id": "9001", "category": "other vehicle", "box2d": {"x1": 1.0, "y1": 1.0, "x2": 9.0, "y2": 9.0}}
        )
        frames[0]["labels"][0]["attributes"]["crowd"] = True
        del frames[-1]["labels"]  # a frame without labels: a negative image
        (bdd / "labels" / "det_20").mkdir(parents=True, exist_ok=True)
        (bdd / "labels" / "det_20" / f"det_{split}.json").write_text(json.dumps(frames))
    for split, n in (("train", 3), ("val", 2)):
        images = bdd / "images" / "10k" / split
        masks = bdd / "labels" / "sem_seg" / "masks" / split
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(n):
            stem = f"{i:04x}a4c0-d4dff{split[0]}ad"
            Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(
                images / f"{stem}.jpg"
            )
            ids = np.array([0, 2, 8, 10, 13, 18, 255], np.uint8)
            Image.fromarray(rng.choice(ids, size=(SIZE[1], SIZE[0]))).save(masks / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def bdd_root(tmp_path_factory) -> Path:
    """The fake layout with both COCO files made: train by main() reading sizes from the images,
    val by `python -m gppf.tools.bdd100k_to_coco` told the size."""
    root = make_bdd100k_layout(tmp_path_factory.mktemp("bdd"))
    bdd = root / "bdd100k"
    bdd100k_to_coco(
        [
            "--labels",
            str(bdd / "labels/det_20/det_train.json"),
            "--images",
            str(bdd / "images/100k/train"),
            "--out",
            str(bdd / "annotations/bdd100k_det_train.json"),
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    cmd = [sys.executable, "-m", "gppf.tools.bdd100k_to_coco", "--labels", "labels/det_20/det_val.json"]
    cmd += ["--out", "annotations/bdd100k_det_val.json", "--image-size", f"{SIZE[0]}x{SIZE[1]}"]
    done = subprocess.run(cmd, cwd=bdd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote annotations/bdd100k_det_val.json: 2 images, 2 boxes" in done.stdout
    assert "skipped 1 labels of other categories: 1 'other vehicle'" in done.stderr
    return root


def test_converter_writes_coco(bdd_root):
    bdd = bdd_root / "bdd100k"
    frames = json.loads((bdd / "labels/det_20/det_train.json").read_text())
    for split in ("train", "val"):
        doc = json.loads((bdd / f"annotations/bdd100k_det_{split}.json").read_text())
        assert doc["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
        assert [c["name"] for c in doc["categories"]][:3] == ["pedestrian", "rider", "car"]
        assert doc["info"]["skipped_labels"] == {"other vehicle": 1}
        assert all((im["width"], im["height"]) == SIZE for im in doc["images"])
        assert len(doc["images"]) == (4 if split == "train" else 2)
    doc = json.loads((bdd / "annotations/bdd100k_det_train.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == [f["name"] for f in frames]
    assert len(doc["annotations"]) == 6  # 2 boxes in 3 frames; the 4th has no labels
    first = frames[0]["labels"][0]
    b = first["box2d"]
    ann = doc["annotations"][0]
    assert ann["bbox"] == [b["x1"], b["y1"], b["x2"] - b["x1"] + 1, b["y2"] - b["y1"] + 1]
    assert ann["category_id"] == CATEGORIES.index(first["category"]) + 1
    assert ann["iscrowd"] == 1 and doc["annotations"][1]["iscrowd"] == 0
    assert not [a for a in doc["annotations"] if a["image_id"] == doc["images"][-1]["id"]]


def test_three_tasks_check_and_preprocess(bdd_root):
    entries = bdd100k_tasks(bdd_root, det_input_size=64, seg_input_size=64, drivable_input_size=64)
    assert set(entries) == {"bdd_det", "bdd_seg", "bdd_drivable"}
    expected = {"bdd_det": 10, "bdd_seg": 19, "bdd_drivable": 3}
    for name, entry in entries.items():
        task = build_task(name, entry)
        task.check_data()
        n_classes = task.num_classes if name == "bdd_det" else task.cfg.num_classes
        assert n_classes == expected[name]
        for split, train in (("train", True), ("val", False)):
            unit = task.source(split).units[0]
            batch = {k: np.array([v]) for k, v in unit.items()}
            out = task.preprocess(batch, train=train, seed=0)
            if name == "bdd_det" or train:
                assert out["image"].shape == (1, 3, 64, 64)
            else:  # segmentation evaluates at the keep-ratio test scale, short side 64
                assert out["image"][0].shape[0] == 3 and min(out["image"][0].shape[1:]) == 64
            if name == "bdd_det" and train:
                assert (out["labels"][0] >= 0).sum() >= 1  # the crowd box is not a target
                assert out["labels"][0].max() < 10
            if name != "bdd_det":
                mask = out["mask"][0]
                assert set(np.unique(mask)) <= set(range(n_classes)) | {255}
    assert bdd100k_tasks(bdd_root, overrides={"bdd_det": {"head": {"anchor_size": 8}}})["bdd_det"][
        "head"
    ] == {"anchor_size": 8}
    with pytest.raises(ValueError, match=r"overrides name task 'bdd_lanes'"):
        bdd100k_tasks(bdd_root, overrides={"bdd_lanes": {}})


def test_adapt_finetune_job_on_the_three_tasks(bdd_root, ray_session, tmp_path):
    """jobs/adapt_finetune.py's full config on the fake release layout: adapt then finetune
    stages, the shared neck with a pre_vector adapter and the LV-Adapter, 2 workers."""
    import importlib.util

    from gppf.config.base import apply_overrides
    from gppf.launch.fit import fit

    spec = importlib.util.spec_from_file_location(
        "adapt_finetune_job", Path(__file__).resolve().parents[1] / "jobs" / "adapt_finetune.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    head = {
        "conv_channels": 16,
        "fc_channels": 32,
        "anchor_size": 8,
        "roi_batch_per_image": 32,
        "rpn_post_nms_train": 64,
        "rpn_post_nms_test": 32,
    }
    sets = [
        "tasks.*.batch_size=2",
        "tasks.*.input_size=64",
        "tasks.bdd_seg.head_channels=16",
        "tasks.bdd_seg.aux_channels=8",
        "tasks.bdd_drivable.head_channels=16",
        "tasks.bdd_drivable.aux_channels=8",
        *(f"tasks.bdd_det.head.{k}={v}" for k, v in head.items()),
        "backbone.name=resnet10t",
        "model.neck_channels=16",
        "model.adapter=pre_vector",
        "model.language.variant=lv_adapter",
        "scaling.num_workers=2",
        "scaling.use_gpu=false",
        "scaling.cpus_per_worker=0.5",
        "train.log_every=2",
        "train.checkpoint_every=0",
        "train.eval_at_start=false",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "data.min_rows_per_pass=8",
        "data.chunk_rows=8",
        f"run_dir={tmp_path}",
    ]
    cfg = apply_overrides(job.full_config(str(bdd_root)), sets)
    assert [s.name for s in cfg.stages] == ["adapt", "finetune"]
    cfg.stages = job.stages(2, 2, 1)
    out = fit(cfg)
    assert out["step"] == 4
    final = out["final_eval"]
    assert set(final) == {"bdd_det", "bdd_seg", "bdd_drivable"}
    assert "box_AP" in final["bdd_det"] and "mask_AP" not in final["bdd_det"]
    for t in ("bdd_seg", "bdd_drivable"):
        assert 0.0 <= final[t]["mIoU"] <= 100.0


def _labels(tmp_path: Path, frames: list) -> Path:
    path = tmp_path / "det_train.json"
    path.write_text(json.dumps(frames))
    return path


def test_converter_errors_name_file_frame_and_label(tmp_path):
    ok = {"id": "1", "category": "car", "box2d": {"x1": 0, "y1": 0, "x2": 5, "y2": 5}}
    bad = [
        ({"id": "7", "category": "car", "box2d": {"x1": 0, "y1": 0, "x2": 5}}, r"box2d has no y2"),
        ({"id": "7", "category": "car", "box2d": {"x1": 0, "y1": "0", "x2": 5, "y2": 5}}, r"must be numbers"),
        ({"id": "7", "category": "car", "box2d": {"x1": 9, "y1": 0, "x2": 5, "y2": 5}}, r"x2 < x1"),
        ({"id": "7", "category": "bus"}, r"has no box2d"),
        ({"id": "7", "box2d": {"x1": 0, "y1": 0, "x2": 5, "y2": 5}}, r"has no category"),
    ]
    for label, why in bad:
        path = _labels(
            tmp_path, [{"name": "a.jpg", "labels": [ok]}, {"name": "b.jpg", "labels": [ok, label]}]
        )
        with pytest.raises(ValueError, match=rf"det_train\.json: frame 'b\.jpg', label id 7.*{why}"):
            convert(path)
    # An unknown category is skipped before its box is looked at (2018 files: lane polygons).
    path = _labels(
        tmp_path, [{"name": "a.jpg", "labels": [ok, {"id": "2", "category": "lane", "poly2d": []}]}]
    )
    assert convert(path)["info"]["skipped_labels"] == {"lane": 1}
    path = _labels(tmp_path, [{"name": "a.jpg"}, {"name": "a.jpg"}])
    with pytest.raises(ValueError, match=r"frame 'a\.jpg' appears twice"):
        convert(path)
    path = _labels(tmp_path, {"frames": []})
    with pytest.raises(ValueError, match=r"det_train\.json: the top level must be a list of frames"):
        convert(path)
    with pytest.raises(FileNotFoundError, match=r"labels file .*det_nope\.json does not exist"):
        bdd100k_to_coco(["--labels", str(tmp_path / "det_nope.json"), "--out", str(tmp_path / "o.json")])


def test_converter_reads_sizes_and_names_missing_images(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30)).save(images / "a.jpg")
    ok = {"id": "1", "category": "person", "box2d": {"x1": 0, "y1": 0, "x2": 5, "y2": 5}}  # 2018 name
    path = _labels(tmp_path, [{"name": "a.jpg", "labels": [ok]}, {"name": "b.jpg", "labels": None}])
    with pytest.raises(
        FileNotFoundError, match=r"det_train\.json: frame 'b\.jpg' has no image file .*b\.jpg"
    ):
        convert(path, images)
    doc = bdd100k_to_coco(
        ["--labels", str(path), "--images", str(images), "--skip-missing", "--out", str(tmp_path / "o.json")]
    )
    assert [(im["file_name"], im["width"], im["height"]) for im in doc["images"]] == [("a.jpg", 40, 30)]
    assert doc["annotations"][0]["category_id"] == 1 and doc["info"]["skipped_images"] == 1
    assert "skipped 1 frames whose image is missing" in capsys.readouterr().err
    assert convert(path)["images"][1]["width"] == 1280  # no --images: BDD100K's 1280x720
