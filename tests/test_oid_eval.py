"""The Open Images challenge's AP50 (task_plugins.detection.oid_eval) against values computed by hand on a
fixture with a class hierarchy, a group-of box and negative image-level labels; the converter's
challenge keys."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gppf.api.registry import build_task
from gppf.config.base import ConfigError
from gppf.tools.openimages_to_coco import convert
from task_plugins.detection.oid_eval import ancestors, average_precision, oid_challenge_ap

# Entity > Animal > {Dog, Cat}; Entity > Vehicle > Car
HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog"}, {"LabelName": "/m/cat"}]},
        {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": "/m/car"}]},
    ],
}
ANIMAL, DOG, CAT, VEHICLE, CAR = 1, 2, 3, 4, 5
CATS = [
    {"id": i, "name": n.split("/")[-1], "label_name": n}
    for i, n in enumerate(["/m/animal", "/m/dog", "/m/cat", "/m/vehicle", "/m/car"], start=1)
]


def _box(x0, y0, x1, y1):
    return [x0, y0, x1 - x0, y1 - y0]


def _gt():
    anns = [
        (1, DOG, (0, 0, 40, 40), 0),
        (1, CAT, (50, 50, 90, 90), 0),
        (1, CAR, (0, 60, 40, 100), 1),  # a group-of box: several cars
        (2, DOG, (10, 10, 50, 50), 0),
        (3, DOG, (0, 0, 50, 50), 0),
    ]
    images = [
        {"id": 1, "height": 100, "width": 100, "pos_category_ids": [DOG, CAT, CAR]},
        # verified negatives: Cat, and Vehicle, which also makes Car (its descendant) negative
        {"id": 2, "height": 100, "width": 100, "pos_category_ids": [DOG], "neg_category_ids": [CAT, VEHICLE]},
        {"id": 3, "height": 100, "width": 100, "pos_category_ids": [DOG]},  # nothing verified about cars
    ]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": _box(*b), "iscrowd": g}
        for k, (i, c, b, g) in enumerate(anns)
    ]
    return {"images": images, "annotations": annotations, "categories": CATS}


def _det(image, cat, box, score):
    return {"image_id": image, "category_id": cat, "bbox": _box(*box), "score": score}


DETECTIONS = [
    _det(1, DOG, (0, 0, 40, 40), 0.9),  # TP
    _det(1, CAT, (52, 50, 90, 90), 0.8),  # TP (IoU 0.95)
    _det(1, CAR, (2, 62, 20, 80), 0.7),  # inside the group-of box: one TP at 0.7 for the group ...
    _det(1, CAR, (20, 80, 38, 98), 0.6),  # ... and this one is ignored
    _det(1, DOG, (60, 0, 90, 30), 0.5),  # FP
    _det(2, DOG, (10, 10, 50, 50), 0.3),  # TP
    _det(2, CAT, (60, 60, 90, 90), 0.95),  # FP: Cat is a verified negative of image 2
    _det(2, CAR, (0, 0, 20, 20), 0.85),  # FP: Car is negative through Vehicle
    _det(3, CAR, (0, 0, 30, 30), 0.99),  # ignored: Car / Vehicle are not verified for image 3
]


def test_hierarchy_ancestors_skip_the_root():
    up = ancestors(HIERARCHY)
    assert up["/m/dog"] == {"/m/animal"} and up["/m/animal"] == set() and "/m/0bl9f" not in up


def test_challenge_ap50_equals_the_hand_computed_value():
    # Per class, detections sorted by score with (TP?), the ground-truth count, and the AP
    # (precision envelope over all recall points):
    #   Dog:     .9 T, .5 F, .3 T             of 3 -> 1/3 * 1 + 1/3 * 2/3          = 5/9
    #   Cat:     .95 F, .8 T                  of 1 -> 1 * 1/2                      = 1/2
    #   Car:     .85 F, .7 T (the group)      of 1 -> 1/2 (.6 ignored, .99 dropped)
    #   Animal:  .95 F, .9 T, .8 T, .5 F, .3 T of 4 (Dog and Cat boxes expanded)
    #            -> 1/4 * 2/3 + 1/4 * 2/3 + 1/4 * 3/5                            = 29/60
    #   Vehicle: .85 F, .7 T (the expanded group-of box) of 1                    = 1/2
    expected = (5 / 9 + 1 / 2 + 1 / 2 + 29 / 60 + 1 / 2) / 5
    got = oid_challenge_ap(_gt(), DETECTIONS, HIERARCHY)
    assert got["box_AP50"] == pytest.approx(100 * expected, abs=1e-9) and got["oid_classes"] == 5

    # Each rule matters: without detection expansion the parents are never found (AP 0 there);
    # a group-of box scored as an ordinary one makes the .6 car a false positive.
    no_expansion = oid_challenge_ap(_gt(), DETECTIONS, HIERARCHY, expand_detections=False)
    assert no_expansion["box_AP50"] == pytest.approx(100 * (5 / 9 + 1 / 2 + 1 / 2) / 5, abs=1e-9)
    plain = _gt()
    for a in plain["annotations"]:
        a["iscrowd"] = 0
    assert oid_challenge_ap(plain, DETECTIONS, HIERARCHY)["box_AP50"] < got["box_AP50"]
    # Scoring only image 3: the 0.99 car is not a false positive there (Car is not verified).
    only3 = oid_challenge_ap(_gt(), DETECTIONS, HIERARCHY, image_ids=[3])
    assert only3["oid_classes"] == 2 and only3["box_AP50"] == 0.0  # Dog, Animal: found nothing


def test_average_precision_matches_the_tf_api_formula():
    import numpy as np

    # precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3 (3 objects): 1/3 + 1/3 * 2/3
    assert average_precision(np.array([0.9, 0.5, 0.3]), np.array([1.0, 0.0, 1.0]), 3) == pytest.approx(5 / 9)
    assert average_precision(np.zeros(0), np.zeros(0), 2) == 0.0  # objects, no detection


def test_converter_writes_the_challenge_keys(tmp_path):
    images = tmp_path / "validation"
    images.mkdir()
    for name in ("img1", "img2"):
        Image.new("RGB", (200, 100)).save(images / f"{name}.jpg")
    (tmp_path / "classes.csv").write_text("/m/dog,Dog\n/m/car,Car\n")
    (tmp_path / "boxes.csv").write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf\n"
        "img1,xclick,/m/dog,1,0.1,0.5,0.2,0.6,0,0,0\n"
        "img1,xclick,/m/car,1,0.0,0.2,0.5,1.0,0,0,1\n"
        "img1,xclick,/m/tree,1,0.0,0.2,0.5,1.0,0,0,0\n"
    )
    (tmp_path / "labels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\nimg1,verification,/m/dog,1\nimg2,verification,/m/dog,0\n"
        "img2,verification,/m/car,1\nimg2,verification,/m/tree,1\n"
    )
    with pytest.raises(ValueError, match=r"boxes\.csv:4: label /m/tree is not in"):
        convert(tmp_path / "boxes.csv", tmp_path / "classes.csv", images)
    doc = convert(
        tmp_path / "boxes.csv",
        tmp_path / "classes.csv",
        images,
        False,
        tmp_path / "labels.csv",
        skip_unlisted=True,
    )
    assert doc["categories"] == [
        {"id": 1, "name": "Dog", "label_name": "/m/dog"},
        {"id": 2, "name": "Car", "label_name": "/m/car"},
    ]
    by_file = {im["file_name"]: im for im in doc["images"]}
    assert by_file["img1.jpg"]["pos_category_ids"] == [1]
    assert by_file["img2.jpg"]["neg_category_ids"] == [1] and by_file["img2.jpg"]["pos_category_ids"] == [2]
    assert [a["iscrowd"] for a in doc["annotations"]] == [0, 1]  # the group-of box
    assert doc["annotations"][0]["bbox"] == pytest.approx([20.0, 20.0, 80.0, 40.0])


def test_detection_task_scores_oid_challenge(tmp_path):
    """A detection task with evaluation oid_challenge reads the converted file and the hierarchy
    and gives the same figure as the function."""
    root = tmp_path / "oid"
    for d in ("train", "validation", "annotations"):
        (root / d).mkdir(parents=True)
    gt = _gt()
    for im in gt["images"]:
        im["file_name"] = f"{im['id']}.jpg"
        for split in ("train", "validation"):
            Image.new("RGB", (100, 100)).save(root / split / im["file_name"])
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(gt))
    (root / "annotations" / "hierarchy.json").write_text(json.dumps(HIERARCHY))
    entry = {
        "type": "detection",
        "data_root": str(root),
        "masks": False,
        "train_images": "train",
        "val_images": "validation",
        "train_annotations": "annotations/train.json",
        "val_annotations": "annotations/val.json",
        "evaluation": "oid_challenge",
        "oid_hierarchy": "annotations/hierarchy.json",
    }
    task = build_task("oid", entry)
    task.check_data()
    ev = task.evaluator()
    assert ev.primary == "box_AP50"
    ev.results, ev.image_ids = list(DETECTIONS), [1, 2, 3]
    assert ev.compute()["box_AP50"] == pytest.approx(
        oid_challenge_ap(_gt(), DETECTIONS, HIERARCHY)["box_AP50"]
    )
    with pytest.raises(ConfigError, match=r"set masks: false and oid_hierarchy"):
        build_task("oid", {**entry, "oid_hierarchy": ""})
    with pytest.raises(FileNotFoundError, match=r"task 'oid': oid_hierarchy .*nope\.json does not exist"):
        build_task("oid", {**entry, "oid_hierarchy": "nope.json"}).check_data()
