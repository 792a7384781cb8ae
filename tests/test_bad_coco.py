"""Bad COCO input: a clear error naming the file and the record, or a documented, counted skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from task_plugins.detection.coco_data import CocoFormatError, load_coco


def _copy(demo_root: Path, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "det"
    shutil.copytree(demo_root / "detection", root)
    ann = root / "annotations" / "instances_val2017.json"
    return ann, json.loads(ann.read_text())


def _write(ann: Path, doc: dict) -> Path:
    ann.write_text(json.dumps(doc))
    return ann


def test_missing_keys_name_file_and_record(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    images = ann.parent.parent / "val2017"
    del doc["categories"]
    with pytest.raises(
        CocoFormatError, match=r"instances_val2017\.json: the top level has no 'categories' key"
    ):
        load_coco(_write(ann, doc), images, "det")
    ann, doc = _copy(demo_root, tmp_path / "b")
    bad_id = doc["annotations"][3]["id"]
    del doc["annotations"][3]["bbox"]
    with pytest.raises(CocoFormatError, match=rf"annotations\[3\] \(id {bad_id}\) has no 'bbox' key"):
        load_coco(_write(ann, doc), images, "det")
    ann, doc = _copy(demo_root, tmp_path / "c")
    del doc["images"][2]["file_name"]
    with pytest.raises(CocoFormatError, match=r"images\[2\] \(id \d+\) has no 'file_name' key"):
        load_coco(_write(ann, doc), images, "det")


def test_image_id_without_file_is_named(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    missing = ann.parent.parent / "val2017" / doc["images"][1]["file_name"]
    missing.unlink()
    task = build_task("det", {"type": "detection", "data_root": str(ann.parent.parent), "input_size": 64})
    with pytest.raises(
        FileNotFoundError, match=rf"image id {doc['images'][1]['id']} .* has no file .*{missing.name}"
    ):
        task.check_data()


def test_annotation_of_an_undeclared_image_is_named(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    doc["annotations"][0]["image_id"] = 987654
    with pytest.raises(
        CocoFormatError, match=r"annotations\[0\] .* refers to image id 987654, not in 'images'"
    ):
        load_coco(_write(ann, doc), ann.parent.parent / "val2017", "det")


def test_zero_area_and_outside_boxes_are_skipped_and_counted(demo_root, tmp_path, capfd):
    ann, doc = _copy(demo_root, tmp_path)
    n = len(doc["annotations"])
    doc["annotations"][0]["bbox"] = [10, 10, 0, 5]  # zero width
    doc["annotations"][1]["bbox"] = [5000, 5000, 20, 20]  # entirely outside the image
    zero_id = doc["annotations"][0]["id"]
    idx = load_coco(_write(ann, doc), ann.parent.parent / "val2017", "det")
    assert idx.skipped["zero-area box (after clipping to the image)"] == 2
    assert sum(len(i["anns"]) for i in idx.images) == n - 2
    assert len(idx.gt["annotations"]) == n - 2
    out = capfd.readouterr().out
    assert (
        "task 'det': instances_val2017.json: 2 zero-area box (after clipping to the image), "
        f"e.g. annotation id {zero_id}" in out
    )


def test_partly_outside_box_is_clipped(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    img = next(i for i in doc["images"] if i["id"] == doc["annotations"][0]["image_id"])
    doc["annotations"][0]["bbox"] = [img["width"] - 10, -5, 30, 20]
    idx = load_coco(_write(ann, doc), ann.parent.parent / "val2017", "det")
    rec = next(i for i in idx.images if i["image_id"] == img["id"])
    assert [rec["anns"][0][k] for k in range(4)] == [img["width"] - 10, 0.0, img["width"], 15.0]


def test_empty_annotation_list_is_an_error_and_bare_images_are_kept(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    first = doc["images"][0]["id"]
    kept = dict(doc, annotations=[a for a in doc["annotations"] if a["image_id"] != first])
    idx = load_coco(_write(ann, kept), ann.parent.parent / "val2017", "det")
    assert idx.skipped["image without annotations (kept as a negative)"] == 1
    assert len(idx.images) == len(doc["images"])
    with pytest.raises(CocoFormatError, match=r"instances_val2017\.json: 'annotations' is empty"):
        load_coco(_write(ann, dict(doc, annotations=[])), ann.parent.parent / "val2017", "det")


def test_unknown_category_is_named(demo_root, tmp_path):
    ann, doc = _copy(demo_root, tmp_path)
    doc["annotations"][5]["category_id"] = 3  # the demo declares 1, 2 and 4
    aid = doc["annotations"][5]["id"]
    with pytest.raises(
        CocoFormatError,
        match=rf"annotations\[5\] \(id {aid}\) has category id 3, not in 'categories' \(ids 1, 2, 4\)",
    ):
        load_coco(_write(ann, doc), ann.parent.parent / "val2017", "det")


def test_invalid_json_is_named(demo_root, tmp_path):
    ann, _ = _copy(demo_root, tmp_path)
    ann.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match=r"instances_val2017\.json: not valid JSON"):
        load_coco(ann, ann.parent.parent / "val2017", "det")


def test_wrong_value_types_and_duplicate_ids_are_named(demo_root, tmp_path):
    images = tmp_path / "unused"
    cases = [
        (lambda d: d["annotations"][2]["bbox"].__setitem__(0, "x"), r"annotations\[2\] \(id \d+\): Value"),
        (lambda d: d["images"][4].__setitem__("height", None), r"images\[4\]: TypeError"),
        (lambda d: d["annotations"].__setitem__(1, "oops"), r"annotations\[1\] \(id \?\) is not an object"),
        (lambda d: d["images"][3].__setitem__("id", d["images"][0]["id"]), r"images\[3\] repeats image id"),
    ]
    for k, (spoil, message) in enumerate(cases):
        ann, doc = _copy(demo_root, tmp_path / str(k))
        spoil(doc)
        with pytest.raises(CocoFormatError, match=rf"instances_val2017\.json: {message}"):
            load_coco(_write(ann, doc), images, "det")


def test_unusable_polygons_are_dropped_and_bad_segmentations_named(demo_root, tmp_path, capfd):
    ann, doc = _copy(demo_root, tmp_path)
    images = ann.parent.parent / "val2017"
    first, second = doc["annotations"][0], doc["annotations"][1]
    good = first["segmentation"][0]
    first["segmentation"] = [[1.0, 2.0, 3.0, 4.0], good[:-1]]  # a "box" and an odd polygon: no polygon left
    second["segmentation"] = [[1.0, 2.0, 3.0, 4.0], good]  # keeps its valid polygon
    idx = load_coco(_write(ann, doc), images, "det")
    assert idx.skipped["annotation without a valid polygon"] == 1
    assert f"1 annotation without a valid polygon, e.g. annotation id {first['id']}" in capfd.readouterr().out
    kept = [a for img in idx.images for a in img["anns"] if a[5] == [[float(v) for v in good]]]
    assert len(kept) == 1 and first["id"] not in {a["id"] for a in idx.gt["annotations"]}

    for k, (seg, message) in enumerate(
        [
            ({"size": [3, 3], "counts": "abc"}, r"RLE size \[3, 3\] is not its image's \[height, width\]"),
            ("polygon", r"segmentation must be a list of polygons or an RLE dict"),
            ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], r"segmentation must be a list of polygons or an RLE dict"),
        ]
    ):
        ann, doc = _copy(demo_root, tmp_path / f"s{k}")
        doc["annotations"][2]["segmentation"] = seg
        with pytest.raises(CocoFormatError, match=rf"annotations\[2\] \(id \d+\): {message}"):
            load_coco(_write(ann, doc), images, "det")


def test_training_split_index_keeps_no_second_copy_for_evaluation(demo_root):
    root = demo_root / "detection"
    args = (root / "annotations" / "instances_train2017.json", root / "train2017", "det")
    train = load_coco(*args, keep_gt=False)
    assert train.gt["annotations"] == [] and sum(len(i["anns"]) for i in train.images) > 0
    assert len(load_coco(*args).gt["annotations"]) >= sum(len(i["anns"]) for i in train.images)


def test_openimages_bad_coordinate_names_csv_line(tmp_path):
    from PIL import Image

    from gppf.tools.openimages_to_coco import convert

    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "img" / "00aa.jpg")
    (tmp_path / "classes.csv").write_text("/m/01,cat\n")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "ImageID,LabelName,XMin,XMax,YMin,YMax\n00aa,/m/01,0.1,0.5,0.2,0.6\n00aa,/m/01,,0.5,0.2,x\n"
    )
    with pytest.raises(ValueError, match=r"boxes\.csv:3: box coordinates must be numbers: .*'XMin': ''"):
        convert(boxes, tmp_path / "classes.csv", tmp_path / "img")
