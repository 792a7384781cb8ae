"""Pseudo-labels (gppf.tools.pseudo_labels, task_plugins.pseudo_label_formats): fixtures with known
scores keep exactly the pixels / boxes at or above the thresholds (0.3 / 0.5), and what the
plugins write is read back by the task itself as an extra train root. No Ray, no model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from gppf.config.cpf import PseudoLabelConfig
from gppf.config.job import JobConfig
from gppf.data.stream import items_dataset
from gppf.tools.pseudo_labels import image_files
from task_plugins.detection.task import DetectionConfig, DetectionTask
from task_plugins.pseudo_label_formats import confident_annotations, confident_labels, raw_label_ids
from task_plugins.segmentation.task import SegmentationConfig, SegmentationTask


def _batch(units: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.asarray([u[k] for u in units], dtype=object) for k in units[0]}


def test_confident_labels_keep_pixels_at_or_above_the_threshold():
    pixels = [  # class probabilities of five pixels, four classes
        [0.7, 0.1, 0.1, 0.1],  # max 0.7 -> class 0
        [0.2, 0.3, 0.3, 0.2],  # max exactly 0.3 -> class 1 (the first maximum), kept: >=
        [0.29, 0.29, 0.29, 0.13],  # max 0.29 -> ignore
        [0.25, 0.25, 0.25, 0.25],  # uniform -> ignore
        [0.1, 0.2, 0.2, 0.5],  # max 0.5 -> class 3
    ]
    probs = np.array(pixels).T.reshape(4, 1, 5)
    assert confident_labels(probs, 0.3, 255).tolist() == [[0, 1, 255, 255, 3]]
    assert confident_labels(probs, 0.31, 255).tolist() == [[0, 255, 255, 255, 3]]
    assert confident_labels(probs, 0.0, 255).tolist() == [[0, 1, 0, 0, 3]]


def test_raw_label_ids_invert_a_label_map():
    ids = np.array([[0, 1, 3, 255]])
    label_map = {10: 0, 11: 1, 12: 2, 14: 3, 13: 3}  # class 3 has two raw ids: the smallest is written
    assert raw_label_ids(ids, label_map, 255).tolist() == [[10, 11, 13, 255]]
    assert raw_label_ids(ids, {}, 255) is ids
    with pytest.raises(ValueError, match="class 3 has no raw id"):
        raw_label_ids(ids, {10: 0, 11: 1}, 255)


def test_confident_annotations_keep_boxes_scoring_at_least_the_threshold():
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 5), np.uint8), ((1, 5), (2, 3)))))
    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    results = [
        {"image_id": 7, "category_id": 4, "bbox": [1.0, 2.0, 10.0, 5.0], "score": s}
        for s in (0.2, 0.4999, 0.5, 0.93)
    ]
    results[3]["segmentation"] = seg
    kept = confident_annotations(results, 0.5)
    assert [a["score"] for a in kept] == [0.5, 0.93]
    assert kept[0]["area"] == 50.0 and "segmentation" not in kept[0]
    assert kept[1]["area"] == 20.0 and kept[1]["segmentation"] == seg  # the mask's area, not the box's
    assert all(a["iscrowd"] == 0 and a["image_id"] == 7 and a["category_id"] == 4 for a in kept)


def _images(directory: Path, n: int, size: tuple[int, int]) -> list[Path]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_segmentation_pseudo_labels_in_the_task_layout_are_read_back(tmp_path):
    # A VOC-like layout (image list) with a label map: what is written must be what this task reads.
    cfg = SegmentationConfig(
        data_root=str(tmp_path / "voc"),
        num_classes=4,
        input_size=8,
        train_images="JPEGImages",
        train_labels="SegmentationClass",
        train_list="ImageSets/train.txt",
        label_map={10: 0, 11: 1, 12: 2, 13: 3},
    )
    task = SegmentationTask("seg", cfg)
    paths = _images(tmp_path / "unlabelled", 2, (8, 8))  # the input size: no resampling of the logits
    inputs = task.pseudo_inputs({"path": np.asarray([str(p) for p in paths]), "index": np.arange(2)})
    assert [x.shape for x in inputs["image"]] == [(3, 8, 8)] * 2  # the test scale keeps 8 x 8
    assert inputs["orig_size"].tolist() == inputs["size"].tolist() == [[8, 8], [8, 8]]
    # Rows of logits with known softmax maxima: 0.79 (class 0), 0.25 (uniform), 0.355 (class 1),
    # 0.289 (class 2), 0.87 (class 3); thresholds 0.3 keeps rows 0, 2 and 4.
    rows = [[2, 0, 0, 0], [0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0.2, 0], [0, 0, 0, 3]]
    logits = torch.zeros(2, 4, 8, 8)
    for r, values in enumerate(rows):
        logits[:, :, r] = torch.tensor(values, dtype=torch.float32)[:, None]
    out = tmp_path / "pseudo"
    records = task.write_pseudo_labels(logits, inputs, out, PseudoLabelConfig(confidence=0.3))
    summary = task.finish_pseudo_labels(records, out)
    expected = np.full((8, 8), 255)
    expected[0], expected[2], expected[4] = 0, 1, 3
    assert summary["images"] == 2 and summary["labelled_pixels_pct"] == pytest.approx(100 * 24 / 64)
    png = np.asarray(Image.open(out / "SegmentationClass" / "img0.png"))
    assert set(np.unique(png)) == {10, 11, 13, 255}  # raw ids, as the label map expects them
    assert (out / "ImageSets/train.txt").read_text().split() == ["img0", "img1"]
    assert (out / "JPEGImages" / "img1.png").read_bytes() == paths[1].read_bytes()

    student = SegmentationTask("seg", dataclasses.replace(cfg, extra_train_roots=[str(out)]))
    units = student.extra_train_units(items_dataset)
    assert [Path(u["image"]).name for u in units] == ["img0.png", "img1.png"]
    masks = student.preprocess(_batch(units), train=False, seed=0)["mask"]  # at the original size
    assert all((m == expected).all() for m in masks)


@pytest.fixture
def det_task(demo_root) -> DetectionTask:
    # No scale jitter or copy-paste: the read-back check counts each image's objects after preprocess.
    cfg = DetectionConfig(
        data_root=str(demo_root / "detection"), input_size=128, lsj_scale=(1.0, 1.0), copy_paste=0.0
    )
    return DetectionTask("det", cfg)


def test_detection_pseudo_labels_keep_boxes_over_the_score_and_are_read_back(det_task, tmp_path):
    paths = sorted((Path(det_task.cfg.data_root) / "val2017").glob("*.jpg"))[:2]
    inputs = det_task.pseudo_inputs({"path": np.asarray([str(p) for p in paths]), "index": np.arange(2)})
    scale = float(inputs["scale"][0])
    masks = torch.zeros(3, 1, 28, 28)
    masks[:, :, 4:24, 4:24] = 0.9
    outputs = [
        {  # input pixels, 0-based labels: scores 0.9 and 0.5 stay, 0.49 goes
            "boxes": torch.tensor(
                [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 80.0], [0.0, 0.0, 20.0, 20.0]]
            ),
            "scores": torch.tensor([0.9, 0.5, 0.49]),
            "labels": torch.tensor([0, 2, 1]),
            "masks": masks,
        },
        {
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]),
            "scores": torch.tensor([0.3]),
            "labels": torch.tensor([1]),
        }
        | {"masks": masks[:1]},
    ]
    out = tmp_path / "pseudo"
    records = det_task.write_pseudo_labels(outputs, inputs, out, PseudoLabelConfig(score=0.5))
    summary = det_task.finish_pseudo_labels(records, out)
    assert summary == {"images": 2, "boxes_per_image": 1.0}
    doc = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert [a["score"] for a in doc["annotations"]] == pytest.approx([0.9, 0.5])
    assert [a["category_id"] for a in doc["annotations"]] == [1, 4]  # the demo's ids 1, 2, 4
    assert doc["annotations"][0]["bbox"] == pytest.approx([10 / scale, 10 / scale, 30 / scale, 30 / scale])
    assert [c["id"] for c in doc["categories"]] == [1, 2, 4]
    assert [i["file_name"] for i in doc["images"]] == [p.name for p in paths]
    assert (out / "train2017" / paths[0].name).is_file()

    student = DetectionTask("det", dataclasses.replace(det_task.cfg, extra_train_roots=[str(out)]))
    units = student.extra_train_units(items_dataset)
    assert [len(json.loads(u["anns"])) for u in units] == [2, 0]  # the second image: a negative
    batch = student.preprocess(_batch(units), train=True, seed=0)
    assert (
        sorted(batch["labels"][0][batch["labels"][0] >= 0]) == [0, 2] and (batch["labels"][1] >= 0).sum() == 0
    )

    doc["categories"] = doc["categories"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != 4]
    (out / "annotations/instances_train2017.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="declares categories"):
        student.extra_train_units(items_dataset)


def test_no_confident_box_is_an_error(det_task, tmp_path):
    paths = sorted((Path(det_task.cfg.data_root) / "val2017").glob("*.jpg"))[:1]
    inputs = det_task.pseudo_inputs({"path": np.asarray([str(p) for p in paths]), "index": np.arange(1)})
    outputs = [
        {
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]),
            "scores": torch.tensor([0.4]),
            "labels": torch.tensor([0]),
        }
    ]
    det_task.cfg.masks = False
    records = det_task.write_pseudo_labels(outputs, inputs, tmp_path, PseudoLabelConfig(score=0.5))
    with pytest.raises(ValueError, match="no detection of the 1 images scores at least"):
        det_task.finish_pseudo_labels(records, tmp_path)


def test_image_files_need_unique_stems(tmp_path):
    _images(tmp_path / "a", 2, (4, 4))
    assert [p.name for p in image_files(tmp_path / "a")] == ["img0.png", "img1.png"]
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "img0.jpg")
    with pytest.raises(ValueError, match="stem 'img0'"):
        image_files(tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        image_files(tmp_path / "missing")


def test_resolve_refuses_a_missing_extra_root(demo_root, tmp_path):
    from gppf.launch.fit import resolve

    entry = {"type": "segmentation", "data_root": str(demo_root / "segmentation"), "num_classes": 4}
    cfg = JobConfig(tasks={"seg": {**entry, "extra_train_roots": [str(tmp_path / "nope")]}})
    with pytest.raises(FileNotFoundError, match=r"tasks.seg.extra_train_roots\[0\]"):
        resolve(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = JobConfig(tasks={"seg": {**entry, "extra_train_roots": [str(empty)]}})
    with pytest.raises(FileNotFoundError, match="holds no train data"):
        resolve(cfg)
