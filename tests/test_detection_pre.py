"""Detection `pre`: deterministic LSJ + copy-paste, targets consistent with masks, packed masks."""

from __future__ import annotations

import numpy as np
import torch

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.dist.cross_bn import CrossTaskBatchNorm2d
from gppf.io.images import normalize_images
from task_plugins.detection.rcnn import unpack_masks
from task_plugins.detection.task import copy_paste
from tests.tasks_for_tests import task_entries


def _batch(task, n=4):
    units = task.source("train").units[:n]
    return {k: np.array([u[k] for u in units]) for k in units[0]}


def test_train_pre_is_deterministic_and_boxes_match_masks(demo_root):
    task = build_task("det", {**task_entries(demo_root)["det"], "input_size": 96, "copy_paste": 1.0})
    a = task.preprocess(_batch(task), train=True, seed=3)
    b = task.preprocess(_batch(task), train=True, seed=3)
    c = task.preprocess(_batch(task), train=True, seed=4)
    same = lambda x, y: all(np.array_equal(u, v) for u, v in zip(x, y)) and len(x) == len(y)  # noqa: E731
    assert all(same(a[k], b[k]) for k in a)
    assert not np.array_equal(a["image"], c["image"])
    for boxes, labels, packed in zip(a["boxes"], a["labels"], a["masks"]):
        assert (
            len(labels) > 0
            and boxes.shape == (len(labels), 4)
            and packed.shape == (len(labels), 96 * 96 // 8)
        )
        for box, m in zip(boxes, unpack_masks(torch.from_numpy(packed), 96)):
            ys, xs = torch.nonzero(m, as_tuple=True)  # tight box of the (cropped, occluded) mask
            assert box.tolist() == [
                xs.min().item(),
                ys.min().item(),
                xs.max().item() + 1,
                ys.max().item() + 1,
            ]


def test_image_left_without_objects_is_a_negative(demo_root):
    """A crop can remove every object; the image then trains as a negative (no instance)."""
    task = build_task("det", {**task_entries(demo_root)["det"], "input_size": 32})
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    empty_masks = torch.zeros(0, 32, 32, dtype=torch.uint8)
    out = task._pack(
        [img], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], [empty_masks], _batch(task, 1)
    )
    assert (
        out["labels"][0].shape == (0,)
        and out["boxes"][0].shape == (0, 4)
        and out["masks"][0].shape == (0, 128)
    )


def test_copy_paste_occludes_and_appends():
    img = [torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((3, 8, 8), 200, dtype=torch.uint8)]
    m0 = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m0[0, 0:4, 0:4] = 1
    m1 = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m1[0, 2:6, 2:6] = 1
    masks, labels = [m0, m1], [torch.tensor([0]), torch.tensor([2])]
    copy_paste(img, masks, labels, 1.0, np.random.default_rng(0))
    assert labels[0].tolist() == [0, 2]  # image 0 received image 1's object
    assert masks[0][0, 2:4, 2:4].sum() == 0 and masks[0][0, 0:2, 0:2].all()  # its own mask is occluded
    assert (img[0][:, 2:6, 2:6] == 200).all() and (img[0][:, 0:2, 0:2] == 0).all()


def test_packed_masks_round_trip():
    m = torch.rand(3, 5, 32, 32) > 0.5
    packed = torch.from_numpy(np.packbits(m.numpy().reshape(3, 5, -1), axis=-1))
    assert torch.equal(unpack_masks(packed, 32).bool(), m)


def test_heads_never_use_cross_task_bn(demo_root):
    from gppf.models.backbone import Backbone
    from gppf.models.model import MultiTaskModel

    tasks = [build_task(n, e) for n, e in task_entries(demo_root).items()]
    model = MultiTaskModel(Backbone("resnet10t"), tasks)
    assert any(isinstance(m, CrossTaskBatchNorm2d) for m in model.backbone.modules())
    any_bn = (CrossTaskBatchNorm2d, torch.nn.BatchNorm2d)
    bns = [n for n, m in model.heads.named_modules() if isinstance(m, any_bn)]
    # The one exception: MoCo's momentum encoder, a trunk copy with plain BN that never trains.
    assert bns and all(".key_trunk." in n for n in bns)
    assert not any(isinstance(m, CrossTaskBatchNorm2d) for m in model.heads.modules())
    assert all(not m.training for n, m in model.heads.named_modules() if n in bns)


def test_boxes_are_decoded_in_float32_under_bf16_autocast(demo_root):
    """Under bf16 autocast (the GPU default) box offsets come out of the convs in bf16, which has
    4-pixel steps between 512 and 1024 px; proposals and detections must still be float32."""
    from gppf.models.backbone import Backbone
    from gppf.models.model import MultiTaskModel

    task = build_task("det", task_entries(demo_root)["det"])
    model = MultiTaskModel(Backbone("resnet10t"), [task]).eval()
    batch = {"image": torch.randn(2, 3, 64, 64), "size": torch.tensor([[64, 64], [64, 48]])}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections, _ = model(batch["image"], "det", batch)
    assert sum(len(d["boxes"]) for d in detections) > 0
    assert all(d["boxes"].dtype == torch.float32 for d in detections)

    coder = model.heads["det"].rpn.box_coder
    anchors = [torch.tensor([[700.0, 600.0, 760.0, 640.0]])]
    codes = torch.tensor([[0.013, -0.021, 0.05, -0.04]]).bfloat16()
    decoded = coder.decode(codes, anchors)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, coder.decode(codes.float(), anchors))


