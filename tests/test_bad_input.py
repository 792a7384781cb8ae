"""Bad input gives errors that name the file or task (and the step, for a NaN loss)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import JobConfig
from gppf.io.images import BadSampleError
from gppf.launch.fit import resolve
from tests.tasks_for_tests import task_entries


def _cls(root: Path, **kw):
    t = build_task(
        "cls", {**task_entries(root)["cls_folder"], "data_root": str(root / "classification"), **kw}
    )
    return t


def test_missing_and_empty_data_root(tmp_path):
    cfg = JobConfig(tasks={"cls": {"type": "classification", "data_root": str(tmp_path / "nope")}})
    with pytest.raises(FileNotFoundError, match=r"task 'cls': data root .*nope does not exist"):
        resolve(cfg)
    (tmp_path / "empty").mkdir()
    cfg = JobConfig(tasks={"cls": {"type": "classification", "data_root": str(tmp_path / "empty")}})
    with pytest.raises(FileNotFoundError, match=r"task 'cls': data root .*empty is empty"):
        resolve(cfg)
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"task .cls.: train split directory .*empty/train holds no images"
    ):
        resolve(cfg)


def test_corrupt_image_is_named(demo_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(demo_root / "classification", root / "classification")
    bad = root / "classification" / "train" / "disc" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    task = _cls(root)
    task.check_data()
    with pytest.raises(BadSampleError, match=r"task 'cls': cannot read .*zz_corrupt\.png"):
        task.preprocess({"path": np.array([str(bad)]), "label": np.array([0])}, train=True, seed=0)


def test_corrupt_image_surfaces_through_the_ray_stream(demo_root, tmp_path, ray_session):
    from gppf.config.job import StreamConfig
    from gppf.data.stream import TaskStream

    root = tmp_path / "d"
    shutil.copytree(demo_root / "classification", root / "classification")
    for f in (root / "classification" / "train").rglob("*.png"):
        f.write_bytes(b"garbage")
    task = _cls(root)
    task.check_data()
    stream = TaskStream(task, 0, 0, 1, StreamConfig(min_rows_per_pass=8, chunk_rows=8))
    with pytest.raises(Exception, match=r"task 'cls': cannot read .*\.png"):
        stream.next()


def test_class_id_out_of_range(demo_root):
    task = _cls(demo_root, num_classes=2)
    f = next((demo_root / "classification" / "train" / "square").iterdir())
    with pytest.raises(BadSampleError, match=r"class id 3 of .*square.* outside \[0, 2\)"):
        task.preprocess({"path": np.array([str(f)]), "label": np.array([3])}, train=False, seed=0)


def _seg(root: Path):
    return build_task("seg", {**task_entries(root)["seg"], "data_root": str(root)})


def _seg_copy(demo_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "seg"
    shutil.copytree(demo_root / "segmentation", root)
    return root


def test_label_size_mismatch_is_named(demo_root, tmp_path):
    root = _seg_copy(demo_root, tmp_path)
    img = root / "train" / "images" / "00000.jpg"
    lbl = root / "train" / "labels" / "00000.png"
    Image.new("L", (7, 5), 0).save(lbl)
    task = _seg(root)
    with pytest.raises(BadSampleError, match=r"label .*00000\.png is 7x5 but its image .*00000\.jpg is"):
        task.preprocess({"image": np.array([str(img)]), "label": np.array([str(lbl)])}, train=True, seed=0)


def test_segmentation_class_out_of_range_is_named(demo_root, tmp_path):
    root = _seg_copy(demo_root, tmp_path)
    img = root / "train" / "images" / "00001.jpg"
    lbl = root / "train" / "labels" / "00001.png"
    arr = np.array(Image.open(lbl))
    arr[5, 5] = 9
    Image.fromarray(arr).save(lbl)
    with pytest.raises(BadSampleError, match=r"label .*00001\.png has class id 9 outside \[0, 4\)"):
        _seg(root).preprocess(
            {"image": np.array([str(img)]), "label": np.array([str(lbl)])}, train=False, seed=0
        )


def test_missing_label_file_is_named(demo_root, tmp_path):
    root = _seg_copy(demo_root, tmp_path)
    (root / "val" / "labels" / "00002.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"task 'seg': 1 val images have no label PNG, e.g. .*00002\.png"
    ):
        _seg(root).check_data()


def test_nan_loss_names_task_and_step(demo_root, ray_session):
    from gppf.config.job import BackboneConfig, StreamConfig
    from gppf.engine.trainer import NonFiniteLossError, Trainer

    entries = task_entries(demo_root)
    cfg = JobConfig(
        tasks={"good": entries["cls_folder"], "bad": entries["seg"]},
        backbone=BackboneConfig(name="resnet10t"),
        data=StreamConfig(min_rows_per_pass=16, chunk_rows=16),
    )
    cfg = resolve(cfg)
    w = Trainer(cfg, torch.device("cpu"))
    # A NaN loss weight is refused when the config is built; set it on the built task instead.
    next(t for t in w.tasks if t.name == "bad").cfg.loss_weight = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in task\(s\) bad at step \d+"):
        for _ in range(30):
            w.train_step()
    for s in w.streams.values():
        s.close()


def test_val_split_class_ids_follow_the_train_split(demo_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(demo_root / "classification", root / "classification")
    shutil.rmtree(root / "classification" / "val" / "bar")  # val lacks the first class
    task = _cls(root)
    task.check_data()
    labels = {Path(u["path"]).parent.name: u["label"] for u in task.source("val").units}
    assert labels == {"disc": 1, "square": 2, "triangle": 3}
    (root / "classification" / "val" / "zebra").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder .*val/zebra is not in the train split"):
        task.source("val")


def test_reusing_a_run_directory_is_refused(demo_root, tmp_path):
    from gppf.launch.fit import fit

    tasks = {"cls": task_entries(demo_root)["cls_folder"]}
    cfg = JobConfig(run_dir=str(tmp_path), run_name="r1", tasks=tasks)
    (tmp_path / "r1" / "checkpoint_2026").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"r1 already holds checkpoints"):
        fit(cfg)