def test_training_and_evaluation_pad_alike(demo_root):
    """LSJ's padding (a crop of a shrunk image) and evaluation's padding (to a square) are both the
    mean colour, 0 after normalisation: the model never sees a padding it was not trained on."""
    entry = {**task_entries(demo_root)["det"], "input_size": 96, "lsj_scale": [0.3, 0.3], "copy_paste": 0.0}
    task = build_task("det", entry)
    train = task.preprocess(_batch(task), train=True, seed=0)["image"]
    val_units = task.source("val").units[:2]
    val = task.preprocess({k: np.array([u[k] for u in val_units]) for k in val_units[0]}, train=False, seed=0)
    assert train.dtype == val["image"].dtype == np.uint8  # normalised on the device
    train = normalize_images(torch.from_numpy(train)).numpy()
    val["image"] = normalize_images(torch.from_numpy(val["image"])).numpy()
    # The demo images are 128 px or less: at scale 0.3 each fills under 40x40 px of the 96x96 crop.
    at_zero = (np.abs(train) < 0.02).all(axis=1).mean(axis=(1, 2))
    assert (at_zero > 0.75).all() and (at_zero < 0.95).all(), at_zero
    padded = [val["image"][i, :, int(h) :, :] for i, (h, w) in enumerate(val["size"]) if h < 96]
    padded += [val["image"][i, :, :, int(w) :] for i, (h, w) in enumerate(val["size"]) if w < 96]
    assert all(np.abs(p).max() < 0.02 for p in padded)


def test_group_norm_divides_any_head_width():
    from task_plugins.detection.rcnn import group_norm

    assert group_norm(256).num_groups == 32 and group_norm(16).num_groups == 4
    for channels in (130, 96, 3, 1):
        gn = group_norm(channels)
        assert channels % gn.num_groups == 0
        gn(torch.randn(2, channels, 4, 4))


def _dense_layout(root, n_objects: int):
    """A COCO layout whose one training image holds `n_objects` 6 x 6 squares on a grid."""
    import json

    from PIL import Image

    for d in ("train2017", "val2017", "annotations"):
        (root / d).mkdir(parents=True, exist_ok=True)
    anns = []
    for k in range(n_objects):
        x, y = 8 * (k % 15) + 1, 8 * (k // 15) + 1
        poly = [x, y, x + 6, y, x + 6, y + 6, x, y + 6]
        anns.append(
            {
                "id": k + 1,
                "image_id": 1,
                "category_id": 1 + k % 2,
                "bbox": [x, y, 6, 6],
                "area": 36,
                "iscrowd": 0,
                "segmentation": [poly],
            }
        )
    doc = {
        "images": [{"id": 1, "file_name": "dense.png", "height": 128, "width": 128}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    for split in ("train2017", "val2017"):
        Image.new("RGB", (128, 128), (90, 90, 90)).save(root / split / "dense.png")
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def test_a_dense_image_keeps_every_object_and_an_image_over_the_limit_is_named(tmp_path):
    """180 objects all reach the loss (a cap that drops some would train them as background); an
    image over tasks.<t>.max_instances is an error naming it."""
    import pytest

    from gppf.io.batches import collate_numpy
    from gppf.io.images import BadSampleError

    _dense_layout(tmp_path, 180)
    entry = {
        "type": "detection",
        "data_root": str(tmp_path),
        "input_size": 128,
        "lsj_scale": [1.0, 1.0],
        "copy_paste": 0.0,
        "batch_size": 1,
    }
    task = build_task("dense", entry)
    units = task.source("train").units
    raw = {k: np.array([u[k] for u in units]) for k in units[0]}
    out = task.preprocess(raw, train=True, seed=0)
    assert out["labels"][0].shape == (180,) and out["boxes"][0].shape == (180, 4)
    assert sorted(np.bincount(out["labels"][0]).tolist()) == [90, 90]
    from gppf.api.task import FeatureInfo

    targets = task.build_head([FeatureInfo(8, 4)]).targets(collate_numpy(out))
    assert len(targets[0]["boxes"]) == 180 and targets[0]["masks"].shape == (180, 128, 128)
    assert (targets[0]["masks"].flatten(1).sum(1) == 36).all()

    strict = build_task("dense", {**entry, "max_instances": 150})
    with pytest.raises(BadSampleError, match=r"dense\.png has 180 objects .*max_instances=150"):
        strict.preprocess(raw, train=True, seed=0)


def test_evaluation_at_a_test_size_keeps_each_images_aspect(demo_root):
    """test_size (UODB: 800): shorter side to it, longer at most test_max_size; the batch pads."""
    from gppf.io.batches import collate_numpy
    from gppf.models.backbone import Backbone
    from gppf.models.model import MultiTaskModel

    task = build_task("det", {**task_entries(demo_root)["det"], "test_size": 80, "test_max_size": 100})
    units = task.source("val").units[:3]
    out = task.preprocess({k: np.array([u[k] for u in units]) for k in units[0]}, train=False, seed=0)
    for img, (nh, nw), (h, w), scale in zip(out["image"], out["size"], out["orig_size"], out["scale"]):
        assert img.shape == (3, nh, nw) and (min(nh, nw) == 80 or max(nh, nw) == 100)
        assert scale == np.float32(min(80 / min(h, w), 100 / max(h, w)))
    batch = task.to_device(collate_numpy(out), torch.device("cpu"))
    assert batch["image"].shape[0] == 3 and all(d % 32 == 0 for d in batch["image"].shape[-2:])
    model = MultiTaskModel(Backbone("resnet10t"), [task]).eval()
    with torch.no_grad():
        detections, _ = model(batch["image"], "det", batch)
    assert len(detections) == 3
